//! Issue #13 (6): on the site journal, any daemon's status API and `status`
//! show the whole site: a job another daemon ran, its build log (kept in
//! the site journal, compressed), a running job's host and the address of
//! that host's page, and images failing on another daemon. And what the
//! database cannot store as text is still journaled.

mod support;

use std::time::Duration;

use packuilon_testsupport::postgres::PrivatePostgres;
use serde_json::{json, Value};
use support::browser::Http;
use support::*;

/// The site journal's keys of a daemon named `host`.
fn keys(url: &str, host: &str) -> String {
    format!("STATE_DB = {url}\nJOB_LEASE = 30s\nHOST_NAME = {host}\n")
}

/// Daemon d1's site on a fresh site journal, and its URL.
fn site_on_postgres() -> (Site, String) {
    let pg = PrivatePostgres::shared().expect("a private PostgreSQL (Debian's postgresql package)");
    let url = pg.database("site_status").unwrap();
    (Site::new(1, &keys(&url, "d1")), url)
}

fn wait_json(http: &Http, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let v = http.json(path);
        if ok(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_daemon_shows_the_jobs_logs_and_failures_of_another() {
    let (site, url) = site_on_postgres();
    let d2_site = Site::joining(&site, 1, &keys(&url, "d2"));
    // Only d2 runs at first: it builds the image, then fails a second build.
    let d2 = d2_site.start();
    d2.wait_log("Consuming from queue", T);
    site.publish(&profile("web", "7x", "a", prod()), Some("first"));
    // d1's config names the same site journal: its `history` is d2's too.
    let jobs = || {
        let (code, out, err) = site.cli(&["history", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Vec<Value>>(&out).unwrap()
    };
    let deadline = std::time::Instant::now() + T;
    while jobs().is_empty() {
        assert!(std::time::Instant::now() < deadline, "{}", d2.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(site.out.join("fail"), "").unwrap();
    site.publish(&profile("web", "7x", "b", prod()), Some("second"));
    while jobs().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", d2.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    let history = jobs();
    assert_eq!(history[0]["state"], "failed", "{history:#?}");
    assert_eq!(history[1]["state"], "succeeded", "{history:#?}");
    assert!(history.iter().all(|j| j["host"] == "d2"), "{history:#?}");

    // d1 never ran anything: its API shows d2's jobs and logs all the same.
    let d1 = site.start();
    let http = Http::new(d1.status_addr());
    let listed = http.json("/api/jobs");
    let listed = listed["jobs"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:#?}");
    assert!(listed.iter().all(|j| j["host"] == "d2"), "{listed:#?}");
    let first = listed[1]["id"].as_i64().unwrap();
    // The log is d2's file, read from the site journal: d1's LOG_DIR has none.
    let local: Vec<_> = std::fs::read_dir(&d2_site.log_dir).unwrap().collect();
    assert!(!local.is_empty());
    assert!(std::fs::read_dir(&site.log_dir).map(|d| d.count()).unwrap_or(0) == 0);
    let (status, log) = http.get(&format!("/api/jobs/{first}/log"));
    assert_eq!(status, 200, "{log}");
    assert!(log.contains("building, with a comma"), "{log}");
    assert!(log.contains("rabbit2packer: Build finished"), "{log}");
    // d2's failure is the site's: the image is failing on d1's page and status.
    let images = http.json("/api/images");
    let web = images["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image_key"] == "web-sl7x-x86_64")
        .unwrap_or_else(|| panic!("{images:#}"));
    assert_eq!(web["failing"]["state"], "build failing", "{web:#}");
    let (code, out, err) = site.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("failing: 1\n  web-sl7x-x86_64 build failing since job #"),
        "{out}"
    );

    // A new source image: d2's build is outdated on d1's status and page,
    // and d1's `rebuild --outdated` has it built again (by either daemon).
    site.write_images(json!({"sl7x-x86_64": "src-7x-new", "sl8x-x86_64": "src-8x-uuid"}));
    let (code, out, err) = site.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "outdated: 1 (IMAGES_CONFIG names a new source image; `rabbit2packer rebuild --outdated` builds them)\n  \
             web-sl7x-x86_64 built from src-7x-uuid by job #{first}, now src-7x-new"
        )),
        "{out}"
    );
    let images = http.json("/api/images");
    assert_eq!(images["images"][0]["outdated"]["current"], "src-7x-new", "{images:#}");
    std::fs::remove_file(site.out.join("fail")).unwrap();
    let (code, out, err) = site.cli(&["rebuild", "--outdated"]);
    assert_eq!(code, 0, "{out}{err}");
    while jobs().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "{}{}", d1.output(), d2.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(jobs()[0]["state"], "succeeded", "{:#?}", jobs());
    let last = site.starts().last().cloned().unwrap();
    assert_eq!(last[3], "src-7x-new", "{last:?}");
    drop(d1);
    drop(d2);
}

#[test]
fn a_running_job_names_its_daemon_and_links_to_its_page() {
    let (site, url) = site_on_postgres();
    site.template("a.json", Step { sleep: 30.0, exit: 0 });
    let d2_site = Site::joining(&site, 1, &keys(&url, "d2"));
    let d2 = d2_site.start();
    let d2_addr = d2.status_addr();
    d2.wait_log("Consuming from queue", T);
    let d1 = site.start();
    let d1_http = Http::new(d1.status_addr());
    // Two long builds: one on each daemon (one worker each).
    site.publish(
        &profile("long", "7x", "a", json!({"name": "prod", "type": "domain"})),
        Some("m1"),
    );
    site.publish(&profile("other", "7x", "a", prod()), Some("m2"));
    let running = wait_json(&d1_http, "/api/jobs?state=running", "two running jobs", |v| {
        v["jobs"].as_array().is_some_and(|j| j.len() == 2)
    });
    let on_d2 = running["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["host"] == "d2")
        .cloned()
        .unwrap_or_else(|| panic!("{running:#}"));
    let id = on_d2["id"].as_i64().unwrap();
    let url = on_d2["host_url"].as_str().unwrap_or_else(|| panic!("{on_d2:#}"));
    assert!(url.ends_with(&format!(":{}/", d2_addr.port())), "{url}");
    // Its live log is on d2's page, and d1 says so.
    let (status, body) = d1_http.get(&format!("/api/jobs/{id}/log"));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("it runs on d2"), "{body}");
    assert!(body.contains(&format!(":{}/jobs/{id}", d2_addr.port())), "{body}");
    let d2_http = Http::new(d2_addr);
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, body) = d2_http.get(&format!("/api/jobs/{id}/log"));
        assert_eq!(status, 200, "{body}");
        if body.contains("building, with a comma") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // `status` on d1 names the host of each running job.
    let (code, out, err) = site.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("on d1/Thread-1"), "{out}");
    assert!(out.contains("on d2/Thread-1"), "{out}");
    drop(d1);
    drop(d2);
}

#[test]
fn a_message_id_and_profile_header_with_nul_are_journaled_and_built() {
    let (site, _) = site_on_postgres();
    let d = site.start();
    d.wait_log("Consuming from queue", T);
    let body = serde_json::to_vec(&profile("nul", "7x", "a", prod())).unwrap();
    publish_all_as(
        &site.queue.broker,
        &site.queue.name,
        &[(body.clone(), Some("id\u{0}one".to_string()))],
        "host\u{0}.example.org.json",
    );
    let deadline = std::time::Instant::now() + T;
    let history = loop {
        let (code, out, err) = site.cli(&["history", "--json"]);
        assert_eq!(code, 0, "{err}");
        let h: Vec<Value> = serde_json::from_str(&out).unwrap();
        if !h.is_empty() {
            break h;
        }
        assert!(std::time::Instant::now() < deadline, "{}", d.output());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(history[0]["state"], "succeeded", "{history:#?}");
    assert_eq!(history[0]["message_id"], "id\u{fffd}one", "{history:#?}");
    assert_eq!(history[0]["profile"], "host\u{fffd}.example.org.json", "{history:#?}");
    // A redelivery of it is the same job.
    publish_raw(&site.queue.broker, &site.queue.name, body, Some("id\u{0}one"));
    d.wait_log("is already job", T);
    assert_eq!(site.queue_len(), 0);
}

/// A daemon started while the site journal does not answer starts all the
/// same (consuming and claiming wait), and once it answers, joins: what it
/// was building when it was killed is given back and built again, and the
/// requests that came meanwhile are journaled and built.
#[test]
fn a_daemon_started_while_the_database_is_down_waits_for_it_and_gives_back_what_it_ran() {
    let pg = PrivatePostgres::start().expect("a private PostgreSQL (Debian's postgresql package)");
    let url = pg.database("site_down").unwrap();
    let site = Site::new(1, &keys(&url, "d1"));
    site.template("a.json", Step { sleep: 1.5, exit: 0 });
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    site.publish(&profile("killed", "7x", "a", prod()), Some("k1"));
    let first = site.wait_runs("the build started", T, |r| !r.is_empty())[0].clone();
    // The daemon dies with its build (as with its host).
    d.signal(libc::SIGKILL);
    let pgid: i32 = first[4].parse().unwrap();
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
    d.wait_exit(T);
    pg.stop(false).unwrap();
    let d = site.start();
    d.wait_log("starting all the same", T);
    d.wait_log("Ready:", T);
    site.publish(&profile("meanwhile", "7x", "a", prod()), Some("m1"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(site.queue_len(), 1, "nothing is acked unjournaled:\n{}", d.output());
    pg.start_again().unwrap();
    d.wait_log(
        "job 1 for killed-sl7x-x86_64 given back (d1 started again): it runs again",
        T,
    );
    let deadline = std::time::Instant::now() + T;
    let history = loop {
        let (code, out, err) = site.cli(&["history", "--json"]);
        let h: Vec<Value> = if code == 0 {
            serde_json::from_str(&out).unwrap()
        } else {
            Vec::new()
        };
        if h.len() == 2 {
            break h;
        }
        assert!(std::time::Instant::now() < deadline, "{err}{}", d.output());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(history.iter().all(|j| j["state"] == "succeeded"), "{history:#?}");
    let killed = history.iter().find(|j| j["image_key"] == "killed-sl7x-x86_64").unwrap();
    assert_eq!(killed["attempts"], 2, "{killed:#}");
    let starts: Vec<String> = site.starts().iter().map(|r| r[2].clone()).collect();
    assert_eq!(
        starts,
        ["sl7x-x86_64 killed", "sl7x-x86_64 killed", "sl7x-x86_64 meanwhile"],
        "{}",
        d.output()
    );
}
