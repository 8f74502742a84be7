//! `rabbit2packer rebuild`, `cancel` and `retry` against the running daemon
//! (real packer, real RabbitMQ), and refused to a user who is neither root
//! nor the service user (run as `nobody` through util-linux's setpriv).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use rabbit2packer::journal::JobState;
use support::{group_alive, in_state, prod, profile, succeeded, Site, Step};

const T: Duration = Duration::from_secs(60);
const KEY: &str = "inventory-sl7x-x86_64";

#[test]
fn rebuild_cancel_and_retry_reach_the_running_daemon() {
    let site = Site::new(1, "");
    let mut d = site.start();
    d.wait_log("Ready:", T);

    // Nothing journaled for the image yet: a clear error, exit 1.
    let (code, _, err) = site.cli(&["rebuild", KEY]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "no profile of image \"{KEY}\" in the journal: nothing to rebuild from"
        )),
        "{err}"
    );

    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("the first build", T, |j| succeeded(j) == 1);

    // rebuild: a new job with the image's last profile, built while the daemon runs.
    site.template("a.json", Step { sleep: 60.0, exit: 0 });
    let (code, out, err) = site.cli(&["rebuild", KEY]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("job 2 queued: a rebuild of {KEY} with the profile of job 1")),
        "{out}"
    );
    site.wait_runs("the rebuild's packer", T, |r| {
        r.iter().filter(|l| l[0] == "start").count() == 2
    });
    let pgid: i32 = site.starts()[1][4].parse().unwrap();

    // A rebuild while it builds waits; cancelling it drops it.
    let (code, out, err) = site.cli(&["rebuild", KEY]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("job 3 queued"), "{out}");
    let (code, out, err) = site.cli(&["cancel", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("job 3 (inventory-sl7x-x86_64) cancelled; it was waiting"),
        "{out}"
    );

    // Cancelling the running job interrupts packer's process group cleanly.
    let (code, out, err) = site.cli(&["cancel", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("job 2 (inventory-sl7x-x86_64) cancelled; packer is interrupted"),
        "{out}"
    );
    let jobs = site.wait_jobs("job 2 cancelled", T, |j| {
        j.len() == 3 && j[1].state == JobState::Cancelled
    });
    assert_eq!(jobs[2].state, JobState::Cancelled);
    assert!(
        jobs[1]
            .error
            .as_deref()
            .unwrap()
            .starts_with("cancelled by root (uid 0)"),
        "{:?}",
        jobs[1].error
    );
    assert!(!group_alive(pgid), "packer's group is gone");
    let log = std::fs::read_to_string(jobs[1].builds[0].log_path.as_deref().unwrap()).unwrap();
    assert!(
        log.contains("Cleanly cancelled builds after being interrupted."),
        "{log}"
    );
    assert!(log.contains("the job was cancelled (rabbit2packer cancel)"), "{log}");
    let (_, history, _) = site.cli(&["history"]);
    assert!(history.contains("cancelled"), "{history}");
    // Only the rebuild ran: the cancelled waiting job never started.
    assert_eq!(site.starts().len(), 2);

    // Finished jobs cannot be cancelled; a succeeded one cannot be retried.
    let (code, _, err) = site.cli(&["cancel", "1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("job 1 (inventory-sl7x-x86_64) is succeeded: only a waiting or running job"),
        "{err}"
    );
    let (code, _, err) = site.cli(&["retry", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("only a failed or cancelled job can be retried"), "{err}");
    let (code, _, err) = site.cli(&["retry", "99"]);
    assert_eq!(code, 1);
    assert!(err.contains("no job 99 in the journal"), "{err}");
    let (code, _, _) = site.cli(&["cancel", "two"]);
    assert_eq!(code, 2, "bad arguments");

    // retry: the failed (here: cancelled) job runs again as a new job.
    site.template("a.json", Step { sleep: 0.3, exit: 0 });
    let (code, out, err) = site.cli(&["retry", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("job 4 queued: a retry of job 3"), "{out}");
    site.wait_jobs("the retry", T, |j| succeeded(j) == 2);

    std::fs::write(site.out.join("fail"), "").unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("a failed job", T, |j| in_state(j, JobState::Failed).len() == 1);
    std::fs::remove_file(site.out.join("fail")).unwrap();
    let (code, out, err) = site.cli(&["retry", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("job 6 queued: a retry of job 5"), "{out}");
    site.wait_jobs("the retried failure", T, |j| succeeded(j) == 3);
    d.stop();

    // No daemon: the command says so.
    let (code, _, err) = site.cli(&["rebuild", KEY]);
    assert_eq!(code, 1);
    assert!(err.contains("is rabbit2packer running with this STATE_DIR?"), "{err}");
}

#[test]
fn a_user_other_than_root_or_the_service_user_is_refused() {
    let site = Site::new(1, "");
    let mut d = site.start();
    d.wait_log("Ready:", T);
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("the first build", T, |j| succeeded(j) == 1);
    // Let nobody reach the socket's directory and read the config: only
    // the socket itself stands in the way.
    for dir in [site.dir.path(), &site.state_dir] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&site.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let socket = site.state_dir.join("control.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_rabbit2packer"))
            .args(args)
            .arg("--config")
            .arg(&site.config)
            .output()
            .expect("setpriv (util-linux)")
    };
    for args in [vec!["rebuild", KEY], vec!["cancel", "1"], vec!["retry", "1"]] {
        let out = as_nobody(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("permission denied: only root or the user rabbit2packer runs as"),
            "{err}"
        );
    }
    // Even with the socket's mode loosened by hand, the daemon checks who
    // is calling (SO_PEERCRED) and refuses.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&["rebuild", KEY]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied: only root or the user rabbit2packer runs as (uid 0) may do this"),
        "{err}"
    );
    d.wait_log("control socket: refused a command from uid 65534", T);
    // Nothing was queued.
    assert_eq!(site.journal().len(), 1);
    d.stop();
}
