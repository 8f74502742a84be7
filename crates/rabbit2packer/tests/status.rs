//! The status server end to end: the real daemon, real RabbitMQ, real
//! packer; its page in a real headless Chromium (Debian's `chromium`,
//! driven through `chromedriver` over WebDriver), `/metrics` checked by
//! Debian's `promtool`, and hostile requests over a raw socket.
//!
//! Needs `chromium`, `chromium-driver` and `prometheus` (scripts/test.sh
//! installs them); without them these tests fail, naming what is missing.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rabbit2packer::journal::JobState;
use serde_json::{json, Value};
use support::browser::{Browser, Http};
use support::*;

/// A template whose build waits until `out/go-<name>` exists, then succeeds.
fn gated_template(site: &Site, name: &str) {
    let go = site.out.join(format!("go-{name}"));
    let t = json!({
        "builders": [{"type": "null", "communicator": "none"}],
        "provisioners": [{"type": "shell-local", "inline": [
            "echo 'waiting for the test'",
            format!("while [ ! -e {} ]; do sleep 0.05; done", go.display()),
            "echo 'done'"
        ]}]
    });
    std::fs::write(site.templates.join(name), serde_json::to_string_pretty(&t).unwrap()).unwrap();
}

/// A template that prints markup and a secret-looking line, then fails.
fn failing_template(site: &Site, name: &str) {
    let t = json!({
        "builders": [{"type": "null", "communicator": "none"}],
        "provisioners": [{"type": "shell-local", "inline": [
            "echo '<script>document.title=\"owned\"</script><b>bold</b>'",
            "exit 3"
        ]}]
    });
    std::fs::write(site.templates.join(name), serde_json::to_string_pretty(&t).unwrap()).unwrap();
}

fn image<'a>(images: &'a Value, key: &str) -> &'a Value {
    images["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image_key"] == key)
        .unwrap_or_else(|| panic!("{key} not in {images:#}"))
}

/// One sample of a scrape, e.g. `packuilon_builds_total{image="x",...}`.
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

#[test]
fn api_and_metrics_show_failed_and_running_builds_and_refuse_hostile_requests() {
    let site = Site::new(2, "");
    gated_template(&site, "slow.json");
    failing_template(&site, "bad.json");
    site.write_map(json!({"DEFAULT": ["templates/slow.json"], "bad-sl7x-x86_64": ["templates/bad.json"]}));
    let mut d = site.start();
    let addr = d.status_addr();
    let http = Http::new(addr);

    site.publish(&profile("bad", "7x", "a", prod()), Some("m-bad"));
    let jobs = site.wait_jobs("the failed build", T, |j| j.iter().any(|j| j.state == JobState::Failed));
    let bad_id = jobs[0].id;
    site.publish(&profile("web", "7x", "a", prod()), Some("m-web"));
    site.wait_jobs("the running build", T, |j| {
        j.iter()
            .any(|j| j.image_key == "web-sl7x-x86_64" && j.state == JobState::Running && !j.builds.is_empty())
    });

    // /api/images: one row per image key, with its state.
    let images = http.json("/api/images");
    let bad = image(&images, "bad-sl7x-x86_64");
    assert_eq!(bad["state"], "failed");
    assert_eq!(bad["last_failure_job"], bad_id);
    assert!(bad["last_failure_at"].is_string());
    assert!(bad["last_success_at"].is_null());
    assert_eq!(bad["job"]["builds"][0]["exit_code"], 1);
    // Failing since that job (the one alerts tell about), no failure since.
    assert_eq!(bad["failing"]["state"], "build failing", "{bad}");
    assert_eq!(bad["failing"]["since_job"], bad_id);
    assert_eq!(bad["failing"]["further"], 0);
    let web = image(&images, "web-sl7x-x86_64");
    assert!(web["failing"].is_null(), "{web}");
    assert_eq!(web["state"], "building");
    assert_eq!(web["job"]["state"], "running");
    assert!(web["job"]["started_at"].is_string());

    // /api/jobs: newest first, filters.
    let all = http.json("/api/jobs");
    let ids: Vec<i64> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] > ids[1], "newest first: {ids:?}");
    let failed = http.json("/api/jobs?state=failed");
    assert_eq!(failed["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(failed["jobs"][0]["id"], bad_id);
    assert_eq!(failed["jobs"][0]["message_id"], "m-bad");
    let web_jobs = http.json("/api/jobs?image=web-sl7x-x86_64&limit=1");
    assert_eq!(web_jobs["jobs"][0]["image_key"], "web-sl7x-x86_64");
    let finished = http.json("/api/jobs?state=finished");
    assert_eq!(finished["jobs"].as_array().unwrap().len(), 1);
    let one = http.json(&format!("/api/jobs/{bad_id}"));
    assert_eq!(one["job"]["builds"][0]["template"], "bad.json");

    // The log, as plain text, markup and all.
    let (status, log) = http.get(&format!("/api/jobs/{bad_id}/log"));
    assert_eq!(status, 200);
    assert!(log.contains("<script>document.title"), "{log}");
    assert!(log.contains("with exit code 1"), "{log}");

    // Health.
    assert_eq!(http.get("/healthz").0, 200);
    let (status, body) = http.get("/readyz");
    assert_eq!(status, 200, "{body}");

    // Hostile or malformed: 400 or 404, never a file.
    for (target, want) in [
        ("/api/jobs/..%2f..%2f..%2fetc%2fpasswd/log", 404),
        ("/api/jobs/../../../../etc/passwd", 404),
        ("/jobs/..%2F..%2Fetc%2Fpasswd", 404),
        ("/api/jobs/-1", 404),
        ("/api/jobs/1e3", 404),
        ("/api/jobs/999999", 404),
        ("/api/jobs/999999/log", 404),
        ("/jobs/999999", 404),
        ("/jobs/abc", 404),
        ("/etc/passwd", 404),
        ("/api/jobs?limit=100000", 400),
        ("/api/jobs?limit=-5", 400),
        ("/api/jobs?limit=abc", 400),
        ("/api/jobs?state=bogus", 400),
        ("/api/jobs?image=../../etc/passwd", 400),
        ("/api/jobs?image=%3Cscript%3E", 400),
        ("/api/jobs?file=/etc/passwd", 400),
        ("/api/jobs?before=x", 400),
        ("/api/changes?after=x", 400),
    ] {
        let (code, text) = raw_status(addr, target);
        assert_eq!(code, want, "{target}: {text}");
        assert!(!text.contains("root:"), "{target}: {text}");
    }
    for q in ["build=99", "build=x", "offset=-1", "path=/etc/passwd"] {
        let target = format!("/api/jobs/{bad_id}/log?{q}");
        let (code, text) = raw_status(addr, &target);
        assert!(code == 400 || code == 404, "{target}: {text}");
        assert!(!text.contains("root:"), "{target}: {text}");
    }
    // A journal that names a file outside LOG_DIR (edited by hand, or restored
    // from elsewhere): the file is not served.
    let conn = rusqlite::Connection::open(site.state_dir.join("rabbit2packer.sqlite")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute("UPDATE builds SET log_path = '/etc/passwd' WHERE job_id = ?1", [bad_id])
        .unwrap();
    drop(conn);
    let (code, text) = raw_status(addr, &format!("/api/jobs/{bad_id}/log"));
    assert_eq!(code, 404, "{text}");
    assert!(!text.contains("root:"), "{text}");

    // /metrics: promtool accepts it, and the counters are what was built.
    let (status, metrics) = http.get("/metrics");
    assert_eq!(status, 200);
    packuilon_testsupport::command::promtool_check_metrics(&metrics);
    let failed_bad = r#"packuilon_builds_total{image="bad-sl7x-x86_64",result="failed",template="bad.json"}"#;
    assert_eq!(sample(&metrics, failed_bad), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "packuilon_builds_running"), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "packuilon_jobs_waiting"), Some(0.0), "{metrics}");
    assert_eq!(sample(&metrics, "packuilon_broker_connected"), Some(1.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "packuilon_messages_rejected_total"),
        Some(0.0),
        "{metrics}"
    );

    site.publish_bytes(b"not json", Some("m-junk"));
    std::fs::write(site.out.join("go-slow.json"), "").unwrap();
    site.wait_jobs("the web build", T, |j| succeeded(j) == 1);
    let deadline = Instant::now() + T;
    let metrics = loop {
        let (_, m) = http.get("/metrics");
        if sample(&m, "packuilon_messages_rejected_total") == Some(1.0) || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    packuilon_testsupport::command::promtool_check_metrics(&metrics);
    let ok_web = r#"packuilon_builds_total{image="web-sl7x-x86_64",result="succeeded",template="slow.json"}"#;
    assert_eq!(sample(&metrics, ok_web), Some(1.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "packuilon_messages_rejected_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"packuilon_build_duration_seconds_count{template="slow.json"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, r#"packuilon_rotations_total{result="skipped"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "packuilon_builds_running"), Some(0.0), "{metrics}");
    let last = sample(
        &metrics,
        r#"packuilon_last_success_timestamp_seconds{image="web-sl7x-x86_64"}"#,
    )
    .expect("last success of web");
    let images = http.json("/api/images");
    assert_eq!(image(&images, "web-sl7x-x86_64")["state"], "idle");
    d.stop();

    // After a restart the last success is still known (from the journal).
    let d = site.start();
    let http = Http::new(d.status_addr());
    let (_, metrics) = http.get("/metrics");
    let again = sample(
        &metrics,
        r#"packuilon_last_success_timestamp_seconds{image="web-sl7x-x86_64"}"#,
    )
    .expect("last success of web after a restart");
    assert!((again - last).abs() < 1.0, "{again} vs {last}");
}

#[test]
fn a_taken_status_listen_address_is_one_error_naming_the_key_and_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let site = Site::new(1, &format!("STATUS_LISTEN = {addr}"));
    let mut d = site.start();
    assert_eq!(d.wait_exit(T), 2);
    let out = d.output();
    assert!(
        out.contains("STATUS_LISTEN") && out.contains(&addr.to_string()),
        "{out}"
    );
    assert!(out.contains("config.ini"), "{out}");
}

#[test]
fn an_empty_status_listen_turns_the_server_off() {
    let site = Site::new(1, "STATUS_LISTEN =");
    let mut d = site.start();
    site.publish(&profile("web", "7x", "a", prod()), Some("m1"));
    site.wait_jobs("the build", T, |j| succeeded(j) == 1);
    assert_eq!(d.count("Status page on"), 0, "{}", d.output());
    d.stop();
}

/// The state shown for an image key on the main page, `""` when absent.
fn row_state(key: &str) -> String {
    format!(
        "const r = document.querySelector('#images tr[data-image=\"{key}\"]'); \
         return r ? r.dataset.state : '';"
    )
}

#[test]
fn the_page_in_chromium_follows_builds_live_and_shows_log_markup_as_text() {
    let browser = Browser::start();
    let site = Site::new(2, "");
    gated_template(&site, "slow.json");
    gated_template(&site, "gate.json");
    failing_template(&site, "bad.json");
    site.write_map(json!({
        "DEFAULT": ["templates/slow.json"],
        "bad-sl7x-x86_64": ["templates/bad.json"],
        "db-sl7x-x86_64": ["templates/gate.json"]
    }));
    let mut d = site.start();
    let base = format!("http://{}/", d.status_addr());

    site.publish(&profile("bad", "7x", "a", prod()), Some("m-bad"));
    let jobs = site.wait_jobs("the failed build", T, |j| j.iter().any(|j| j.state == JobState::Failed));
    let bad_id = jobs[0].id;
    site.publish(&profile("web", "7x", "a", prod()), Some("m-web"));
    site.wait_jobs("the running build", T, |j| {
        j.iter().any(|j| j.state == JobState::Running)
    });

    browser.goto(&base);
    // Marks this page load: a reload would lose it.
    browser.eval("window.loadedOnce = 'yes'; return 1;");
    browser.wait("the failed image", &row_state("bad-sl7x-x86_64"), |v| v == "failed");
    browser.wait("the running image", &row_state("web-sl7x-x86_64"), |v| v == "building");
    let text = browser.eval("return document.querySelector('#images').innerText;");
    assert!(text.as_str().unwrap().contains("bad-sl7x-x86_64"), "{text}");

    // A build that starts after the page loaded appears without a reload.
    site.publish(&profile("db", "7x", "a", prod()), Some("m-db"));
    browser.wait("the new image", &row_state("db-sl7x-x86_64"), |v| {
        v == "building" || v == "waiting"
    });
    // README's picture (docs/status-page.png): one failed, two building.
    if let Some(to) = std::env::var_os("PACKUILON_STATUS_SCREENSHOT") {
        browser.wait("db to build", &row_state("db-sl7x-x86_64"), |v| v == "building");
        std::thread::sleep(Duration::from_millis(1500));
        browser.screenshot(&PathBuf::from(to));
    }

    // The running build ends: the page follows.
    std::fs::write(site.out.join("go-slow.json"), "").unwrap();
    browser.wait("web to succeed", &row_state("web-sl7x-x86_64"), |v| v == "idle");
    let finished = browser.wait(
        "the finished jobs",
        "return [...document.querySelectorAll('#finished tr[data-job] td.state')].map(t => t.innerText).join(',');",
        |v| v.as_str().is_some_and(|s| s.matches("succeeded").count() == 1),
    );
    assert!(finished.as_str().unwrap().contains("failed"), "{finished}");
    assert_eq!(browser.eval("return window.loadedOnce || 'reloaded';"), "yes");
    let shot = tempfile::NamedTempFile::new().unwrap();
    browser.screenshot(shot.path());
    assert!(std::fs::read(shot.path()).unwrap().starts_with(b"\x89PNG"));

    // The job page of a running build follows its log and its end live.
    let db_id = site
        .journal()
        .iter()
        .find(|j| j.image_key == "db-sl7x-x86_64")
        .unwrap()
        .id;
    site.wait_jobs("db's build", T, |j| {
        j.iter()
            .any(|j| j.id == db_id && j.state == JobState::Running && !j.builds.is_empty())
    });
    browser.goto(&format!("{base}jobs/{db_id}"));
    browser.eval("window.loadedOnce = 'yes'; return 1;");
    let log_text = "const p = document.querySelector('pre.log'); return p ? p.textContent : '';";
    browser.wait("db's log so far", log_text, |v| {
        v.as_str().is_some_and(|s| s.contains("waiting for the test"))
    });
    std::fs::write(site.out.join("go-gate.json"), "").unwrap();
    browser.wait("db's log to its end", log_text, |v| {
        v.as_str().is_some_and(|s| s.contains("with exit code 0"))
    });
    browser.wait(
        "db's state",
        "return document.querySelector('td.state').innerText;",
        |v| v == "succeeded",
    );
    assert_eq!(browser.eval("return window.loadedOnce || 'reloaded';"), "yes");

    // The job page: the log's markup is text, nothing of it runs.
    browser.goto(&format!("{base}jobs/{bad_id}"));
    let log = browser.wait(
        "the build log",
        "const p = document.querySelector('pre.log'); return p ? p.textContent : '';",
        |v| v.as_str().is_some_and(|s| s.contains("exit code")),
    );
    assert!(
        log.as_str()
            .unwrap()
            .contains("<script>document.title=\"owned\"</script><b>bold</b>"),
        "{log}"
    );
    assert_eq!(
        browser.eval("return document.querySelectorAll('pre script, pre b').length;"),
        0
    );
    assert_ne!(browser.eval("return document.title;"), "owned");
    let exit = browser.eval("return document.querySelector('#builds tbody').innerText;");
    assert!(exit.as_str().unwrap().contains("bad"), "{exit}");

    // A new source image: the page marks the images built from the old one.
    site.write_images(json!({"sl7x-x86_64": "src-7x-new", "sl8x-x86_64": "src-8x-uuid"}));
    browser.goto(&base);
    let outdated = "const r = document.querySelector('#images tr[data-image=\"web-sl7x-x86_64\"]'); \
                    return r ? r.dataset.outdated + ' ' + r.innerText : '';";
    let row = browser.wait("web marked outdated", outdated, |v| {
        v.as_str().is_some_and(|s| s.starts_with("yes "))
    });
    assert!(
        row.as_str()
            .unwrap()
            .contains("outdated: built from src-7x-uuid by job"),
        "{row}"
    );
    assert!(row.as_str().unwrap().contains("source image now src-7x-new"), "{row}");
    d.stop();
}

#[test]
fn readyz_is_503_naming_the_broker_while_it_is_unreachable() {
    let site = Site::new(1, "");
    // Nothing listens on RABBIT_PORT.
    site.use_closed_broker_port();
    let mut d = site.start();
    let http = Http::new(d.status_addr());
    d.wait_log("unreachable", T);
    assert_eq!(http.get("/healthz").0, 200);
    let (status, body) = http.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not connected to RabbitMQ"), "{body}");
    let (_, metrics) = http.get("/metrics");
    assert_eq!(sample(&metrics, "packuilon_broker_connected"), Some(0.0), "{metrics}");
    d.stop();
}
