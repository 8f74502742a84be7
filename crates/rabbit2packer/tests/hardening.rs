//! rabbit2packer under the faults operators meet (issue #16): a journal
//! deleted or unwritable, a full STATE_DIR or LOG_DIR (real tmpfs mounts),
//! a deleted lock, a packer that cannot start, broken reloads, hostile
//! values and large messages. Real daemon, RabbitMQ and packer, as in
//! `daemon.rs`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rabbit2packer::journal::JobState;
use serde_json::{json, Value};
use support::*;

/// How long a daemon that should stop by itself is given.
const EXIT: Duration = Duration::from_secs(60);

fn journal_files(state_dir: &Path) -> Vec<std::path::PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| state_dir.join(format!("rabbit2packer.sqlite{s}")))
        .collect()
}

#[test]
fn a_deleted_journal_is_noticed_before_the_ack_and_the_request_waits_in_the_queue() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 0.1, exit: 0 });
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "v1", prod()), Some("before"));
    site.wait_jobs("the first build", T, |j| succeeded(j) == 1);

    // A clean-up script, or an operator "resetting" state.
    for f in journal_files(&site.state_dir) {
        let _ = std::fs::remove_file(f);
    }
    site.publish(&profile("inventory", "7x", "v2", prod()), Some("after"));
    let code = d.wait_exit(EXIT);
    let out = d.output();
    assert_eq!(code, 1, "exit status (systemd restarts on failure); it said:\n{out}");
    assert!(
        out.contains("rabbit2packer.sqlite") && out.contains("deleted"),
        "the error names the journal and what happened to it:\n{out}"
    );
    assert_eq!(site.queue_len(), 1, "the request is the broker's again");

    // The restarted daemon builds it, on a journal that is on disk.
    let mut d = site.start();
    let jobs = site.wait_jobs("the request accepted after the rm", T, |j| {
        j.iter()
            .any(|j| j.message_id.as_deref() == Some("after") && j.state == JobState::Succeeded)
    });
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    d.stop();
}

#[test]
fn a_malformed_message_that_cannot_be_saved_stays_with_the_broker_until_it_is() {
    let site = Site::new(1, "");
    let state = Tmpfs::mount(&site.state_dir, "2m");
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    let filler = state.fill();

    let body = b"this is { not json, and kept whole";
    site.publish_bytes(body, Some("broken-on-full-disk"));
    let line = d.wait_log("could not be saved", T);
    assert!(line.contains("broken-on-full-disk"), "{line}");
    assert!(line.contains("returned to the queue"), "{line}");

    // Space again: the next delivery of it is saved, then acked.
    std::fs::remove_file(filler).unwrap();
    let rejected = site.state_dir.join("rejected");
    wait_for("the message saved to rejected/", EXIT, || {
        std::fs::read_dir(&rejected)
            .map(|mut e| e.next().is_some())
            .unwrap_or(false)
    });
    let saved: Vec<Vec<u8>> = std::fs::read_dir(&rejected)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(saved, vec![body.to_vec()]);
    d.wait_log("saved whole to", T);
    wait_for("the queue to be empty", T, || site.queue_len() == 0);
    assert!(site.journal().is_empty(), "rejected messages are not jobs");
    d.stop();
}

#[test]
fn a_second_daemon_refuses_to_start_even_when_every_file_but_the_journal_was_deleted() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 30.0, exit: 0 });
    let mut first = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let runs = site.wait_runs("the first daemon's build to start", T, |r| !r.is_empty());
    let pgid: i32 = runs[0][4].parse().unwrap();

    // Whatever lock file there is, a clean-up script removes it.
    for entry in std::fs::read_dir(&site.state_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_file() && !name.starts_with("rabbit2packer.sqlite") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let mut second = site.start();
    assert_eq!(second.wait_exit(EXIT), 2, "{}", second.output());
    let out = second.output();
    assert!(
        out.contains("STATE_DIR") && out.contains(&format!("another rabbit2packer (pid {})", first.pid())),
        "{out}"
    );
    assert!(group_alive(pgid), "the first daemon's build goes on");
    assert_eq!(site.starts().len(), 1, "and is not started again");
    first.stop();
}

#[test]
fn an_unwritable_journal_is_a_configuration_error_naming_the_file_its_owner_and_mode() {
    let site = Site::new(1, "");
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    d.stop();
    let journal = site.state_dir.join("rabbit2packer.sqlite");
    let chmod = |mode| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // Root writes whatever the mode says: the daemon runs as root without
    // CAP_DAC_OVERRIDE, bound by mode bits as any other user is.
    let as_bound_root = [
        "setpriv",
        "--bounding-set",
        "-dac_override,-dac_read_search",
        "--inh-caps",
        "-dac_override,-dac_read_search",
        "--",
    ];

    chmod(0o444);
    let mut d = site.start_via(&as_bound_root, &[]);
    let code = d.wait_exit(EXIT);
    let out = d.output();
    assert_eq!(code, 2, "a configuration error, not retried by systemd:\n{out}");
    assert!(out.contains(&journal.display().to_string()), "{out}");
    assert!(out.contains("owner root (0)") && out.contains("mode 0444"), "{out}");

    // Restored from a backup with the wrong owner.
    chmod(0o644);
    std::os::unix::fs::chown(&journal, Some(65534), Some(65534)).unwrap();
    let mut d = site.start_via(&as_bound_root, &[]);
    let code = d.wait_exit(EXIT);
    let out = d.output();
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("owner nobody (65534)") && out.contains("mode 0644"),
        "{out}"
    );
}

#[test]
fn a_full_log_dir_still_prunes_old_logs_and_keeps_the_build_result() {
    let site = Site::new(1, "LOG_KEEP = 1");
    site.template("a.json", Step { sleep: 0.1, exit: 0 });
    let logs = Tmpfs::mount(&site.log_dir, "1m");
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "v1", prod()), None);
    site.wait_jobs("the first build", T, |j| succeeded(j) == 1);
    let _filler = logs.fill();
    for n in 2..=3 {
        site.publish(&profile("inventory", "7x", &format!("v{n}"), prod()), None);
        site.wait_jobs("a build on a full LOG_DIR", T, |j| succeeded(j) == n);
    }
    let kept = site.logs("inventory-sl7x-x86_64.a.json");
    assert_eq!(kept.len(), 1, "LOG_KEEP = 1: {kept:?}");
    for job in site.journal() {
        assert!(
            job.builds[0]
                .artifact_id
                .as_deref()
                .is_some_and(|a| a.starts_with("Null")),
            "the artifact learned during the build is recorded: {job:#?}"
        );
    }
    d.stop();
}

#[test]
fn a_packer_that_cannot_be_started_is_reported_as_not_started() {
    let site = Site::new(1, "");
    // PACKER_PATH is checked at start-up; then it goes (a package upgrade half done).
    let packer = site.dir.path().join("packer");
    std::os::unix::fs::symlink(PACKER, &packer).unwrap();
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        text.replace(
            &format!("PACKER_PATH = {PACKER}"),
            &format!("PACKER_PATH = {}", packer.display()),
        ),
    )
    .unwrap();
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    std::fs::remove_file(&packer).unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let jobs = site.wait_jobs("the failed job", T, |j| in_state(j, JobState::Failed).len() == 1);
    assert!(jobs[0].error.as_deref().unwrap().contains("PACKER_PATH"), "{jobs:#?}");
    let line = d.wait_log("packer could not be started", Duration::from_secs(10));
    assert!(line.contains("inventory-sl7x-x86_64.a.json"), "{line}");
    assert_eq!(d.count("packer exited with non zero exit code"), 0, "{}", d.output());
    d.stop();
}

#[test]
fn every_sighup_names_each_broken_file() {
    let site = Site::new(1, "");
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    std::fs::write(&site.map, "{\"DEFAULT\": [").unwrap();
    std::fs::write(&site.images, "[\"not an object\"]").unwrap();
    let (map, images) = (site.map.display().to_string(), site.images.display().to_string());

    d.signal(libc::SIGHUP);
    let line = d.wait_log("keeping the last good version", T);
    assert!(
        line.contains(&map) && line.contains(&images),
        "both files are named: {line}"
    );
    d.signal(libc::SIGHUP);
    let again = d.wait_log("still in use", Duration::from_secs(10));
    assert!(again.contains(&map) && again.contains(&images), "{again}");
    // The last good version builds meanwhile.
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("the build", T, |j| succeeded(j) == 1);
    d.stop();
}

#[test]
fn an_overlong_personality_is_refused_naming_the_limit_and_showing_only_its_start() {
    let site = Site::new(1, "");
    let mut d = site.start();
    let long = "a".repeat(10_000);
    site.publish(&profile(&long, "7x", "a", prod()), Some("long-name"));
    let line = d.wait_log("message long-name", T);
    assert!(line.contains("1 to 128 characters"), "the limit is named: {line}");
    assert!(line.contains("(10000 characters)"), "{line}");
    assert!(line.len() < 1_000, "the value is cut: {} characters logged", line.len());
    d.stop();
}

#[test]
fn control_characters_never_break_the_lines_of_status_and_history() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 2.0, exit: 0 });
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "v1", prod()), Some("m1"));
    site.wait_runs("the first build to start", T, |r| !r.is_empty());
    let hostile = "host.example.org\n#99 fake-sl7x-x86_64 succeeded\u{1b}[2J";
    publish_all_as(
        &site.queue.broker,
        &site.queue.name,
        &[(
            serde_json::to_vec(&profile("inventory", "7x", "v2", prod())).unwrap(),
            Some("m2\r".into()),
        )],
        hostile,
    );
    site.wait_jobs("the waiting job", T, |j| j.len() == 2);
    let escaped = "host.example.org\\n#99 fake-sl7x-x86_64 succeeded\\u{1b}[2J";
    let (code, out, err) = site.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(escaped), "{out}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    assert_eq!(out.lines().filter(|l| l.starts_with("  #")).count(), 2, "{out}");

    site.wait_jobs("both builds", T, |j| succeeded(j) == 2);
    let (code, out, _) = site.cli(&["history"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    // Each job: its line and its build's line.
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].contains(escaped) && lines[0].ends_with("message m2\\r"),
        "{out:?}"
    );
    d.stop();
}

/// A profile of about `size` bytes: a real one's bulk is its software
/// components and packages, thousands of small objects.
fn big_profile(size: usize) -> Value {
    let mut v = profile("inventory", "7x", "big", prod());
    let mut packages = serde_json::Map::new();
    let mut n = 0;
    let mut bytes = 0;
    while bytes < size {
        let name = format!("package-number-{n}");
        bytes += name.len() + 90;
        packages.insert(
            name,
            json!({"version": "1.2.3-4.el7", "arch": ["x86_64"], "repository": format!("repo_{}", n % 50)}),
        );
        n += 1;
    }
    v["software"] = json!({ "packages": packages });
    v
}

#[test]
fn a_40_mb_message_costs_bounded_memory_and_its_journal_space_comes_back() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 0.1, exit: 0 });
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    let body = serde_json::to_vec(&big_profile(40 << 20)).unwrap();
    let before = peak_rss(d.pid());
    site.publish_bytes(&body, Some("big"));
    site.wait_jobs("the big build", T, |j| succeeded(j) == 1);
    let grown = peak_rss(d.pid()).saturating_sub(before);
    let ratio = grown as f64 / body.len() as f64;
    eprintln!(
        "message {} MB, peak RSS grew {} MB ({ratio:.2}x)",
        body.len() >> 20,
        grown >> 20
    );
    assert!(ratio < 2.5, "peak RSS grew {ratio:.2}x the message");

    // A newer, small profile of the image: the big body is not needed any more.
    site.publish(&profile("inventory", "7x", "small", prod()), Some("small"));
    site.wait_jobs("the small build", T, |j| succeeded(j) == 2);
    // Given back once the small job is recorded as finished.
    let on_disk = || -> Vec<(String, u64)> {
        journal_files(&site.state_dir)
            .iter()
            .filter_map(|f| Some((f.display().to_string(), std::fs::metadata(f).ok()?.len())))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while on_disk().iter().map(|(_, n)| n).sum::<u64>() >= 8 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the journal did not give the space back: {:?}",
            on_disk()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.stop();
}

/// Issue #13: RabbitMQ as a three-node cluster with a quorum queue. The
/// node cdb2rabbit and two daemons (on one site journal) are connected to
/// (the first of RABBIT_HOST, the quorum queue's leader) is stopped while
/// cdb2rabbit publishes (its downloads are slowed so that the run spans the
/// stop) and the daemons consume: each goes on with the next node, and every
/// change is built, none twice.
#[test]
fn a_cluster_node_stopped_while_cdb2rabbit_publishes_and_the_daemons_consume_loses_and_repeats_nothing() {
    use packuilon_testsupport::broker::PrivateCluster;
    use packuilon_testsupport::http::ProfileServer;
    use packuilon_testsupport::site::{profile as aquilon_profile, write_index};
    use std::time::Instant;

    const CHANGES: usize = 24;
    let began = Instant::now();
    let cluster = PrivateCluster::start().unwrap();
    let cluster_up = began.elapsed();
    let [first, second, _] = [0, 1, 2].map(|i| cluster.nodes[i].addr.port);
    let pg = packuilon_testsupport::postgres::PrivatePostgres::shared()
        .expect("a private PostgreSQL (Debian's postgresql package)");
    let url = pg.database("cluster").unwrap();
    let site = Site::on(
        &cluster.nodes[0].addr,
        2,
        &format!("STATE_DB = {url}\nHOST_NAME = d1\n"),
    );
    let site2 = Site::joining(&site, 2, &format!("STATE_DB = {url}\nHOST_NAME = d2\n"));
    site.template("a.json", Step { sleep: 0.0, exit: 0 });
    let global_lines = |retry_delay: &str| {
        format!(
            "[global]\nQUEUE = {}\nQUEUE_TYPE = quorum\nRABBIT_HOST = {}\nRABBIT_PORT = 5672\n\
             RABBIT_USER = guest\nRABBIT_PW = guest\nRABBIT_RETRY_DELAY = {retry_delay}\n",
            site.queue.name,
            cluster.rabbit_host()
        )
    };
    for s in [&site, &site2] {
        let daemon_config = std::fs::read_to_string(&s.config).unwrap();
        let r2p_section = &daemon_config[daemon_config.find("[rabbit2packer]").unwrap()..];
        std::fs::write(&s.config, format!("{}\n{r2p_section}", global_lines("0.5"))).unwrap();
    }

    // The Aquilon side: CHANGES CI profiles, one personality each.
    let www = site.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let names: Vec<String> = (1..=CHANGES).map(|n| format!("ha{n:02}")).collect();
    let serve = |revision: &str, mtime: u64| {
        for p in &names {
            let body = aquilon_profile(p, &[revision]).to_string();
            std::fs::write(www.join(format!("{p}.ci.json")), body).unwrap();
        }
        let files: Vec<String> = names.iter().map(|p| format!("{p}.ci.json")).collect();
        let entries: Vec<(&str, u64)> = files.iter().map(|f| (f.as_str(), mtime)).collect();
        write_index(&www, &entries);
    };
    serve("rev-1", 100);
    let server = ProfileServer::serve(&www);
    let cdb_config = site.dir.path().join("cdb2rabbit.ini");
    std::fs::write(
        &cdb_config,
        format!(
            "{}\n[cdb2rabbit]\nPROFILE_INFO_URL = {}\nPROFILE_DIR_URL = {}\nPROFILE_MATCH = .ci.\n\
             CACHE_DIR = {}\nDOWNLOAD_CONCURRENCY = 2\n",
            global_lines("0.2"),
            server.url("profiles-info.xml"),
            server.base,
            site.dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let cdb2rabbit = || {
        let mut cmd = Command::new(packuilon_testsupport::workspace_bin("cdb2rabbit"));
        cmd.arg("--config")
            .arg(&cdb_config)
            .args(["--log", "stderr"])
            .env("PACKUILON_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    // The first run records the baseline.
    let baseline = cdb2rabbit().output().unwrap();
    assert!(
        baseline.status.success(),
        "{}",
        String::from_utf8_lossy(&baseline.stderr)
    );

    let mut d = site.start();
    let mut d2 = site2.start();
    for d in [&d, &d2] {
        d.wait_log(&format!("Connected to RabbitMQ at amqp://127.0.0.1:{first}/"), T);
        d.wait_log("Consuming from queue", T);
    }

    // Every profile changes; the web server is slow, so the run takes seconds.
    serve("rev-2", 101);
    server.set_latency(Duration::from_millis(400));
    let run = cdb2rabbit().spawn().unwrap();
    site.wait_jobs("the first changes journaled", T, |j| j.len() >= 3);
    let stopped_at = site.journal().len();
    cluster.stop(0).unwrap();
    let out = run.wait_with_output().unwrap();
    let published = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "cdb2rabbit:\n{published}");
    assert!(
        stopped_at < CHANGES && published.contains("Lost the connection to RabbitMQ"),
        "the node was not stopped while cdb2rabbit published ({stopped_at} journaled):\n{published}"
    );
    assert!(
        published.contains(&format!("Connected to RabbitMQ at amqp://127.0.0.1:{second}/")),
        "cdb2rabbit goes on with the next node:\n{published}"
    );

    let jobs = site.wait_jobs("every change built", T, |j| succeeded(j) >= CHANGES);
    for d in [&d, &d2] {
        d.wait_log(&format!("Connected to RabbitMQ at amqp://127.0.0.1:{second}/"), T);
        assert!(d.count("reconnecting to channel") >= 1, "{}", d.output());
    }
    let mut keys: Vec<&str> = jobs.iter().map(|j| j.image_key.as_str()).collect();
    keys.sort();
    let want: Vec<String> = names.iter().map(|p| format!("{p}-sl7x-x86_64")).collect();
    assert_eq!(keys, want, "one job per change, none twice: {jobs:#?}");
    assert!(jobs.iter().all(|j| j.state == JobState::Succeeded), "{jobs:#?}");
    let mut built: Vec<String> = site.starts().into_iter().map(|r| r[2].clone()).collect();
    built.sort();
    let want: Vec<String> = names.iter().map(|p| format!("sl7x-x86_64 {p}")).collect();
    assert_eq!(built, want, "each change built once");
    // Each from cdb2rabbit's message for the profile (the baseline run published nothing).
    assert!(
        jobs.iter()
            .all(|j| j.profile.as_deref()
                == Some(&format!("{}.ci.json", j.image_key.trim_end_matches("-sl7x-x86_64"))[..])),
        "{jobs:#?}"
    );

    // Both queues are quorum queues, replicated on the nodes left.
    let types = cluster.nodes[1].queue_types().unwrap();
    for queue in [site.queue.name.clone(), format!("{}.rejected", site.queue.name)] {
        assert!(types.contains(&(queue.clone(), "quorum".into())), "{queue}: {types:?}");
    }
    d.stop();
    d2.stop();
    eprintln!(
        "cluster up in {cluster_up:?}; the whole test took {:?}",
        began.elapsed()
    );
}
