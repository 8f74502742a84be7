//! rabbit2packer end to end: the real daemon binary, real RabbitMQ, real
//! packer (null builder, shell-local steps that record what they got).

mod support;

use rabbit2packer::journal::JobState;
use serde_json::{json, Value};
use support::*;

#[test]
fn names_and_rendered_values_reach_packer_escaped() {
    let site = Site::new(2, "");
    let mut d = site.start();
    // A sandbox profile, and values that need JSON escapes.
    let sandbox = profile(
        "inventory",
        "7x",
        "tier\"1\\x",
        json!({"name": "alice/fix \"quotes\"", "type": "sandbox"}),
    );
    site.publish(&sandbox, Some("msg-sandbox"));
    let jobs = site.wait_jobs("the sandbox build", T, |j| succeeded(j) == 1);
    let job = &jobs[0];
    assert_eq!(job.image_key, "inventory-sl7x-x86_64");
    assert_eq!(job.message_id.as_deref(), Some("msg-sandbox"));
    assert_eq!(job.profile.as_deref(), Some("test-profile.json"));

    // The build file: BUILD_FILE_DIR/<image key>.<template file name>.json, valid JSON.
    let build_file = site.build_dir.join("inventory-sl7x-x86_64.a.json.json");
    let rendered: Value = serde_json::from_str(&std::fs::read_to_string(&build_file).unwrap()).unwrap();
    assert_eq!(rendered["variables"]["name"], "sl7x-x86_64 inventory");
    assert_eq!(rendered["variables"]["image"], "src-7x-uuid");

    // What packer's step saw, and the RC file's exports with the original's aliases.
    let starts = site.starts();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0][2], "sl7x-x86_64 inventory");
    assert_eq!(starts[0][3], "src-7x-uuid");
    assert_eq!(starts[0][6], "project-1", "OS_TENANT_ID=OS_PROJECT_ID");
    assert_eq!(starts[0][7], "Default", "OS_DOMAIN_NAME=OS_USER_DOMAIN_NAME");

    // $METADATA reached packer as an object, values intact.
    let md = site.manifest_metadata("sl7x-x86_64 inventory", "a.json");
    assert_eq!(
        md[0],
        json!({
            "AQ_PERSONALITY": "inventory", "AQ_OS": "sl", "AQ_OSVERSION": "7x-x86_64",
            "AQ_SANDBOX": "alice/fix \"quotes\"", "AQ_ARCHETYPE": "tier\"1\\x"
        })
    );

    // A domain profile without a branch name gets AQ_DOMAIN prod.
    let mut plain = profile("web", "7x", "ral-tier1", Value::Null);
    plain["metadata"] = json!({});
    site.publish(&plain, None);
    site.wait_jobs("the plain build", T, |j| succeeded(j) == 2);
    let md = site.manifest_metadata("sl7x-x86_64 web", "a.json");
    assert_eq!(md[0]["AQ_DOMAIN"], "prod");
    assert!(md[0].get("AQ_SANDBOX").is_none());

    // The original's log lines.
    d.wait_log("Thread-", T);
    assert!(d.count("processing inventory-sl7x-x86_64") == 1, "{}", d.output());
    assert!(d.count("No Packer template defined for web-sl7x-x86_64. Using the default values") == 1);
    d.wait_log("image built successfully: web-sl7x-x86_64.a.json", T);
    d.stop();
}

#[test]
fn image_with_its_own_map_entry_uses_it_others_use_default() {
    let site = Site::new(2, "");
    site.template("unmanaged.json", Step { sleep: 0.3, exit: 0 });
    site.template("managed.json", Step { sleep: 0.3, exit: 0 });
    site.template("special.json", Step { sleep: 0.3, exit: 0 });
    site.write_map(json!({
        "DEFAULT": ["templates/unmanaged.json", "templates/managed.json"],
        "special-sl7x-x86_64": ["templates/special.json"]
    }));
    let mut d = site.start();
    site.publish(&profile("special", "7x", "a", prod()), None);
    site.publish(&profile("other", "7x", "a", prod()), None);
    let jobs = site.wait_jobs("both builds", T, |j| succeeded(j) == 2);
    let templates = |key: &str| -> Vec<String> {
        jobs.iter()
            .find(|j| j.image_key == key)
            .unwrap()
            .builds
            .iter()
            .map(|b| b.template.clone())
            .collect()
    };
    assert_eq!(templates("special-sl7x-x86_64"), vec!["special.json"]);
    assert_eq!(templates("other-sl7x-x86_64"), vec!["unmanaged.json", "managed.json"]);
    // The templates of one image run one after another.
    let runs = site.runs();
    let pos = |kind: &str, t: &str| {
        runs.iter()
            .position(|r| r[0] == kind && r[1] == t && r[2] == "sl7x-x86_64 other")
            .unwrap()
    };
    assert!(pos("end", "unmanaged.json") < pos("start", "managed.json"), "{runs:?}");
    d.stop();
}

#[test]
fn missing_source_image_fails_that_job_only() {
    let site = Site::new(1, "");
    let mut d = site.start();
    site.publish(&profile("inventory", "6x", "a", prod()), Some("no-source"));
    site.publish(&profile("inventory", "7x", "a", prod()), Some("has-source"));
    let jobs = site.wait_jobs("both jobs finished", T, |j| {
        j.len() == 2
            && j.iter()
                .all(|j| matches!(j.state, JobState::Succeeded | JobState::Failed))
    });
    let failed = in_state(&jobs, JobState::Failed);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].image_key, "inventory-sl6x-x86_64");
    let err = failed[0].error.as_deref().unwrap();
    assert!(err.contains("sl6x-x86_64") && err.contains("IMAGES_CONFIG"), "{err}");
    assert_eq!(succeeded(&jobs), 1);
    d.wait_log("source image was not found, check IMAGES_CONFIG. Continuing", T);
    d.stop();
}

#[test]
fn malformed_message_is_rejected_and_kept_and_the_queue_goes_on() {
    let site = Site::new(1, "");
    let mut d = site.start();
    site.publish_bytes(b"this is { not json", Some("broken-1"));
    let mut no_arch = profile("inventory", "7x", "a", prod());
    no_arch["system"]["os"].as_object_mut().unwrap().remove("architecture");
    site.publish(&no_arch, Some("broken-2"));
    site.publish(&profile("inventory", "7x", "a", prod()), Some("good"));
    site.wait_jobs("the good message built", T, |j| succeeded(j) == 1);
    let line = d.wait_log("message broken-2", T);
    assert!(line.contains("system.os.architecture"), "{line}");
    assert!(d.wait_log("message broken-1", T).contains("malformed json"));
    let mut rejected: Vec<Vec<u8>> = std::fs::read_dir(site.state_dir.join("rejected"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    rejected.sort();
    assert_eq!(rejected.len(), 2);
    assert!(rejected.contains(&b"this is { not json".to_vec()));
    assert_eq!(site.journal().len(), 1, "rejected messages are not jobs");
    d.stop();
}

#[test]
fn twenty_requests_during_a_build_give_at_most_two_builds_the_last_with_the_newest_profile() {
    let site = Site::new(2, "");
    site.template("a.json", Step { sleep: 2.5, exit: 0 });
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "v0", prod()), None);
    site.wait_runs("the first build to start", T, |r| !r.is_empty());
    let messages: Vec<(Vec<u8>, Option<String>)> = (1..=20)
        .map(|n| {
            (
                serde_json::to_vec(&profile("inventory", "7x", &format!("v{n}"), prod())).unwrap(),
                None,
            )
        })
        .collect();
    publish_all(&site.queue.broker, &site.queue.name, &messages);
    site.wait_jobs("20 requests journaled during the first build", T, |j| j.len() == 21);
    assert!(
        site.runs().iter().all(|r| r[0] == "start"),
        "the first build was still running"
    );
    let jobs = site.wait_jobs("all 21 requests settled", T, |j| {
        j.len() == 21
            && j.iter()
                .all(|j| !matches!(j.state, JobState::Running | JobState::Waiting))
    });
    assert_eq!(succeeded(&jobs), 2, "{jobs:#?}");
    assert_eq!(in_state(&jobs, JobState::Superseded).len(), 19);
    let last = jobs.last().unwrap();
    assert_eq!(last.state, JobState::Succeeded);
    // Each superseded job names the one that replaced it.
    for j in in_state(&jobs, JobState::Superseded) {
        assert_eq!(j.superseded_by, Some(j.id + 1));
    }
    let md = site.manifest_metadata("sl7x-x86_64 inventory", "a.json");
    assert_eq!(md.len(), 2);
    assert_eq!(md[1]["AQ_ARCHETYPE"], "v20");
    assert_eq!(site.starts().len(), 2);
    d.stop();
}

#[test]
fn four_images_with_two_threads_build_two_at_a_time() {
    let site = Site::new(2, "");
    site.template("a.json", Step { sleep: 1.5, exit: 0 });
    let mut d = site.start();
    let messages: Vec<(Vec<u8>, Option<String>)> = ["p1", "p2", "p3", "p4"]
        .iter()
        .map(|p| (serde_json::to_vec(&profile(p, "7x", "a", prod())).unwrap(), None))
        .collect();
    publish_all(&site.queue.broker, &site.queue.name, &messages);
    let jobs = site.wait_jobs("four builds", T, |j| succeeded(j) == 4);
    // Each packer run's [start, end] as the daemon recorded it; count the most at once.
    let mut events: Vec<(String, i32)> = jobs
        .iter()
        .flat_map(|j| &j.builds)
        .flat_map(|b| [(b.started_at.clone().unwrap(), 1), (b.finished_at.clone().unwrap(), -1)])
        .collect();
    // RFC 3339 UTC with fixed precision sorts as text; an end sorts before a start at the same instant.
    events.sort();
    let (mut now, mut max) = (0, 0);
    for (_, delta) in &events {
        now += delta;
        max = max.max(now);
    }
    assert_eq!(max, 2, "{events:?}");
    assert!(d.count("Thread-1 processing") >= 1 && d.count("Thread-2 processing") >= 1);
    d.stop();
}

#[test]
fn redelivered_message_is_not_built_twice() {
    let site = Site::new(1, "");
    let mut d = site.start();
    let with_id = profile("inventory", "7x", "a", prod());
    site.publish(&with_id, Some("same-id"));
    site.publish(&with_id, Some("same-id"));
    let body = profile("other", "7x", "b", prod());
    site.publish(&body, None);
    site.wait_jobs("two builds", T, |j| succeeded(j) == 2);
    d.wait_log("Message same-id is already job", T);
    d.stop();

    // A message without an id that the broker redelivers (delivered, never acked)
    // after its job was journaled: acked, not built again.
    site.publish(&body, None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = site.queue.broker.connect().await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let got = ch
            .basic_get(
                site.queue.name.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
            .expect("the message is in the queue");
        assert!(!got.delivery.redelivered);
        // Closing without an ack puts it back, flagged redelivered.
        conn.close(200, "no ack".into()).await.unwrap();
    });
    // As after a crash between commit and ack: the daemon gets the redelivery.
    let mut d = site.start();
    d.wait_log("is already job", T);
    assert_eq!(site.journal().len(), 2, "{:#?}", site.journal());
    d.stop();
    assert_eq!(site.starts().len(), 2);
}

#[test]
fn failing_build_is_recorded_with_exit_code_and_trailer_and_the_next_request_builds() {
    let site = Site::new(1, "");
    let mut d = site.start();
    std::fs::write(site.out.join("fail"), "").unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let jobs = site.wait_jobs("the failed build", T, |j| in_state(j, JobState::Failed).len() == 1);
    let b = &jobs[0].builds[0];
    assert_eq!(b.exit_code, Some(1));
    let log = std::fs::read_to_string(b.log_path.as_deref().unwrap()).unwrap();
    assert!(log.contains("failing on purpose"), "{log}");
    assert!(log.contains("building, with a comma"), "{log}");
    let last = log.lines().last().unwrap();
    assert!(
        last.starts_with("rabbit2packer: Build finished at ") && last.ends_with(" (epoch) with exit code 1"),
        "{last}"
    );
    assert!(
        jobs[0].error.as_deref().unwrap().contains("exit status: 3"),
        "{:?}",
        jobs[0].error
    );
    d.wait_log(
        "Thread-1: packer exited with non zero exit code, inventory-sl7x-x86_64.a.json build failed",
        T,
    );
    std::fs::remove_file(site.out.join("fail")).unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("the next build", T, |j| succeeded(j) == 1);
    d.stop();
}

#[test]
fn kill_9_mid_build_then_restart_builds_it_once_more_and_leaves_no_packer() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 3.0, exit: 0 });
    let d = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let runs = site.wait_runs("the build to start", T, |r| !r.is_empty());
    let pgid: i32 = runs[0][4].parse().unwrap();
    assert!(group_alive(pgid));
    d.signal(libc::SIGKILL);
    drop(d);
    let mut d = site.start();
    wait_for("the old packer group to be gone", T, || !group_alive(pgid));
    let jobs = site.wait_jobs("the rebuild", T, |j| succeeded(j) == 1);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].attempts, 2);
    let starts = site.starts();
    assert_eq!(starts.len(), 2, "built once more: {starts:?}");
    assert_ne!(starts[1][4], starts[0][4]);
    d.wait_log("it will be built again", T);
    // The interrupted build's log says what happened (it has no trailer: packer's exit is unknown).
    let first_log = jobs[0].builds[0].log_path.clone().unwrap();
    let text = std::fs::read_to_string(&first_log).unwrap();
    assert!(text.ends_with("the job is built again\n"), "{text}");
    assert_eq!(jobs[0].builds.len(), 2);
    d.stop();
    assert!(!group_alive(pgid));
}

#[test]
fn sigterm_mid_build_cancels_packer_cleanly_and_interrupted_and_waiting_jobs_run_after_restart() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 30.0, exit: 0 });
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let runs = site.wait_runs("the build to start", T, |r| !r.is_empty());
    // A second image waits for the only worker.
    site.publish(&profile("other", "7x", "a", prod()), None);
    site.wait_jobs("the waiting job", T, |j| j.len() == 2);
    let pgid: i32 = runs[0][4].parse().unwrap();
    d.stop();
    assert!(!group_alive(pgid));
    let jobs = site.journal();
    assert_eq!(jobs[0].state, JobState::Interrupted);
    assert_eq!(jobs[1].state, JobState::Waiting);
    let log = std::fs::read_to_string(jobs[0].builds[0].log_path.as_deref().unwrap()).unwrap();
    assert!(
        log.contains("Cleanly cancelled builds after being interrupted."),
        "{log}"
    );
    assert!(
        log.lines()
            .last()
            .unwrap()
            .starts_with("rabbit2packer: Build finished at "),
        "{log}"
    );

    site.template("a.json", Step { sleep: 0.2, exit: 0 });
    let mut d = site.start();
    let jobs = site.wait_jobs("both jobs to run after the restart", T, |j| succeeded(j) == 2);
    assert_eq!(jobs.len(), 2);
    d.stop();
}

#[test]
fn broker_killed_mid_build_builds_go_on_and_later_messages_are_consumed() {
    let broker = packuilon_testsupport::broker::PrivateBroker::start().unwrap();
    let site = Site::on(&broker.addr, 1, "");
    site.template("a.json", Step { sleep: 2.0, exit: 0 });
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_runs("the build to start", T, |r| !r.is_empty());
    // Journaled, waiting for the only worker.
    site.publish(&profile("other", "7x", "a", prod()), None);
    site.wait_jobs("the second job journaled", T, |j| j.len() == 2);
    broker.kill9().unwrap();
    site.wait_jobs("both builds to complete with the broker down", T, |j| succeeded(j) == 2);
    broker.launch().unwrap();
    site.publish(&profile("later", "7x", "a", prod()), None);
    site.wait_jobs("the later message", T, |j| succeeded(j) == 3);
    assert!(d.count("reconnecting to channel") >= 1, "{}", d.output());
    d.stop();
}

#[test]
fn template_map_and_rc_file_edited_while_running_are_used_without_restart() {
    let site = Site::new(1, "");
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("first build", T, |j| succeeded(j) == 1);
    site.template("b.json", Step { sleep: 0.2, exit: 0 });
    site.write_map(json!({"DEFAULT": ["templates/b.json"]}));
    // The RC file too: sourced again once it changed.
    let auth = site.dir.path().join("auth.sh");
    let rc = std::fs::read_to_string(&auth).unwrap();
    std::fs::write(&auth, rc.replace("project-1", "project-two")).unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let jobs = site.wait_jobs("second build", T, |j| succeeded(j) == 2);
    assert_eq!(jobs[1].builds[0].template, "b.json");
    let starts = site.starts();
    assert_eq!(
        (starts[0][6].as_str(), starts[1][6].as_str()),
        ("project-1", "project-two")
    );
    d.wait_log("Reloaded", T);
    d.stop();
}

#[test]
fn broken_template_is_reported_naming_the_file() {
    // At start-up: exit 2, one error naming the file.
    let site = Site::new(1, "");
    let broken = site.templates.join("broken.json");
    std::fs::write(&broken, "{\"builders\": [{\"type\": \"null\", \"x\": { $METADATA }},]}").unwrap();
    site.write_map(json!({"DEFAULT": ["templates/a.json"], "x-sl7x-x86_64": ["templates/broken.json"]}));
    let mut d = site.start();
    assert_eq!(d.wait_exit(T), 2);
    assert!(d.output().contains(&broken.display().to_string()), "{}", d.output());

    // While running: the error names the file and the last good version stays in use.
    site.write_map(json!({"DEFAULT": ["templates/a.json"]}));
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    let a = site.templates.join("a.json");
    let good = std::fs::read_to_string(&a).unwrap();
    std::fs::write(&a, good.replacen('{', "{,", 1)).unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("the build with the last good template", T, |j| succeeded(j) == 1);
    let line = d.wait_log("keeping the last good version", T);
    assert!(line.contains(&a.display().to_string()), "{line}");
    d.signal(libc::SIGHUP);
    d.stop();
    assert_eq!(
        d.count("keeping the last good version"),
        1,
        "a broken edit is reported once"
    );
}

#[test]
fn only_the_newest_log_keep_logs_are_kept_and_the_link_points_to_the_newest() {
    let site = Site::new(1, "LOG_KEEP = 2");
    site.template("a.json", Step { sleep: 0.1, exit: 0 });
    let mut d = site.start();
    for n in 1..=3 {
        site.publish(&profile("inventory", "7x", &format!("v{n}"), prod()), None);
        site.wait_jobs("build", T, |j| succeeded(j) == n);
    }
    let logs = site.logs("inventory-sl7x-x86_64.a.json");
    assert_eq!(logs.len(), 2, "{logs:?}");
    let link = std::fs::read_link(site.log_dir.join("inventory-sl7x-x86_64.a.json.log")).unwrap();
    assert_eq!(site.log_dir.join(link), *logs.last().unwrap());
    let newest = site.journal().last().unwrap().builds[0].log_path.clone().unwrap();
    assert_eq!(logs.last().unwrap().display().to_string(), newest);
    d.stop();
}

#[test]
fn status_and_history_show_running_waiting_and_finished_jobs() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 2.0, exit: 0 });
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "v1", prod()), Some("m1"));
    site.wait_runs("the build to start", T, |r| !r.is_empty());
    site.publish(&profile("inventory", "7x", "v2", prod()), Some("m2"));
    site.wait_jobs("a waiting job", T, |j| j.len() == 2);
    let (code, out, err) = site.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("running: 1"), "{out}");
    assert!(
        out.contains("#1 inventory-sl7x-x86_64") && out.contains("Thread-1"),
        "{out}"
    );
    assert!(out.contains("building a.json"), "{out}");
    assert!(
        out.contains("waiting: 1") && out.contains("#2 inventory-sl7x-x86_64"),
        "{out}"
    );

    site.wait_jobs("both builds", T, |j| succeeded(j) == 2);
    let (code, out, _) = site.cli(&["history", "inventory-sl7x-x86_64"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("#2 inventory-sl7x-x86_64 succeeded"), "{out}");
    assert!(out.contains("a.json exit 0 artifact Null"), "{out}");
    assert!(out.contains("rotation skipped"), "{out}");
    let (code, out, _) = site.cli(&["history", "--json", "-n", "1"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["message_id"], "m2");
    assert_eq!(v[0]["state"], "succeeded");
    assert_eq!(v[0]["builds"][0]["exit_code"], 0);
    let (_, out, _) = site.cli(&["history", "nothing-sl7x-x86_64"]);
    assert_eq!(out, "no finished builds\n");
    d.stop();
}

#[test]
fn build_timeout_stops_packer_and_fails_the_job_naming_the_timeout() {
    let site = Site::new(1, "BUILD_TIMEOUT = 1\nSTOP_TIMEOUT = 5");
    site.template("a.json", Step { sleep: 30.0, exit: 0 });
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let jobs = site.wait_jobs("the timed-out build", T, |j| in_state(j, JobState::Failed).len() == 1);
    let err = jobs[0].error.as_deref().unwrap();
    assert!(err.contains("BUILD_TIMEOUT"), "{err}");
    assert!(jobs[0].builds[0].exit_code.is_some());
    // Nothing of that packer run is left: no process still names its build file.
    let build_file = site.build_dir.join("inventory-sl7x-x86_64.a.json.json");
    assert_eq!(
        processes_mentioning(&build_file.display().to_string()),
        Vec::<i32>::new()
    );
    d.stop();
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let site = Site::new(1, "");
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(&site.config, text.replace("THREAD_COUNT = 1", "THREAD_COUNT = 0")).unwrap();
    let mut d = site.start();
    assert_eq!(d.wait_exit(T), 2);
    let out = d.output();
    assert!(out.contains("config.ini") && out.contains("THREAD_COUNT"), "{out}");

    std::fs::write(
        &site.config,
        text.replace("PACKER_PATH = /usr/bin/packer", "PACKER_PATH = /nonexistent/packer"),
    )
    .unwrap();
    let mut d = site.start();
    assert_eq!(d.wait_exit(T), 2);
    assert!(d.output().contains("PACKER_PATH"), "{}", d.output());
}

#[test]
fn a_second_daemon_on_the_same_state_dir_refuses_to_start() {
    let site = Site::new(1, "");
    let mut first = site.start();
    first.wait_log("Consuming from queue", T);
    let mut second = site.start();
    assert_eq!(second.wait_exit(T), 2);
    let out = second.output();
    assert!(
        out.contains("STATE_DIR") && out.contains(&format!("another rabbit2packer (pid {})", first.pid())),
        "{out}"
    );
    first.stop();
}

#[test]
fn failed_rotation_is_retried_then_recorded_as_built_rotation_failed() {
    let site = Site::new(1, "");
    // Keystone on a closed port: every attempt fails.
    let admin = site.dir.path().join("admin-auth.sh");
    std::fs::write(
        &admin,
        "export OS_AUTH_URL=http://127.0.0.1:9/v3\nexport OS_USERNAME=admin\nexport OS_PASSWORD=secret\n\
         export OS_PROJECT_NAME=admin\nexport OS_USER_DOMAIN_NAME=Default\nexport OS_PROJECT_DOMAIN_NAME=Default\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        format!("{text}PACKER_ADMIN_AUTH_FILE = {}\n", admin.display()),
    )
    .unwrap();
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let jobs = site.wait_jobs("the build", T, |j| succeeded(j) == 1);
    assert_eq!(jobs[0].outcome, "built, rotation failed");
    let rotation = jobs[0].builds[0].rotation.as_deref().unwrap();
    assert!(rotation.starts_with("failed after 3 attempt(s)"), "{rotation}");
    assert!(!rotation.contains("secret"), "{rotation}");
    assert_eq!(
        d.count("rotation of image named \"sl7x-x86_64 inventory\" failed (attempt"),
        3
    );
    let (_, out, _) = site.cli(&["history"]);
    assert!(out.contains("built, rotation failed"), "{out}");
    // The image was not rebuilt for the rotation.
    assert_eq!(site.starts().len(), 1);
    d.stop();
}

#[test]
fn tells_systemd_ready_once_started_and_stopping_on_sigterm() {
    let site = Site::new(1, "");
    let sock_path = site.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let mut d = site.start_with_env(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1\n");
    // Workers were started before READY=1 (the stderr reader may lag a little).
    d.wait_log("Starting Thread-1", T);
    d.wait_log("Consuming from queue", T);
    d.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert_eq!(d.wait_exit(T), 0);
}

#[test]
fn ready_reaches_systemd_with_the_broker_unreachable_and_journaled_jobs_build() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 30.0, exit: 0 });
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_runs("the build to start", T, |r| !r.is_empty());
    site.publish(&profile("other", "7x", "a", prod()), None);
    site.wait_jobs("the waiting job", T, |j| j.len() == 2);
    d.stop();
    assert_eq!(
        site.journal().iter().map(|j| j.state).collect::<Vec<_>>(),
        vec![JobState::Interrupted, JobState::Waiting]
    );

    // Next start: nothing listens on RABBIT_PORT.
    let closed = site.use_closed_broker_port();
    site.template("a.json", Step { sleep: 0.2, exit: 0 });
    let sock_path = site.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let mut d = site.start_with_env(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1\n");
    site.wait_jobs("both journaled jobs built with the broker down", T, |j| {
        succeeded(j) == 2
    });
    let line = d.wait_log("unreachable", T);
    assert!(line.contains(&format!(":{closed}")), "{line}");
    assert_eq!(d.count("Consuming from queue"), 0);
    d.stop();
}

#[test]
fn successful_build_rotates_the_older_image_of_its_name_in_glance() {
    let os = packuilon_testsupport::openstack::OpenStack::shared().expect("Keystone + Glance (make test starts them)");
    let site = Site::new(1, &format!("PACKER_ADMIN_AUTH_FILE = {}", os.openrc.display()));
    // The build step creates the image with these credentials, as an openstack builder would.
    let text = std::fs::read_to_string(&site.config).unwrap();
    let auth = site.dir.path().join("auth.sh");
    std::fs::write(
        &site.config,
        text.replace(&auth.display().to_string(), &os.openrc.display().to_string()),
    )
    .unwrap();
    // The demo's Glance helper: `create` prints "Image: <uuid>" as the openstack builder does.
    let helper = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../templates/demo/glance.py");
    let glance = |args: &[&str]| -> String {
        let out = std::process::Command::new("/usr/bin/python3")
            .arg(&helper)
            .args(args)
            .envs(os.env().unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let personality = packuilon_testsupport::unique_name("rot");
    let name = format!("sl7x-x86_64 {personality}");
    let older = glance(&["create", &name]).trim_start_matches("Image: ").to_string();

    let template = json!({
        "variables": {"name": "$NAME"},
        "builders": [{"type": "null", "communicator": "none"}],
        "provisioners": [{
            "type": "shell-local",
            "environment_vars": ["R_NAME={{user `name`}}"],
            "inline": [format!("/usr/bin/python3 {} create \"$R_NAME\"", helper.display())]
        }]
    });
    std::fs::write(site.templates.join("glance.json"), template.to_string()).unwrap();
    site.write_map(json!({"DEFAULT": ["templates/glance.json"]}));
    let mut d = site.start();
    site.publish(&profile(&personality, "7x", "a", prod()), None);
    let jobs = site.wait_jobs("the build and its rotation", T, |j| succeeded(j) == 1);
    let rotation = jobs[0].builds[0].rotation.clone().unwrap();
    assert!(rotation.starts_with(&format!("done: {name} (")), "{rotation}");
    assert!(rotation.contains("archived 1"), "{rotation}");
    assert_eq!(jobs[0].outcome, "succeeded");
    let archived = glance(&["show", &older]);
    assert!(archived.starts_with(&format!("archive-{name} ")), "{archived}");
    d.stop();
}

#[test]
fn an_error_inside_a_job_fails_that_job_alone_and_the_worker_goes_on() {
    let site = Site::new(1, "");
    // PACKER_PATH through a link we can take away while the daemon runs.
    let link = site.dir.path().join("packer");
    std::os::unix::fs::symlink(PACKER, &link).unwrap();
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        text.replace(
            &format!("PACKER_PATH = {PACKER}"),
            &format!("PACKER_PATH = {}", link.display()),
        ),
    )
    .unwrap();
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    std::fs::remove_file(&link).unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    let jobs = site.wait_jobs("the job without packer", T, |j| {
        in_state(j, JobState::Failed).len() == 1
    });
    let err = jobs[0].error.as_deref().unwrap();
    assert!(
        err.contains("PACKER_PATH") && err.contains(&link.display().to_string()),
        "{err}"
    );
    let log = std::fs::read_to_string(jobs[0].builds[0].log_path.as_deref().unwrap()).unwrap();
    assert!(log.contains("cannot run"), "{log}");
    assert!(log.lines().last().unwrap().ends_with("with exit code 127"), "{log}");
    // The only worker is still there.
    std::os::unix::fs::symlink(PACKER, &link).unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("the next job", T, |j| succeeded(j) == 1);
    d.stop();
}

#[test]
fn build_log_is_written_as_packer_prints_and_survives_kill_9() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 0.1, exit: 0 });
    let d = site.start();
    site.publish(&profile("inventory", "7x", "v1", prod()), None);
    site.wait_jobs("the first build", T, |j| succeeded(j) == 1);
    // The second build sleeps: its log must fill while it runs.
    site.template("a.json", Step { sleep: 30.0, exit: 0 });
    site.publish(&profile("inventory", "7x", "v2", prod()), None);
    let runs = site.wait_runs("the second build to start", T, |r| {
        r.iter().filter(|r| r[0] == "start").count() == 2
    });
    let pgid: i32 = runs.last().unwrap()[4].parse().unwrap();
    let jobs = site.wait_jobs("the second build's log path", T, |j| {
        j.len() == 2 && j[1].builds.first().is_some_and(|b| b.log_path.is_some())
    });
    let new_log = std::path::PathBuf::from(jobs[1].builds[0].log_path.clone().unwrap());
    let link = site.log_dir.join("inventory-sl7x-x86_64.a.json.log");
    // Through the link operators follow, the provisioner's first line shows before the build ends.
    wait_for(
        "the link to the new log, holding the provisioner's first line",
        T,
        || {
            std::fs::read_link(&link).is_ok_and(|l| site.log_dir.join(l) == new_log)
                && std::fs::read_to_string(&link).is_ok_and(|t| t.contains("building, with a comma"))
        },
    );
    assert!(group_alive(pgid), "the build was still running");

    d.signal(libc::SIGKILL);
    drop(d);
    let text = std::fs::read_to_string(&new_log).unwrap();
    assert!(text.contains("building, with a comma"), "{text}");

    // The restart rebuilds the job and leaves nothing behind.
    site.template("a.json", Step { sleep: 0.1, exit: 0 });
    let mut d = site.start();
    wait_for("the old packer group to be gone", T, || !group_alive(pgid));
    site.wait_jobs("the rebuild", T, |j| succeeded(j) == 2);
    d.stop();
}

#[test]
fn status_after_a_stop_shows_the_interrupted_job_that_runs_at_the_next_start() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 30.0, exit: 0 });
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), Some("m1"));
    site.wait_runs("the build to start", T, |r| !r.is_empty());
    d.stop();

    let (code, out, err) = site.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("running: 0") && out.contains("waiting: 0"), "{out}");
    assert!(out.contains("interrupted: 1"), "{out}");
    assert!(out.contains("#1 inventory-sl7x-x86_64"), "{out}");
    assert!(out.contains("runs again at the next start"), "{out}");
    let (code, out, _) = site.cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(v[0]["state"], "interrupted");
    assert_eq!(v[0]["message_id"], "m1");
}

#[test]
fn help_states_exit_statuses_signals_and_files() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit2packer"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "Exit status: 0 clean stop",
        "1 runtime failure",
        "2 configuration error",
        "SIGTERM/SIGINT",
        "SIGHUP",
        "PACKER_UTILS_CONFIG",
        "/etc/packer-utils/config.ini",
        "STATE_DIR",
        "LOG_DIR",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

/// Takes every message of `queue` (the test broker's), with its properties.
fn drain(broker: &packuilon_testsupport::broker::BrokerAddr, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(broker.drain(queue))
        .unwrap()
}

fn header(msg: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let headers = msg.delivery.properties.headers().as_ref()?;
    headers.inner().iter().find_map(|(k, v)| match v {
        lapin::types::AMQPValue::LongString(s) if k.as_str() == name => Some(s.to_string()),
        _ => None,
    })
}

#[test]
fn a_rejected_message_goes_to_the_rejected_queue_with_its_reason_and_stays_on_disk() {
    let site = Site::new(1, "");
    let mut d = site.start();
    site.publish_bytes(b"this is { not json", Some("broken-1"));
    let mut no_arch = profile("inventory", "7x", "a", prod());
    no_arch["system"]["os"].as_object_mut().unwrap().remove("architecture");
    site.publish(&no_arch, Some("broken-2"));
    site.publish(&profile("inventory", "7x", "a", prod()), Some("good"));
    site.wait_jobs("the good message built", T, |j| succeeded(j) == 1);
    let rejected_queue = format!("{}.rejected", site.queue.name);
    d.wait_log(&format!("Message broken-2 published to queue {rejected_queue}"), T);

    let on_broker = drain(&site.queue.broker, &rejected_queue);
    let ids: Vec<String> = on_broker
        .iter()
        .map(|m| m.delivery.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["broken-1", "broken-2"]);
    assert_eq!(on_broker[0].delivery.data, b"this is { not json");
    assert_eq!(on_broker[1].delivery.data, serde_json::to_vec(&no_arch).unwrap());
    for m in &on_broker {
        assert_eq!(*m.delivery.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            header(m, "profile").as_deref(),
            Some("test-profile.json"),
            "the original's headers stay"
        );
        assert!(header(m, "x-packuilon-rejected-by").is_some());
    }
    let reason = header(&on_broker[0], "x-packuilon-reason").unwrap();
    assert!(
        reason.starts_with("message broken-1: ") && reason.contains("JSON"),
        "{reason}"
    );
    let reason = header(&on_broker[1], "x-packuilon-reason").unwrap();
    assert!(reason.contains("system.os.architecture"), "{reason}");

    // The local copies stay, as before.
    let mut local: Vec<Vec<u8>> = std::fs::read_dir(site.state_dir.join("rejected"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    local.sort();
    assert_eq!(local.len(), 2);
    assert!(local.contains(&b"this is { not json".to_vec()));
    assert_eq!(site.queue_len(), 0, "every message acked");
    d.stop();
}

#[test]
fn a_queue_of_the_other_type_than_queue_type_stops_the_daemon_with_exit_2() {
    let site = Site::new(1, "");
    // The queue exists as the original declared it (classic).
    site.publish(&profile("inventory", "7x", "a", prod()), Some("waiting"));
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        text.replace("[rabbit2packer]", "QUEUE_TYPE = quorum\n\n[rabbit2packer]"),
    )
    .unwrap();
    let mut d = site.start();
    assert_eq!(d.wait_exit(T), 2, "exit status; it said:\n{}", d.output());
    let out = d.output();
    let line = format!(
        "{}: [global] QUEUE_TYPE is quorum, but queue {:?} exists on RabbitMQ at amqp://127.0.0.1:{}/ as a classic queue",
        site.config.display(),
        site.queue.name,
        site.queue.broker.port
    );
    assert!(out.contains(&line), "{out}");
    assert_eq!(site.queue_len(), 1, "the message waits in the queue");
    assert!(site.journal().is_empty());
}
