//! The test gate and provenance, end to end: the real daemon, RabbitMQ,
//! packer (null builder whose shell-local step creates the image in Glance,
//! as the openstack builder would), a real Keystone + Glance, and a
//! TEST_COMMAND script that records what it was given and exits as told.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use packuilon_testsupport::cloud::Cloud;
use rabbit2packer::journal::{JobRecord, JobState};
use serde_json::json;
use support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A site whose builds create their image in the test cloud, with a gate.
struct GatedSite {
    site: Site,
    /// Runs the cloud's calls (the site's helpers are blocking).
    rt: tokio::runtime::Runtime,
    cloud: Cloud,
    personality: String,
    /// The live name of the image the profile builds.
    name: String,
}

impl GatedSite {
    fn new(prefix: &str, extra: &str) -> GatedSite {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cloud = rt.block_on(Cloud::new());
        let personality = packuilon_testsupport::unique_name(prefix);
        let name = format!("sl7x-x86_64 {personality}");
        let rc = cloud.openrc();
        // TEST_COMMAND names the test script in the site's dir (made below).
        let site = Site::new(
            1,
            &format!(
                "PACKER_ADMIN_AUTH_FILE = {rc}\nTEST_COMMAND = \"$TEST_DIR/image-test.sh\" --flag\n{extra}",
                rc = rc.display()
            ),
        );
        // Packer and the test get the cloud's credentials.
        std::fs::copy(&rc, site.dir.path().join("auth.sh")).unwrap();
        // The build: one line per packer run, then the image in Glance.
        let builds = site.out.join("builds");
        let t = json!({
            "variables": {"image_name": "$NAME"},
            "builders": [{"type": "null", "communicator": "none"}],
            "provisioners": [{
                "type": "shell-local",
                "inline": [
                    format!("echo \"build|{{{{user `image_name`}}}}\" >> {}", builds.display()),
                    format!("/usr/bin/python3 {}/templates/demo/glance.py create '{{{{user `image_name`}}}}'", repo().display()),
                ]
            }]
        });
        let template = site.templates.join("glance.json");
        std::fs::write(&template, serde_json::to_string_pretty(&t).unwrap()).unwrap();
        site.write_map(json!({"DEFAULT": ["templates/glance.json"]}));
        // The test: records its arguments, environment and the image's name
        // in Glance at the time, then sleeps and exits as out/ tells it.
        let script = site.dir.path().join("image-test.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/bash\n\
                 out={out}\n\
                 seen=$(/usr/bin/python3 {repo}/templates/demo/glance.py show \"$PACKUILON_IMAGE_ID\")\n\
                 echo \"test|$1|$PACKUILON_IMAGE_ID|$PACKUILON_IMAGE_NAME|$PACKUILON_IMAGE_KEY|$PACKUILON_JOB|$seen|${{OS_AUTH_URL:+auth}}|$(cut -d' ' -f5 /proc/$$/stat)\" >> $out/tests\n\
                 echo \"smoke test of $PACKUILON_IMAGE_ID: booting\"\n\
                 [ -e $out/test-sleep ] && sleep \"$(cat $out/test-sleep)\"\n\
                 exit \"$(cat $out/test-exit 2>/dev/null || echo 0)\"\n",
                out = site.out.display(),
                repo = repo().display(),
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        GatedSite {
            site,
            rt,
            cloud,
            personality,
            name,
        }
    }

    /// Runs a cloud call.
    fn on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn start(&self) -> Daemon {
        let dir = self.site.dir.path().display().to_string();
        self.site.start_with_env(&[("TEST_DIR", dir.as_str())])
    }

    fn publish(&self) {
        self.site
            .publish(&profile(&self.personality, "7x", "ral-tier1", prod()), None);
    }

    fn lines(&self, file: &str) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.site.out.join(file))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    fn finished(&self, what: &str) -> JobRecord {
        let jobs = self.site.wait_jobs(what, T, |j| {
            j.len() == 1 && matches!(j[0].state, JobState::Succeeded | JobState::Failed)
        });
        jobs[0].clone()
    }

    /// `Cloud::snapshot` of this site's images only (tests of this file run
    /// at once, on the same project).
    fn snapshot(
        &self,
    ) -> std::collections::BTreeMap<String, (String, bool, std::collections::BTreeMap<String, String>)> {
        let mut all = self.on(self.cloud.snapshot(&self.cloud.admin_project));
        all.retain(|_, (name, _, _)| name.contains(&self.personality));
        all
    }

    /// Every image of the cloud whose name mentions this site's personality.
    fn images(&self) -> Vec<glance_rotate::glance::Image> {
        let all = self.on(self.cloud.glance.list(&[])).unwrap();
        let hidden = self.on(self.cloud.glance.list(&[("os_hidden", "true")])).unwrap();
        all.into_iter()
            .chain(hidden)
            .filter(|i| i.name().contains(&self.personality))
            .collect()
    }

    /// Deletes the images the builds made (the cloud deletes its own).
    fn cleanup(&self) {
        for i in self.images() {
            let _ = self.on(self.cloud.glance.delete_image(&i.id));
        }
        self.on(self.cloud.cleanup());
    }
}

fn wait_for(what: &str, timeout: Duration, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_passing_test_promotes_the_image_with_its_provenance_and_rotates() {
    let g = GatedSite::new("gate-pass", "");
    let owner = g.cloud.admin_project.clone();
    let older = g.on(g.cloud.image(&g.name, &owner, "shared"));
    let consumer = g.on(g.cloud.project("gate-consumer"));
    g.on(g.cloud.share(&older.id, &consumer, "accepted"));

    let mut d = g.start();
    g.publish();
    let job = g.finished("the gated build");
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}\n{}", d.output());
    assert_eq!(job.outcome, "succeeded");
    let build = &job.builds[0];
    assert_eq!(build.test.as_deref(), Some("passed"));
    assert_eq!(build.test_exit_code, Some(0));
    assert_eq!(build.source_image.as_deref(), Some("src-7x-uuid"));
    let new_id = build.images[0].id.clone();
    assert_eq!(build.images[0].name, g.name);

    // The test ran once, on the staged image, with what the issue names.
    let tests = g.lines("tests");
    assert_eq!(tests.len(), 1, "{tests:?}");
    let t = &tests[0];
    assert_eq!(t[1], "--flag", "TEST_COMMAND runs through bash with its arguments");
    assert_eq!(t[2], new_id);
    assert_eq!(t[3], g.name, "PACKUILON_IMAGE_NAME is the live name");
    assert_eq!(t[4], format!("{}-sl7x-x86_64", g.personality));
    assert_eq!(t[5], job.id.to_string());
    assert_eq!(t[6], format!("next-{}", g.name), "the image was staged while tested");
    assert_eq!(t[7], "auth", "PACKER_AUTH_FILE was sourced");

    // Live: the new image under its name with its provenance, the older one archived, members moved.
    let new = g.on(g.cloud.get(&new_id));
    assert_eq!(new.name(), g.name);
    for (k, v) in [
        ("aq_personality", g.personality.as_str()),
        ("aq_os", "sl"),
        ("aq_osversion", "7x-x86_64"),
        ("aq_archetype", "ral-tier1"),
        ("aq_domain", "prod"),
        ("packuilon_source_image", "src-7x-uuid"),
        ("packuilon_profile", "test-profile.json"),
    ] {
        assert_eq!(new.property(k), Some(v), "{k}: {new:?}");
    }
    assert_eq!(new.property("packuilon_job"), Some(job.id.to_string().as_str()));
    assert_eq!(
        new.property("packuilon_image_key"),
        Some(format!("{}-sl7x-x86_64", g.personality).as_str())
    );
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(new.property("image_build_date"), Some(today.as_str()));
    let build_file = std::fs::read(
        g.site
            .build_dir
            .join(format!("{}-sl7x-x86_64.glance.json.json", g.personality)),
    )
    .unwrap();
    assert_eq!(
        new.property("packuilon_template_sha256").map(str::to_string),
        Some(hex_sha256(&build_file))
    );
    assert!(
        new.property("packuilon_packer_version")
            .is_some_and(|v| v.starts_with('1')),
        "{new:?}"
    );
    assert!(new.property("packuilon_builder_host").is_some_and(|h| !h.is_empty()));
    assert_eq!(new.property("packuilon_profile_sha256").map(str::len), Some(64));
    assert!(g.on(g.cloud.get(&older.id)).name().starts_with("archive-"));
    assert_eq!(
        g.on(g.cloud.members(&new_id)).get(&consumer).map(String::as_str),
        Some("accepted")
    );

    // The test's output and trailer follow packer's in the build log.
    let log = std::fs::read_to_string(build.log_path.as_deref().unwrap()).unwrap();
    let packer_end = log.find("Build finished at").expect("packer's trailer");
    let test_out = log
        .find(&format!("smoke test of {new_id}: booting"))
        .expect("the test's output");
    assert!(packer_end < test_out, "{log}");
    assert!(log.trim_end().ends_with("with exit code 0"), "{log}");
    assert!(log.contains("Test finished at"), "{log}");

    // /metrics counts it.
    let metrics = support::browser::Http::new(d.status_addr()).get("/metrics").1;
    assert!(
        metrics.contains("packuilon_image_tests_total{result=\"passed\"} 1"),
        "{metrics}"
    );
    d.stop();
    g.cleanup();
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A failed (or timed-out) test: the new image is BROKEN_NAME and private,
/// the live image keeps its name and members, the job is "built, test failed".
fn a_failing_gate_leaves_the_live_image_alone(prefix: &str, extra: &str, expect_error: &str, exit: Option<i64>) {
    let g = GatedSite::new(prefix, extra);
    let owner = g.cloud.admin_project.clone();
    let live = g.on(g.cloud.image(&g.name, &owner, "shared"));
    let consumer = g.on(g.cloud.project("gate-consumer"));
    g.on(g.cloud.share(&live.id, &consumer, "accepted"));
    std::fs::write(g.site.out.join("test-exit"), "3").unwrap();

    let mut d = g.start();
    g.publish();
    let job = g.finished("the gated build");
    assert_eq!(job.state, JobState::Failed, "{job:#?}\n{}", d.output());
    assert_eq!(job.outcome, "built, test failed");
    let error = job.error.as_deref().unwrap();
    assert!(
        error.contains("built, test failed") && error.contains(expect_error),
        "{error}"
    );
    let build = &job.builds[0];
    assert_eq!(build.exit_code, Some(0), "packer succeeded");
    assert_eq!(build.test_exit_code, exit);
    assert_eq!(build.rotation, None, "no rotation after a failed test");

    let new = g.on(g.cloud.get(&build.images[0].id));
    assert!(new.name().starts_with(&format!("broken-{} ", g.name)), "{new:?}");
    assert_eq!(new.visibility, "private");
    assert_eq!(new.property("packuilon_broken_of"), Some(g.name.as_str()));
    // The live image and its member are as they were.
    let still = g.on(g.cloud.get(&live.id));
    assert_eq!(still.name(), g.name);
    assert_eq!(still.visibility, "shared");
    assert_eq!(
        g.on(g.cloud.members(&live.id)).get(&consumer).map(String::as_str),
        Some("accepted")
    );
    assert_eq!(
        g.on(g.cloud.named(&g.name, &owner)).len(),
        1,
        "one image of the live name"
    );
    d.wait_log("built, test failed", T);
    d.stop();

    // history shows it so.
    let (code, out, _) = g.site.cli(&["history"]);
    assert_eq!(code, 0);
    assert!(out.contains("built, test failed"), "{out}");
    g.cleanup();
}

#[test]
fn a_failing_test_renames_the_image_broken_and_leaves_the_live_one_alone() {
    a_failing_gate_leaves_the_live_image_alone("gate-fail", "", "TEST_COMMAND exited with code 3", Some(3));
}

#[test]
fn a_test_that_times_out_is_a_failed_test() {
    // The script sleeps 60 s; TEST_TIMEOUT is 2 s.
    let g = GatedSite::new("gate-timeout", "TEST_TIMEOUT = 2\n");
    std::fs::write(g.site.out.join("test-sleep"), "60").unwrap();
    let owner = g.cloud.admin_project.clone();
    let live = g.on(g.cloud.image(&g.name, &owner, "shared"));
    let started = Instant::now();
    let mut d = g.start();
    g.publish();
    let job = g.finished("the gated build");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the test was not stopped at TEST_TIMEOUT"
    );
    assert_eq!(job.outcome, "built, test failed", "{job:#?}\n{}", d.output());
    let error = job.error.as_deref().unwrap();
    assert!(error.contains("timed out after 2s (TEST_TIMEOUT)"), "{error}");
    let new = g.on(g.cloud.get(&job.builds[0].images[0].id));
    assert!(new.name().starts_with("broken-"), "{new:?}");
    assert_eq!(g.on(g.cloud.get(&live.id)).name(), g.name);
    // The test's process group is gone.
    let group: i32 = g.lines("tests")[0][8].parse().unwrap();
    assert!(!group_alive(group), "the timed-out test's process group is still alive");
    d.stop();
    g.cleanup();
}

#[test]
fn a_daemon_killed_during_the_test_runs_the_test_again_not_the_build() {
    resumes_at_the_test("gate-kill", libc::SIGKILL);
}

#[test]
fn a_daemon_stopped_during_the_test_runs_the_test_again_not_the_build() {
    resumes_at_the_test("gate-stop", libc::SIGTERM);
}

/// The daemon gets `signal` while TEST_COMMAND runs; the next start tests
/// the same image again and builds nothing.
fn resumes_at_the_test(prefix: &str, signal: i32) {
    let g = GatedSite::new(prefix, "");
    std::fs::write(g.site.out.join("test-sleep"), "300").unwrap();
    let mut d = g.start();
    g.publish();
    wait_for("the test to start", T, || g.lines("tests").len() == 1);
    let staged = g.lines("tests")[0][2].clone();
    let (_, status, _) = g.site.cli(&["status"]);
    assert!(status.contains(&format!("testing glance.json ({staged})")), "{status}");
    d.signal(signal);
    let code = d.wait_exit(T);
    let group: i32 = g.lines("tests")[0][8].parse().unwrap();
    if signal == libc::SIGTERM {
        assert_eq!(code, 0, "a stop is clean: {}", d.output());
        // The test was interrupted, not left running.
        assert!(!group_alive(group), "the test's process group outlived the stop");
    }
    assert_eq!(g.lines("builds").len(), 1);
    // The staged image is not live meanwhile.
    assert_eq!(g.on(g.cloud.get(&staged)).name(), format!("next-{}", g.name));

    // The next start: the test passes this time.
    std::fs::remove_file(g.site.out.join("test-sleep")).unwrap();
    let mut d = g.start();
    let job = g.finished("the resumed job");
    // What the killed daemon's test left running was stopped at the start.
    assert!(!group_alive(group), "the old test's process group is still alive");
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}\n{}", d.output());
    assert_eq!(g.lines("builds").len(), 1, "the image was not built again");
    let tests = g.lines("tests");
    assert_eq!(tests.len(), 2, "{tests:?}");
    assert_eq!(tests[1][2], staged, "the same image was tested again");
    assert_eq!(g.on(g.cloud.get(&staged)).name(), g.name);
    d.wait_log("running the test again, not the build", T);
    d.stop();
    g.cleanup();
}

#[test]
fn a_job_cancelled_during_its_test_leaves_no_staged_image_and_does_not_run_again() {
    let g = GatedSite::new("gate-cancel", "");
    std::fs::write(g.site.out.join("test-sleep"), "300").unwrap();
    let mut d = g.start();
    g.publish();
    wait_for("the test to start", T, || g.lines("tests").len() == 1);
    let staged = g.lines("tests")[0][2].clone();
    let job = g.lines("tests")[0][5].clone();
    let (code, out, err) = g.site.cli(&["cancel", &job]);
    assert_eq!(code, 0, "{out}{err}");
    let jobs = g.site.wait_jobs("the cancelled job", T, |j| {
        j.len() == 1 && j[0].state == JobState::Cancelled
    });
    assert_eq!(jobs[0].builds[0].test.as_deref(), Some("cancelled during the test"));
    let image = g.on(g.cloud.get(&staged));
    assert!(image.name().starts_with("broken-"), "{image:?}");
    assert_eq!(image.visibility, "private");
    // A restart does not take it up again.
    d.stop();
    let mut d = g.start();
    d.wait_log("Ready:", T);
    assert_eq!(g.lines("tests").len(), 1);
    assert_eq!(g.lines("builds").len(), 1);
    d.stop();
    g.cleanup();
}

#[test]
fn rollback_puts_the_previous_image_and_its_members_back_and_a_rerun_changes_nothing() {
    let g = GatedSite::new("gate-rollback", "");
    let owner = g.cloud.admin_project.clone();
    let older = g.on(g.cloud.image(&g.name, &owner, "shared"));
    let consumer = g.on(g.cloud.project("rollback-consumer"));
    g.on(g.cloud.share(&older.id, &consumer, "accepted"));
    let mut d = g.start();
    g.publish();
    let job = g.finished("the build");
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}\n{}", d.output());
    let new_id = job.builds[0].images[0].id.clone();
    d.stop();
    let key = format!("{}-sl7x-x86_64", g.personality);

    // A dry run says what it would do and changes nothing.
    let before = g.snapshot();
    let (code, out, err) = g.site.cli(&["rollback", &key, "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("move member {consumer} from {new_id} to {}", older.id)),
        "{out}"
    );
    assert_eq!(g.snapshot(), before);

    let (code, out, err) = g.site.cli(&["rollback", &key]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("rolled back {:?}: image {}", g.name, older.id)),
        "{out}"
    );
    let restored = g.on(g.cloud.get(&older.id));
    assert_eq!(restored.name(), g.name);
    assert_eq!(restored.property("packuilon_archive_of"), None);
    assert_eq!(
        g.on(g.cloud.members(&older.id)).get(&consumer).map(String::as_str),
        Some("accepted")
    );
    let broken = g.on(g.cloud.get(&new_id));
    assert!(broken.name().starts_with(&format!("broken-{} ", g.name)), "{broken:?}");
    assert_eq!(broken.visibility, "private");

    // Again: nothing to do, nothing changed.
    let after = g.snapshot();
    let (code, out, _) = g.site.cli(&["rollback", &key]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already rolled back"), "{out}");
    assert_eq!(g.snapshot(), after);

    // An image key the journal has never seen: exit 2, named.
    let (code, _, err) = g.site.cli(&["rollback", "nosuch-sl7x-x86_64"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no profile of image \"nosuch-sl7x-x86_64\""), "{err}");
    g.cleanup();
}

#[test]
fn an_image_left_staged_by_a_job_superseded_at_a_restart_is_renamed_broken() {
    let g = GatedSite::new("gate-orphan", "");
    std::fs::write(g.site.out.join("test-sleep"), "300").unwrap();
    let mut d = g.start();
    g.publish();
    wait_for("the first test to start", T, || g.lines("tests").len() == 1);
    let first = g.lines("tests")[0][2].clone();
    // A newer profile of the image waits behind the job at its test; the
    // daemon dies; at the restart the newer one supersedes the older.
    g.site
        .publish(&profile(&g.personality, "7x", "ral-tier2", prod()), None);
    g.site.wait_jobs("the newer request", T, |j| {
        j.len() == 2 && j[1].state == JobState::Waiting
    });
    d.signal(libc::SIGKILL);
    d.wait_exit(T);
    std::fs::remove_file(g.site.out.join("test-sleep")).unwrap();
    let mut d = g.start();
    let jobs = g.site.wait_jobs("the newer job", T, |j| {
        j.len() == 2 && j[1].state == JobState::Succeeded
    });
    assert_eq!(jobs[0].state, JobState::Superseded, "{jobs:#?}");
    assert!(
        jobs[0].builds[0]
            .test
            .as_deref()
            .is_some_and(|t| t.starts_with("not tested: superseded by job")),
        "{jobs:#?}"
    );
    assert_eq!(g.lines("builds").len(), 2);
    let second = jobs[1].builds[0].images[0].id.clone();
    assert_ne!(second, first);
    assert_eq!(g.on(g.cloud.get(&second)).name(), g.name);
    let orphan = g.on(g.cloud.get(&first));
    assert!(orphan.name().starts_with(&format!("broken-{} ", g.name)), "{orphan:?}");
    assert_eq!(orphan.visibility, "private");
    d.stop();
    g.cleanup();
}
