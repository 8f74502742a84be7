//! cdb2rabbit end to end: the real binary, a real HTTP server serving an
//! Aquilon-like profiles directory, the real RabbitMQ. Each test has its own
//! site directory, cache directory, HTTP port and queue.

mod support;

use std::time::Duration;

use packuilon_testsupport::http::{Fault, Refusal};
use support::{profile, Site};

#[test]
fn first_run_records_the_baseline_and_publishes_nothing() {
    let site = Site::new("ci-");
    site.put("ci-a.example.org.json", &profile("a", 1), 100);
    site.put("other.example.org.json", &profile("b", 1), 200);
    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&["Starting", "Cached info file does not exist, creating one and exiting"]);
    assert!(site.published().is_empty());
    assert_eq!(
        site.cached_mtimes(),
        support::mt([("ci-a.example.org.json", 100), ("other.example.org.json", 200)])
    );
    // The broker was never contacted: the queue does not exist.
    assert!(!site.queue_exists());
}

#[test]
fn a_changed_profile_is_published_once_and_only_once() {
    let site = Site::new("ci-").with_baseline(&["ci-a.example.org.json", "ci-b.example.org.json"]);

    let body = site.put("ci-a.example.org.json", &profile("a", 2), 101);
    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&[
        "Starting",
        "CI profile rebuilt: ci-a.example.org.json",
        "Downloading profile ci-a.example.org.json",
        "Profile has updated: ci-a.example.org.json",
        "Pushing message to queue for build",
        "Updating cached profile_info",
        "Exiting normally",
    ]);
    assert!(!out.stderr.contains("ci-b.example.org.json"), "{}", out.stderr);

    let msgs = site.published();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.body, body, "the body is the profile exactly as served");
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.app_id.as_deref(), Some("cdb2rabbit"));
    assert_eq!(m.delivery_mode, Some(2), "persistent");
    assert!(m.timestamp.is_some_and(|t| t > 1_600_000_000));
    let id = m.message_id.clone().expect("message id");
    assert!(out.stderr.contains(&format!("message id {id}")), "{}", out.stderr);
    assert_eq!(m.profile_header.as_deref(), Some("ci-a.example.org.json"));
    assert_eq!(site.cached_copy("ci-a.example.org.json").as_deref(), Some(&body[..]));
    assert_eq!(site.cached_mtime("ci-a.example.org.json"), Some(101));
    assert_eq!(site.cached_mtime("ci-b.example.org.json"), Some(100));
    assert_eq!(site.temp_files(), Vec::<String>::new());

    use std::os::unix::fs::MetadataExt;
    let inode = || std::fs::metadata(site.cache().join("cached_info.xml")).unwrap().ino();
    let before = inode();
    let again = site.run(&[]);
    again.assert_status(0);
    assert!(site.published().is_empty(), "published twice");
    assert!(!again.stderr.contains("Downloading"), "{}", again.stderr);
    // Nothing changed: the cached index is left as it is, not rewritten.
    again.assert_logs_in_order(&["Cached profile_info is up to date", "Exiting normally"]);
    assert_eq!(inode(), before, "cached_info.xml was rewritten");
}

#[test]
fn a_new_profile_after_the_baseline_is_published() {
    let site = Site::new("ci-").with_baseline(&["ci-a.example.org.json"]);
    site.put("ci-new.example.org.json", &profile("new", 1), 5);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-new.example.org.json"]);
}

#[test]
fn an_mtime_change_with_identical_json_is_not_published() {
    let site = Site::new("ci-").with_baseline(&["ci-a.example.org.json"]);
    site.put("ci-a.example.org.json", &profile("a", 2), 101);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published().len(), 1);

    // Recompiled: new mtime, same content laid out differently (key order, whitespace).
    let v = profile("a", 2);
    let mut reordered = serde_json::Map::new();
    for (k, val) in v.as_object().unwrap().iter().rev() {
        reordered.insert(k.clone(), val.clone());
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(reordered)).unwrap();
    site.put_raw("ci-a.example.org.json", text.as_bytes(), 102);
    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&["Profile has not updated: ci-a.example.org.json", "Exiting normally"]);
    assert!(site.published().is_empty());
    assert_eq!(site.cached_mtime("ci-a.example.org.json"), Some(102));
}

#[test]
fn profile_match_selects_which_profiles_are_published() {
    let site = Site::new("ci-").with_baseline(&["ci-a.example.org.json", "web.example.org.json"]);
    site.put("ci-a.example.org.json", &profile("a", 2), 101);
    site.put("web.example.org.json", &profile("web", 2), 101);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.example.org.json"]);
    // The other profile's change is recorded all the same.
    assert_eq!(site.cached_mtime("web.example.org.json"), Some(101));
    assert!(site.cached_copy("web.example.org.json").is_none());
}

#[test]
fn blank_profile_match_publishes_every_changed_profile() {
    let site = Site::new("").with_baseline(&["ci-a.example.org.json", "web.example.org.json"]);
    site.put("ci-a.example.org.json", &profile("a", 2), 101);
    site.put("web.example.org.json", &profile("web", 2), 101);
    site.run(&[]).assert_status(0);
    assert_eq!(
        site.published_names(),
        ["ci-a.example.org.json", "web.example.org.json"]
    );
}

#[test]
fn namespaced_profiles_are_fetched_and_cached_under_their_path() {
    let site = Site::new("ci-")
        .with_dir_url_slash(false)
        .with_baseline(&["ns/sub/ci-a.example.org.json"]);
    let body = site.put("ns/sub/ci-a.example.org.json", &profile("a", 2), 101);
    site.run(&[]).assert_status(0);
    let msgs = site.published();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].profile_header.as_deref(), Some("ns/sub/ci-a.example.org.json"));
    assert!(site
        .server
        .requests()
        .contains(&"profiles/ns/sub/ci-a.example.org.json".to_string()));
    assert_eq!(
        site.cached_copy("ns/sub/ci-a.example.org.json").as_deref(),
        Some(&body[..])
    );
}

#[test]
fn gzip_files_are_read_whatever_the_index_and_profiles_are_called() {
    let site = Site::new("ci-")
        .with_gzip_index_file()
        .with_baseline(&["ci-a.example.org.json.gz"]);
    let body = site.put("ci-a.example.org.json.gz", &profile("a", 2), 101);
    site.run(&[]).assert_status(0);
    let msgs = site.published();
    assert_eq!(msgs.len(), 1);
    // What is published is the JSON itself, never gzip.
    assert_eq!(msgs[0].body, body);
    serde_json::from_slice::<serde_json::Value>(&msgs[0].body).unwrap();
}

#[test]
fn gzip_content_encoding_is_undone() {
    let site = Site::new("ci-");
    site.put("ci-a.example.org.json", &profile("a", 1), 100);
    site.server.set_fault("profiles-info.xml", Fault::GzipEncoding);
    site.server
        .set_fault("profiles/ci-a.example.org.json", Fault::GzipEncoding);
    site.run(&[]).assert_status(0);
    let body = site.put("ci-a.example.org.json", &profile("a", 2), 101);
    site.run(&[]).assert_status(0);
    let msgs = site.published();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body, body);
}

#[test]
fn failed_downloads_are_retried_by_the_next_run_and_others_still_publish() {
    let site = Site::new("ci-").with_extra_cdb("HTTP_TIMEOUT = 1\n").with_baseline(&[
        "ci-e500.json",
        "ci-slow.json",
        "ci-notjson.json",
        "ci-good.json",
    ]);
    for n in ["e500", "slow", "good"] {
        site.put(&format!("ci-{n}.json"), &profile(n, 2), 101);
    }
    site.put_raw("ci-notjson.json", b"{\"system\": ", 101);
    site.server.set_fault("profiles/ci-e500.json", Fault::Status(500));
    site.server
        .set_fault("profiles/ci-slow.json", Fault::Delay(Duration::from_secs(3)));

    let out = site.run(&[]);
    out.assert_status(1);
    assert_eq!(site.published_names(), ["ci-good.json"]);
    out.assert_logs_in_order(&["ci-e500.json: HTTP status 500"]);
    out.assert_logs_in_order(&["ci-slow.json: timed out after 1s (HTTP_TIMEOUT)"]);
    out.assert_logs_in_order(&["ci-notjson.json: not valid JSON"]);
    out.assert_logs_in_order(&["3 profile(s) failed and will be retried by the next run"]);
    assert!(!out.stderr.contains("Exiting normally"));
    assert_eq!(
        site.temp_files(),
        Vec::<String>::new(),
        "the index written ahead was left behind"
    );
    // Failures keep their old mtime; the rest advance.
    assert_eq!(
        site.cached_mtimes(),
        support::mt([
            ("ci-e500.json", 100),
            ("ci-good.json", 101),
            ("ci-notjson.json", 100),
            ("ci-slow.json", 100)
        ])
    );

    site.server.clear_faults();
    site.put("ci-notjson.json", &profile("notjson", 2), 102);
    let out = site.run(&[]);
    out.assert_status(0);
    assert_eq!(
        site.published_names(),
        ["ci-e500.json", "ci-notjson.json", "ci-slow.json"]
    );
}

#[test]
fn a_download_the_server_does_not_answer_is_asked_for_again_but_a_slow_body_is_not() {
    let quick: Vec<String> = (0..6).map(|n| format!("ci-quick{n}.json")).collect();
    // The quick ones first: a download started before the server answered
    // anything is given longer (STALL_FIRST).
    let mut names = vec!["ci-dribble.json".to_string()];
    names.extend(quick.iter().cloned());
    names.push("ci-zlate.json".to_string());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let site = Site::new("ci-").with_baseline(&names);
    let asked = |path: &str| site.server.requests().iter().filter(|r| *r == path).count();

    // No answer for 200 ms, as after a SYN dropped by a full listen backlog
    // (whose retransmit would take a second).
    site.put("ci-zlate.json", &profile("late", 2), 101);
    for (n, name) in quick.iter().enumerate() {
        site.put(name, &profile(&format!("quick{n}"), 2), 101);
    }
    site.server
        .set_fault("profiles/ci-zlate.json", Fault::Delay(Duration::from_millis(200)));
    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&["(a download went unanswered)"]);
    assert_eq!(asked("profiles/ci-zlate.json"), 2, "{}", out.stderr);

    // Answered at once, the second half of the body a second later.
    site.server.clear_faults();
    site.put("ci-dribble.json", &profile("dribble", 2), 101);
    for (n, name) in quick.iter().enumerate() {
        site.put(name, &profile(&format!("quick{n}"), 3), 102);
    }
    site.server
        .set_fault("profiles/ci-dribble.json", Fault::SlowBody(Duration::from_secs(1)));
    let out = site.run(&[]);
    out.assert_status(0);
    assert_eq!(asked("profiles/ci-dribble.json"), 1, "{}", out.stderr);
    assert!(!out.stderr.contains("went unanswered"), "{}", out.stderr);
    assert!(site.published_names().contains(&"ci-dribble.json".to_string()));
}

#[test]
fn an_unreachable_broker_leaves_the_cache_untouched_and_the_next_run_publishes() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    let before = site.cache_snapshot();

    site.set_broker_port(Some(packuilon_testsupport::free_port()));
    let out = site.run(&[]);
    out.assert_status(1);
    out.assert_logs_in_order(&["Profile has updated: ci-a.json", "cannot reach RabbitMQ"]);
    assert!(out.stderr.contains("after 2 attempt(s)"), "{}", out.stderr);
    assert_eq!(site.cache_snapshot(), before, "cache changed");

    site.set_broker_port(None);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.json"]);
}

#[test]
fn a_truncated_or_invalid_index_is_an_error_and_leaves_the_cache_untouched() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json", "ci-b.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    let before = site.cache_snapshot();

    let len = std::fs::metadata(site.www().join("profiles-info.xml")).unwrap().len() as usize;
    site.server.set_fault("profiles-info.xml", Fault::Truncate(len - 15));
    let out = site.run(&[]);
    out.assert_status(1);
    assert!(out.stderr.contains("profiles-info.xml"), "{}", out.stderr);
    assert!(
        CUT_OFF_CAUSES.iter().any(|c| out.stderr.contains(c)),
        "the underlying cause is missing:\n{}",
        out.stderr
    );
    assert_eq!(site.cache_snapshot(), before);

    site.server.clear_faults();
    std::fs::write(
        site.www().join("profiles-info.xml"),
        "<html><body>Proxy error</body></html>",
    )
    .unwrap();
    let out = site.run(&[]);
    out.assert_status(1);
    out.assert_logs_in_order(&["root element is <html>, expected <profiles>"]);
    assert_eq!(site.cache_snapshot(), before);
    assert!(site.published().is_empty());
}

#[test]
fn two_runs_at_once_neither_corrupt_the_cache_nor_publish_twice() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    site.server
        .set_fault("profiles/ci-a.json", Fault::Delay(Duration::from_secs(2)));
    site.server.clear_requests();

    let first = site.spawn(&[]);
    // The first run holds the lock once it has asked for the index.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !site.server.requests().iter().any(|r| r == "profiles-info.xml") {
        assert!(
            std::time::Instant::now() < deadline,
            "first run never fetched the index"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = site.spawn(&[]);
    let first = support::finish(first);
    let second = support::finish(second);
    first.assert_status(0);
    second.assert_status(0);
    second.assert_logs_in_order(&["Another cdb2rabbit run holds", "Exiting normally"]);
    assert_eq!(site.published_names(), ["ci-a.json"]);
    assert_eq!(site.cached_mtime("ci-a.json"), Some(101));
}

#[test]
fn a_run_that_cannot_get_the_lock_in_time_fails_without_touching_anything() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    let lock = std::fs::File::open(site.cache().join(".cdb2rabbit.lock")).unwrap();
    lock.lock().unwrap();
    let out = site.run(&["--lock-wait", "0.3"]);
    out.assert_status(1);
    out.assert_logs_in_order(&["another cdb2rabbit run still holds the lock"]);
}

#[test]
fn all_publishes_every_matching_profile_and_records_them() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json", "ci-b.json", "web.json"]);
    let out = site.run(&["--all"]);
    out.assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.json", "ci-b.json"]);
    // Once more: --all publishes even when the JSON equals the cached copy.
    site.run(&["--all"]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.json", "ci-b.json"]);
    // And a normal run after it has nothing to do.
    site.run(&[]).assert_status(0);
    assert!(site.published().is_empty());
}

#[test]
fn all_on_a_first_run_publishes_and_records_the_baseline() {
    let site = Site::new("ci-");
    site.put("ci-a.json", &profile("a", 1), 100);
    site.put("web.json", &profile("web", 1), 100);
    site.run(&["--all"]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.json"]);
    assert_eq!(
        site.cached_mtimes(),
        support::mt([("ci-a.json", 100), ("web.json", 100)])
    );
}

#[test]
fn profile_publishes_the_named_profiles_and_leaves_other_changes_for_the_next_run() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json", "ci-b.json", "web.json"]);
    site.put("ci-b.json", &profile("b", 2), 101);

    let out = site.run(&[
        "--profile",
        "ci-a.json",
        "--profile",
        "web.json",
        "--profile",
        "ci-a.json",
    ]);
    out.assert_status(0);
    // Named profiles are published whatever the cache and PROFILE_MATCH say.
    assert_eq!(site.published_names(), ["ci-a.json", "web.json"]);
    // ci-b's change was not looked at: still pending.
    assert_eq!(site.cached_mtime("ci-b.json"), Some(100));

    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-b.json"]);
}

#[test]
fn profile_naming_a_profile_missing_from_the_index_is_an_error_naming_it() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    let out = site.run(&["--profile", "ci-gone.json", "--profile", "ci-a.json"]);
    out.assert_status(1);
    out.assert_logs_in_order(&["profile \"ci-gone.json\" is not in the index"]);
    assert_eq!(site.published_names(), ["ci-a.json"]);
}

#[test]
fn dry_run_prints_what_would_be_published_and_touches_neither_broker_nor_cache() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json", "ci-b.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    let before = site.cache_snapshot();
    let out = site.run(&["--dry-run"]);
    out.assert_status(0);
    assert_eq!(out.stdout, "would publish: ci-a.json\n");
    assert_eq!(site.cache_snapshot(), before);
    assert!(!site.queue_exists());

    // On a machine that never ran it, a dry run does not even create CACHE_DIR.
    let fresh = Site::new("ci-");
    fresh.put("ci-a.json", &profile("a", 1), 100);
    let out = fresh.run(&["--dry-run"]);
    out.assert_status(0);
    out.assert_logs_in_order(&[
        "Cached info file does not exist; a real run would record the index as the baseline and exit \
         (dry run: nothing written)",
    ]);
    assert!(!out.stderr.contains("creating one"), "{}", out.stderr);
    assert!(!fresh.cache().exists());
}

#[test]
fn config_errors_name_the_file_section_and_key_and_exit_2() {
    let site = Site::new("ci-");
    let path = site.dir.path().join("broken.ini");
    let cases = [
        (
            site.config_text().replace("CACHE_DIR", "CACHE_DIRECTORY"),
            "[cdb2rabbit] CACHE_DIR: missing",
        ),
        (
            site.config_text().replace("RABBIT_PORT = ", "RABBIT_PORT = x"),
            "[global] RABBIT_PORT: must be",
        ),
        (
            site.config_text().replace("[cdb2rabbit]", "[cdb]"),
            "[cdb2rabbit] section is missing",
        ),
        (
            site.config_text()
                .replace("[cdb2rabbit]\n", "[cdb2rabbit]\nDOWNLOAD_CONCURRENCY = none\n"),
            "[cdb2rabbit] DOWNLOAD_CONCURRENCY: must be",
        ),
    ];
    for (text, wanted) in cases {
        std::fs::write(&path, text).unwrap();
        let out = site.run_with_config(&path, &[]);
        out.assert_status(2);
        assert!(
            out.stderr.contains(&format!("{}: {wanted}", path.display())),
            "{}",
            out.stderr
        );
    }
    let missing = site.dir.path().join("nowhere.ini");
    let out = site.run_with_config(&missing, &[]);
    out.assert_status(2);
    assert!(out.stderr.contains(&missing.display().to_string()), "{}", out.stderr);
    assert!(!site.cache().exists());
}

#[test]
fn the_config_path_comes_from_packer_utils_config_and_unknown_keys_only_warn() {
    let site = Site::new("ci-")
        .with_extra_cdb("PROFILE_MACTH = typo\n")
        .with_extra_global("PUBLISH_TIMEOUT = 90\nRABBIT_CONNECT_TIMEOUT = 5s\n");
    site.put("ci-a.json", &profile("a", 1), 100);
    let out = site.run_env_config(&[]);
    out.assert_status(0);
    assert!(
        out.stderr.contains("[cdb2rabbit] PROFILE_MACTH: unknown key, ignored"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("TIMEOUT"), "{}", out.stderr);
    assert!(site.cache().join("cached_info.xml").exists());
}

#[test]
fn the_cdp_listend_time_argument_is_accepted_and_ignored() {
    let site = Site::new("ci-");
    site.put("ci-a.json", &profile("a", 1), 100);
    site.run(&["1486571445"]).assert_status(0);
    site.put("ci-a.json", &profile("a", 2), 101);
    site.run(&["1486571999"]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.json"]);
}

#[test]
fn bad_index_entries_fail_alone_and_never_escape_the_cache_dir() {
    let site = Site::new("").with_baseline(&["ci-a.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    // Files a naive tool would fetch and write outside CACHE_DIR.
    std::fs::write(site.dir.path().join("evil.json"), "{}").unwrap();
    site.set_index_extra(
        "<profile mtime='5'>../evil.json</profile>\n\
         <profile mtime='5'>/etc/evil.json</profile>\n\
         <profile mtime='5'>ns//evil.json</profile>\n\
         <profile mtime='5'>ns\\evil.json</profile>\n\
         <profile>nomtime.json</profile>\n\
         <profile mtime='yesterday'>badmtime.json</profile>\n\
         <profile mtime='5'>dup.json</profile>\n<profile mtime='6'>dup.json</profile>\n",
    );
    let out = site.run(&[]);
    out.assert_status(1);
    for wanted in [
        "index entry \"../evil.json\": '.' or '..' segment",
        "index entry \"/etc/evil.json\": absolute profile name",
        "index entry \"ns//evil.json\": empty path segment",
        "index entry \"ns\\\\evil.json\": backslash",
        "index entry \"nomtime.json\" has no mtime attribute",
        "index entry \"badmtime.json\" has a non-numeric mtime \"yesterday\"",
        "index entry \"dup.json\" is listed more than once",
    ] {
        assert!(out.stderr.contains(wanted), "missing {wanted:?} in\n{}", out.stderr);
    }
    assert_eq!(site.published_names(), ["ci-a.json"]);
    assert_eq!(site.cached_mtimes(), support::mt([("ci-a.json", 101)]));
    let requests = site.server.requests();
    assert!(!requests.iter().any(|r| r.contains("evil")), "{requests:?}");
}

#[test]
fn a_profile_larger_than_64_mib_fails_alone() {
    let site = Site::new("ci-").with_baseline(&["ci-big.json", "ci-a.json"]);
    let mut big = b"{\"pad\": \"".to_vec();
    big.resize(65 * 1024 * 1024, b'x');
    big.extend_from_slice(b"\"}");
    site.put_raw("ci-big.json", &big, 101);
    site.put("ci-a.json", &profile("a", 2), 101);
    let out = site.run(&[]);
    out.assert_status(1);
    out.assert_logs_in_order(&["ci-big.json: larger than 67108864 bytes"]);
    assert_eq!(site.published_names(), ["ci-a.json"]);
    assert_eq!(site.cached_mtime("ci-big.json"), Some(100));
}

#[test]
fn a_nacked_publish_is_an_error_and_is_retried_by_the_next_run() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    // The broker refuses every message of this queue (a full queue that rejects publishes).
    let policy = support::Policy::set(&site.queue.name, r#"{"max-length": 0, "overflow": "reject-publish"}"#);
    let out = site.run(&[]);
    out.assert_status(1);
    out.assert_logs_in_order(&["Pushing message to queue for build", "broker refused (nack) ci-a.json"]);
    assert_eq!(site.cached_mtime("ci-a.json"), Some(100));
    assert!(site.cached_copy("ci-a.json").is_none());
    // The index written ahead for a successful run is not left behind.
    assert_eq!(site.temp_files(), Vec::<String>::new());
    drop(policy);

    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.json"]);
}

#[test]
fn a_profile_that_leaves_the_index_and_returns_unchanged_is_not_published_again() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json", "ci-b.json"]);
    site.put("ci-b.json", &profile("b", 2), 101);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-b.json"]);

    site.remove("ci-b.json");
    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&["Profile left the index: ci-b.json"]);
    assert_eq!(site.cached_mtimes(), support::mt([("ci-a.json", 100)]));
    assert!(site.cached_copy("ci-b.json").is_some(), "cached copy kept");

    // Back (host re-added), recompiled with the same content: no rebuild.
    site.put("ci-b.json", &profile("b", 2), 102);
    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&["Profile has not updated: ci-b.json", "Exiting normally"]);
    assert!(site.published().is_empty(), "rebuilt on its return");
    assert_eq!(site.cached_mtime("ci-b.json"), Some(102));

    // Back with a change after leaving again: published.
    site.remove("ci-b.json");
    site.run(&[]).assert_status(0);
    site.put("ci-b.json", &profile("b", 3), 103);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-b.json"]);
}

#[test]
fn xml_profiles_are_skipped_with_a_warning_and_not_retried() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    let xml = b"<?xml version='1.0' encoding='utf-8'?>\n<nlist format='pan' name='profile'/>\n";
    site.put_raw("ci-x.xml", xml, 101);
    site.put_raw("ci-y.xml.gz", xml, 101);
    site.put("ci-a.json", &profile("a", 2), 101);

    let out = site.run(&[]);
    out.assert_status(0);
    for name in ["ci-x.xml", "ci-y.xml.gz"] {
        out.assert_logs_in_order(&[&format!(
            "{name} is an XML profile; only JSON profiles are published \
             (check PROFILE_MATCH or the broker's output format); skipped"
        )]);
    }
    out.assert_logs_in_order(&["Exiting normally"]);
    assert!(!out.stderr.contains("not valid JSON"), "{}", out.stderr);
    assert_eq!(site.published_names(), ["ci-a.json"]);
    // Recorded as processed: the next run does not look at them again.
    assert_eq!(
        site.cached_mtimes(),
        support::mt([("ci-a.json", 101), ("ci-x.xml", 101), ("ci-y.xml.gz", 101)])
    );
    let again = site.run(&[]);
    again.assert_status(0);
    assert!(!again.stderr.contains("XML profile"), "{}", again.stderr);
}

#[test]
fn a_profile_download_cut_mid_body_names_the_url_and_the_cause() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    let body = site.put("ci-a.json", &profile("a", 2), 101);
    site.server
        .set_fault("profiles/ci-a.json", Fault::Truncate(body.len() / 2));
    let out = site.run(&[]);
    out.assert_status(1);
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("profiles/ci-a.json: "))
        .unwrap_or_else(|| panic!("no error naming the URL:\n{}", out.stderr));
    assert!(!line.contains("timed out"), "{line}");
    assert!(
        CUT_OFF_CAUSES.iter().any(|c| line.contains(c)),
        "the underlying cause is missing: {line}"
    );
    assert_eq!(site.cached_mtime("ci-a.json"), Some(100), "retried next run");
}

/// What hyper says when a body ends before its Content-Length.
const CUT_OFF_CAUSES: [&str; 3] = [
    "connection closed before message completed",
    "unexpected EOF",
    "end of file before message length reached",
];

#[test]
fn an_original_cache_directory_keeps_working() {
    let site = Site::new("ci-");
    site.put("ci-a.json", &profile("a", 1), 100);
    site.put("ci-b.json", &profile("b", 1), 100);
    // As the original left it: the broker's index saved as served, and a cached profile.
    std::fs::create_dir_all(site.cache()).unwrap();
    std::fs::write(
        site.cache().join("cached_info.xml"),
        "<?xml version='1.0' encoding='utf-8'?>\n<profiles>\n<profile mtime='100'>ci-a.json</profile>\n\
         <profile mtime='99'>ci-b.json</profile>\n</profiles>",
    )
    .unwrap();
    std::fs::write(
        site.cache().join("ci-b.json"),
        serde_json::to_vec(&profile("b", 1)).unwrap(),
    )
    .unwrap();
    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&["Profile has not updated: ci-b.json"]);
    assert!(site.published().is_empty());
    assert_eq!(
        site.cached_mtimes(),
        support::mt([("ci-a.json", 100), ("ci-b.json", 100)])
    );
}

#[test]
fn a_returned_message_is_an_error() {
    support::block_on(async {
        let broker = packuilon_testsupport::broker::BrokerAddr::shared();
        let conn = broker.connect().await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        // No queue of this name exists: with `mandatory` the broker returns the message.
        let nowhere = packuilon_testsupport::unique_name("cdb2rabbit-nowhere");
        let publisher = cdb2rabbit::publish::Publisher::on_channel(conn, channel, &nowhere)
            .await
            .unwrap();
        let pending = publisher.publish("ci-a.json", 1, b"{}").await.unwrap();
        let err = pending.confirmed().await.unwrap_err();
        assert!(
            matches!(err, cdb2rabbit::publish::PublishError::Returned { code: 312, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("returned ci-a.json"), "{err}");
        publisher.close().await;
    });
}

#[test]
fn profile_json_keeps_unicode_and_numbers_exactly() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    let raw = "{\"system\": {\"n\": 1.50, \"s\": \"caf\\u00e9 \u{2603}\"}}";
    site.put_raw("ci-a.json", raw.as_bytes(), 101);
    site.run(&[]).assert_status(0);
    let msgs = site.published();
    assert_eq!(msgs[0].body, raw.as_bytes());
}

#[test]
fn a_ca_bundle_without_certificates_is_a_config_error() {
    let site = Site::new("ci-");
    let bundle = site.dir.path().join("ca.pem");
    std::fs::write(&bundle, "not a certificate\n").unwrap();
    let site = site.with_extra_cdb(&format!("CA_BUNDLE = {}\n", bundle.display()));
    site.put("ci-a.json", &profile("a", 1), 100);
    let out = site.run(&[]);
    out.assert_status(2);
    out.assert_logs_in_order(&["[cdb2rabbit] CA_BUNDLE: cannot use"]);
    assert!(!site.cache().join("cached_info.xml").exists());
}

#[test]
fn file_urls_read_a_local_copy_of_the_profiles_directory() {
    let site = Site::new("ci-").with_file_urls().with_baseline(&["ns/ci-a.json"]);
    let body = site.put("ns/ci-a.json", &profile("a", 2), 101);
    site.run(&[]).assert_status(0);
    let msgs = site.published();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body, body);
    assert!(site.server.requests().is_empty(), "HTTP was used");
}

#[test]
fn an_empty_index_is_refused_when_the_cache_knows_profiles() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    let before = site.cache_snapshot();
    site.remove("ci-a.json");
    let out = site.run(&[]);
    out.assert_status(1);
    out.assert_logs_in_order(&["the index lists no profile but the cache knows 1; refusing it"]);
    assert_eq!(site.cache_snapshot(), before);
}

#[test]
fn a_changed_profile_is_published_without_waiting_for_slower_downloads() {
    let site = fast_and_slow_changes(Duration::from_secs(6));

    let mut child = site.spawn(&[]);
    // Publishes go out in batches; a batch waits a moment for company, never for the run's end.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    let count = || support::block_on(site.queue.broker.message_count(&site.queue.name)).unwrap_or(0);
    while count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "ci-fast.json was not published while ci-slow.json was still downloading"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before the check: ci-slow.json was not slow enough"
    );
    let out = support::finish_within(child, Duration::from_secs(60));
    out.assert_status(0);
    out.assert_logs_in_order(&["Profile has updated: ci-fast.json", "Profile has updated: ci-slow.json"]);
    assert_eq!(site.published_names(), ["ci-fast.json", "ci-slow.json"]);
}

#[test]
fn a_run_killed_mid_way_loses_nothing_and_leaves_no_temp_file_behind() {
    let site = fast_and_slow_changes(Duration::from_secs(30));
    let before = site.cached_mtimes();

    let mut child = site.spawn(&[]);
    // The index the run expects to record is written ahead, to a temp file.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while site.temp_files().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no index was written ahead");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(site.cached_mtimes(), before, "a killed run recorded something");

    site.server.clear_faults();
    let out = site.run(&[]);
    out.assert_status(0);
    assert_eq!(
        site.temp_files(),
        Vec::<String>::new(),
        "the dead run's temp file is still there"
    );
    // ci-fast.json may have gone out twice (before the kill, and again): a duplicate, never a loss.
    let mut names = site.published_names();
    names.dedup();
    assert_eq!(names, ["ci-fast.json", "ci-slow.json"]);
    assert_eq!(
        site.cached_mtimes(),
        support::mt([("ci-fast.json", 101), ("ci-slow.json", 101)])
    );
}

#[test]
fn a_copy_a_crash_took_back_does_not_hide_a_revert_from_the_broker() {
    let site = fast_and_slow_changes(Duration::from_secs(30));
    let fast_v1 = serde_json::to_vec_pretty(&profile("fast", 1)).unwrap();
    let fast_v2 = serde_json::to_vec_pretty(&profile("fast", 2)).unwrap();
    // The run publishes ci-fast.json (v2), writes its cached copy, and is
    // killed while ci-slow.json still downloads: nothing recorded yet.
    let mut child = site.spawn(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while site.cached_copy("ci-fast.json") != Some(fast_v2.clone()) {
        assert!(
            std::time::Instant::now() < deadline,
            "ci-fast.json's copy was never written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(site.published_names(), ["ci-fast.json"]);
    assert_eq!(
        site.cached_mtime("ci-fast.json"),
        Some(100),
        "a killed run recorded something"
    );
    // What a crash can leave of a copy that was never made durable: the old
    // JSON. And before the next run the profile goes back to that JSON.
    std::fs::write(site.cache().join("ci-fast.json"), &fast_v1).unwrap();
    site.put("ci-fast.json", &profile("fast", 1), 102);
    site.server.clear_faults();

    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&["The cached copies of 2 profile(s) are not trusted"]);
    // The broker last got v2: v1 must go out although the copy says v1.
    let published = site.published();
    let fast: Vec<String> = published
        .iter()
        .filter(|m| m.profile_header.as_deref() == Some("ci-fast.json"))
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(
        fast,
        [String::from_utf8_lossy(&fast_v1)],
        "the revert of ci-fast.json was not published"
    );
    assert!(!site.cache().join(".cdb2rabbit-unsynced").exists());

    // Recorded: the copies are trusted again, and a recompile is no change.
    site.put("ci-fast.json", &profile("fast", 1), 103);
    let out = site.run(&[]);
    out.assert_status(0);
    assert!(
        out.stderr.contains("Profile has not updated: ci-fast.json"),
        "{}",
        out.stderr
    );
    assert_eq!(site.published_names(), Vec::<String>::new());
}

#[test]
fn a_profile_that_fails_after_a_dead_run_stays_untrusted_until_recorded() {
    let site = fast_and_slow_changes(Duration::from_secs(30));
    let mut child = site.spawn(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !site.cache().join(".cdb2rabbit-unsynced").exists() {
        assert!(std::time::Instant::now() < deadline, "no copy was written");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    site.published_names();
    // The next run: ci-fast.json goes through, ci-slow.json fails.
    site.server.set_fault("profiles/ci-slow.json", Fault::Status(500));
    site.run(&[]).assert_status(1);
    assert_eq!(site.published_names(), ["ci-fast.json"]);
    assert_eq!(
        std::fs::read_to_string(site.cache().join(".cdb2rabbit-unsynced")).unwrap(),
        "ci-slow.json\n",
        "only the profile still not recorded stays untrusted"
    );
    // Once ci-slow.json downloads it is published and recorded, and nothing
    // is left untrusted.
    site.server.clear_faults();
    site.put("ci-slow.json", &profile("slow", 1), 102);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-slow.json"]);
    assert!(!site.cache().join(".cdb2rabbit-unsynced").exists());
}

#[test]
fn a_profile_whose_download_failed_is_still_compared_with_its_copy_next_time() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json", "ci-b.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    site.put("ci-b.json", &profile("b", 2), 101);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.json", "ci-b.json"]);
    // ci-a.json changes (its new copy is written) and ci-b.json is
    // recompiled, but cannot be downloaded this time.
    site.put("ci-a.json", &profile("a", 3), 102);
    site.put("ci-b.json", &profile("b", 2), 102);
    site.server.set_fault("profiles/ci-b.json", Fault::Status(500));
    site.run(&[]).assert_status(1);
    assert_eq!(site.published_names(), ["ci-a.json"]);
    assert!(
        !site.cache().join(".cdb2rabbit-unsynced").exists(),
        "a failed download leaves the cached copy as trustworthy as it was"
    );
    site.server.clear_faults();
    let out = site.run(&[]);
    out.assert_status(0);
    assert!(
        out.stderr.contains("Profile has not updated: ci-b.json"),
        "{}",
        out.stderr
    );
    assert_eq!(site.published_names(), Vec::<String>::new(), "a recompile was rebuilt");
}

#[test]
fn a_copy_that_could_not_be_written_after_the_publish_is_not_trusted() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    let v1 = site.put("ci-a.json", &profile("a", 1), 101);
    site.run(&[]).assert_status(0);
    assert_eq!(site.published_names(), ["ci-a.json"]);
    // v2 is published, but its cached copy cannot be written (a directory
    // where its spare file goes): the copy still says v1.
    site.put("ci-a.json", &profile("a", 2), 102);
    let spare = site.cache().join(".cdb2rabbit-spare/ci-a.json");
    std::fs::remove_file(&spare).ok();
    std::fs::create_dir_all(spare.join("in-the-way")).unwrap();
    let out = site.run(&[]);
    out.assert_status(1);
    assert!(out.stderr.contains("cached copy of ci-a.json"), "{}", out.stderr);
    assert_eq!(site.published_names(), ["ci-a.json"]);
    assert_eq!(site.cached_copy("ci-a.json"), Some(v1.clone()));
    std::fs::remove_dir_all(&spare).unwrap();
    // Back to v1: the copy says v1, but the broker last got v2.
    site.put("ci-a.json", &profile("a", 1), 103);
    site.run(&[]).assert_status(0);
    let published = site.published();
    assert_eq!(published.len(), 1, "the revert to v1 was not published");
    assert_eq!(published[0].body, v1);
    assert!(!site.cache().join(".cdb2rabbit-unsynced").exists());
}

/// A site where ci-fast.json and ci-slow.json changed since the baseline,
/// and ci-slow.json takes `delay` to download.
fn fast_and_slow_changes(delay: Duration) -> Site {
    let site = Site::new("ci-").with_baseline(&["ci-fast.json", "ci-slow.json"]);
    site.put("ci-fast.json", &profile("fast", 2), 101);
    site.put("ci-slow.json", &profile("slow", 2), 101);
    site.server.set_fault("profiles/ci-slow.json", Fault::Delay(delay));
    site
}

/// Issue #11: how many profiles download at once adapts to the server. 5xx
/// answers and connections cut off mid-body lower it; a profile that keeps
/// failing so is asked for ATTEMPTS (4) times, then left for the next run;
/// every other profile is still downloaded and published.
#[test]
fn downloads_back_off_on_server_errors_and_still_get_everything() {
    let site = changed_site(40, "DOWNLOAD_CONCURRENCY = 8");
    let names: Vec<String> = (0..40).map(|i| format!("ci-{i:02}.json")).collect();
    let mut faulty: Vec<String> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let fault = match i % 8 {
            3 => Fault::Status(503),
            6 => Fault::Truncate(10),
            _ => continue,
        };
        site.server.set_fault(&format!("profiles/{name}"), fault);
        faulty.push(name.clone());
    }
    site.server.clear_requests();
    let out = site.run(&[]);
    out.assert_status(1);
    assert!(out.stderr.contains("Download concurrency lowered to"), "{}", out.stderr);
    // A profile the server keeps refusing is asked for a bounded number of times.
    let requests = site.server.requests();
    for name in &faulty {
        let asked = requests.iter().filter(|r| **r == format!("profiles/{name}")).count();
        assert_eq!(asked, 4, "{name} asked for {asked} times, not ATTEMPTS: {requests:?}");
    }
    let ok: Vec<String> = names.iter().filter(|n| !faulty.contains(n)).cloned().collect();
    assert_eq!(site.published_names(), ok, "{}", out.stderr);
    out.assert_logs_in_order(&[&format!(
        "{} profile(s) failed and will be retried by the next run: {}",
        faulty.len(),
        faulty.join(", ")
    )]);

    // The server recovered: the next run gets the rest.
    site.server.clear_faults();
    let out = site.run(&[]);
    out.assert_status(0);
    assert_eq!(site.published_names(), faulty, "{}", out.stderr);
    assert_eq!(site.cached_mtimes().len(), names.len());
    assert!(site.cached_mtimes().iter().all(|(_, m)| *m == 101));
}

/// Issue #11: against a server that keeps up, the number of downloads at
/// once grows from its start (2) to DOWNLOAD_CONCURRENCY, and never above.
#[test]
fn downloads_grow_to_download_concurrency_on_a_server_that_keeps_up() {
    let site = changed_site(60, "DOWNLOAD_CONCURRENCY = 6");
    site.server.set_latency(Duration::from_millis(50));
    let out = site.run(&[]);
    out.assert_status(0);
    assert_eq!(site.published_names().len(), 60, "{}", out.stderr);
    assert_eq!(site.server.peak_concurrency(), 6, "{}", out.stderr);
    assert_eq!(site.server.refused(), 0);
}

/// Issue #11: a server that serves three requests at once and answers 503
/// to a fourth: the limit backs off (far fewer refusals than a fixed 16
/// would meet) and the refused downloads are asked for again, so the run
/// gets every profile.
#[test]
fn downloads_back_off_from_a_server_answering_503_at_capacity_and_lose_no_profile() {
    back_off_from_a_server_at_capacity(Refusal::Unavailable);
}

/// As above, with a server that closes the connection unanswered.
#[test]
fn downloads_back_off_from_a_server_closing_connections_at_capacity_and_lose_no_profile() {
    back_off_from_a_server_at_capacity(Refusal::Close);
}

fn back_off_from_a_server_at_capacity(how: Refusal) {
    let site = changed_site(60, "DOWNLOAD_CONCURRENCY = 16");
    site.server.set_latency(Duration::from_millis(30));
    site.server.set_capacity(3, how);
    let out = site.run(&[]);
    out.assert_status(0);
    assert_eq!(site.published_names().len(), 60, "{}", out.stderr);
    assert!(site.cached_mtimes().iter().all(|(_, m)| *m == 101));
    assert!(out.stderr.contains("Download concurrency lowered to"), "{}", out.stderr);
    let refused = site.server.refused();
    assert!(refused > 0, "the limit never probed past the server's capacity");
    // At a fixed 16, 13 of every 16 requests would be refused.
    assert!(refused <= 20, "{refused} requests refused: the limit did not back off");
    assert!(
        site.server.peak_concurrency() < 8,
        "peak {}",
        site.server.peak_concurrency()
    );
}

/// A site with `n` CI profiles recorded in the cache, then all changed.
fn changed_site(n: usize, cdb: &str) -> Site {
    let site = Site::new("ci-").with_extra_cdb(cdb);
    for i in 0..n {
        let name = format!("ci-{i:02}.json");
        site.put(&name, &profile(&name, 1), 100);
    }
    site.run(&[]).assert_status(0);
    for i in 0..n {
        let name = format!("ci-{i:02}.json");
        site.put(&name, &profile(&name, 2), 101);
    }
    site
}

/// Declares `queue` on the test broker with these arguments (a probe of
/// its type: RabbitMQ refuses a declare whose `x-queue-type` differs).
fn declare_with(
    broker: &packuilon_testsupport::broker::BrokerAddr,
    queue: &str,
    queue_type: Option<&str>,
) -> Result<(), String> {
    support::block_on(async {
        let conn = broker.connect().await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut args = lapin::types::FieldTable::default();
        if let Some(t) = queue_type {
            args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString(t.into()));
        }
        let declared = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await;
        conn.close(200, "probed".into()).await.ok();
        declared.map(drop).map_err(|e| e.to_string())
    })
}

#[test]
fn a_rabbit_host_list_skips_a_node_that_does_not_answer() {
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    let down = packuilon_testsupport::free_port();
    let up = site.queue.broker.port;
    // A node down first, then the broker; the first entry without a port takes RABBIT_PORT.
    site.set_broker_port(Some(down));
    site.set_rabbit_host(Some(&format!(" 127.0.0.1 , 127.0.0.1:{up}")));
    let out = site.run(&[]);
    out.assert_status(0);
    out.assert_logs_in_order(&[
        &format!("Could not connect to RabbitMQ at amqp://127.0.0.1:{down}/: "),
        &format!("Connected to RabbitMQ at amqp://127.0.0.1:{up}/"),
        "Broker confirmed profile ci-a.json",
    ]);
    assert!(
        out.stderr.contains(&format!(
            "Connection refused (os error 111); trying amqp://127.0.0.1:{up}/ next"
        )),
        "{}",
        out.stderr
    );
    // The second node is tried at once, not after RABBIT_RETRY_DELAY.
    assert!(!out.stderr.contains("retrying in"), "{}", out.stderr);
    assert_eq!(site.published_names(), ["ci-a.json"]);
}

#[test]
fn queue_type_quorum_declares_a_quorum_queue() {
    let site = Site::new("ci-")
        .with_extra_global("QUEUE_TYPE = quorum\n")
        .with_baseline(&["ci-a.json"]);
    site.put("ci-a.json", &profile("a", 2), 101);
    site.run(&[]).assert_status(0);
    let broker = &site.queue.broker;
    assert_eq!(declare_with(broker, &site.queue.name, Some("quorum")), Ok(()));
    let classic = declare_with(broker, &site.queue.name, None).unwrap_err();
    assert!(
        classic.contains("PRECONDITION_FAILED") && classic.contains("current is the value 'quorum'"),
        "{classic}"
    );
    assert_eq!(site.published_names(), ["ci-a.json"]);
}

#[test]
fn a_queue_of_the_other_type_is_a_config_error_naming_queue_type_and_the_queue() {
    // The queue exists as the original declared it (classic); QUEUE_TYPE says quorum.
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    declare_with(&site.queue.broker, &site.queue.name, None).unwrap();
    site.put("ci-a.json", &profile("a", 2), 101);
    let before = site.cache_snapshot();
    let site = site.with_extra_global("QUEUE_TYPE = quorum\n");
    let out = site.run(&[]);
    out.assert_status(2);
    let config = site.dir.path().join("config.ini");
    assert!(
        out.stderr.contains(&format!(
            "{}: [global] QUEUE_TYPE is quorum, but queue {:?} exists on RabbitMQ at amqp://127.0.0.1:{}/ \
             as a classic queue: set QUEUE_TYPE = classic",
            config.display(),
            site.queue.name,
            site.queue.broker.port
        )),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.matches("QUEUE_TYPE is quorum").count(), 1, "{}", out.stderr);
    assert_eq!(site.cache_snapshot(), before, "cache changed");

    // And the other way round: a quorum queue, QUEUE_TYPE left at classic.
    let site = Site::new("ci-").with_baseline(&["ci-a.json"]);
    declare_with(&site.queue.broker, &site.queue.name, Some("quorum")).unwrap();
    site.put("ci-a.json", &profile("a", 2), 101);
    let out = site.run(&[]);
    out.assert_status(2);
    assert!(
        out.stderr.contains(&format!(
            "[global] QUEUE_TYPE is classic, but queue {:?} exists on RabbitMQ at amqp://127.0.0.1:{}/ \
             as a quorum queue: set QUEUE_TYPE = quorum",
            site.queue.name, site.queue.broker.port
        )),
        "{}",
        out.stderr
    );
}
