//! `rename-old-images` as operators and the original's post-processor call
//! it, against a real Keystone + Glance: exit codes, the word-joined name,
//! --dry-run, the config's rotation keys, and what the log lines say.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use glance_rotate::rotate::archive_name;
use glance_rotate::RotateOptions;
use packuilon_testsupport::cloud::{write_rc, Cloud};
use packuilon_testsupport::unique_name;

/// Runs the binary with only PATH from this environment (no stray OS_* variables).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_rename-old-images"))
        .args(["--log", "stderr"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("running rename-old-images");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn config(dir: &Path, body: &str) -> String {
    let path = dir.join("config.ini");
    std::fs::write(&path, format!("[rabbit2packer]\n{body}")).unwrap();
    path.display().to_string()
}

fn today_archive(name: &str) -> String {
    archive_name(&RotateOptions::default().archive_name, name, chrono::Local::now())
}

#[tokio::test]
async fn the_original_call_form_joins_words_into_the_name_and_archives_older_images() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    let owner = cloud.project("cli-words").await;
    let member = cloud.project("cli-member").await;
    let personality = unique_name("inventory");
    let name = format!("sl7x-x86_64 {personality} AQ");
    let old = cloud.image(&name, &owner, "shared").await;
    cloud.share(&old.id, &member, "pending").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = cloud.image(&name, &owner, "shared").await;
    let cfg = config(dir.path(), "");
    let rc = cloud.openrc().display().to_string();

    let (code, log) = run(
        &["--config", &cfg, "--auth-file", &rc, "sl7x-x86_64", &personality, "AQ"],
        &[],
    );

    assert_eq!(code, 0, "{log}");
    assert_eq!(cloud.get(&old.id).await.name(), today_archive(&name));
    assert_eq!(cloud.get(&new.id).await.name(), name);
    assert_eq!(
        cloud.members(&new.id).await.get(&member).map(String::as_str),
        Some("accepted")
    );
    // The log says what was renamed and which member moved, with image IDs.
    assert!(log.contains(&format!("Renamed image {}", old.id)), "{log}");
    assert!(log.contains(&today_archive(&name)), "{log}");
    assert!(
        log.contains(&format!(
            "Moved member {member} from image {} to image {}",
            old.id, new.id
        )),
        "{log}"
    );
    assert!(
        !log.contains(&cloud.env["OS_PASSWORD"]),
        "the password leaked into the log"
    );
    cloud.cleanup().await;
}

#[tokio::test]
async fn no_older_image_means_nothing_to_do_and_exit_0() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    let owner = cloud.project("cli-alone").await;
    let name = unique_name("alone");
    let only = cloud.image(&name, &owner, "shared").await;
    let cfg = config(dir.path(), "");
    let rc = cloud.openrc().display().to_string();

    let (code, log) = run(&["--config", &cfg, "--auth-file", &rc, &name], &[]);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("0 image(s) archived"), "{log}");
    assert_eq!(cloud.get(&only.id).await.name(), name);

    // A name nobody has: nothing to do either.
    let (code, log) = run(&["--config", &cfg, "--auth-file", &rc, &unique_name("nobody")], &[]);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("Nothing to rotate"), "{log}");
    cloud.cleanup().await;
}

#[tokio::test]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    let owner = cloud.project("cli-dry").await;
    let member = cloud.project("cli-dry-member").await;
    let name = unique_name("dry run");
    let old = cloud.image(&name, &owner, "shared").await;
    cloud.share(&old.id, &member, "accepted").await;
    let new = cloud.image(&name, &owner, "private").await;
    let cfg = config(dir.path(), "HIDE_ARCHIVED = true\nKEEP_ARCHIVES = 1\n");
    let rc = cloud.openrc().display().to_string();
    let before = cloud.snapshot(&owner).await;

    let (code, log) = run(
        &["--config", &cfg, "--auth-file", &rc, "--dry-run", "--image-id", &new.id],
        &[],
    );

    assert_eq!(code, 0, "{log}");
    assert!(log.contains(&format!("Would rename image {}", old.id)), "{log}");
    assert!(log.contains(&format!("Would move member {member}")), "{log}");
    assert!(log.contains("dry run: nothing changed"), "{log}");
    assert!(
        log.contains(&format!("rename {} {name:?} -> {:?}", old.id, today_archive(&name))),
        "{log}"
    );
    assert!(log.contains(&format!("share {}", new.id)), "{log}");
    assert_eq!(cloud.snapshot(&owner).await, before);
    assert_eq!(cloud.get(&new.id).await.visibility, "private");
    cloud.cleanup().await;
}

#[tokio::test]
async fn config_archive_name_and_hide_archived_apply_and_credentials_come_from_the_config() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    let owner = cloud.project("cli-config").await;
    let name = unique_name("configured");
    let old = cloud.image(&name, &owner, "shared").await;
    let new = cloud.image(&name, &owner, "shared").await;
    let rc = cloud.openrc().display().to_string();
    let cfg = config(
        dir.path(),
        &format!("PACKER_ADMIN_AUTH_FILE = {rc}\nARCHIVE_NAME = old {{name}} at {{datetime}}\nHIDE_ARCHIVED = yes\n"),
    );

    let (code, log) = run(&["--config", &cfg, "--image-id", &new.id], &[]);

    assert_eq!(code, 0, "{log}");
    let archived = cloud.get(&old.id).await;
    assert!(
        archived.name().starts_with(&format!("old {name} at 20")),
        "{}",
        archived.name()
    );
    assert!(archived.os_hidden);
    cloud.cleanup().await;
}

#[tokio::test]
async fn credentials_from_the_environment_work_without_an_auth_file() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    let owner = cloud.project("cli-env").await;
    let name = unique_name("from env");
    let old = cloud.image(&name, &owner, "shared").await;
    let new = cloud.image(&name, &owner, "shared").await;
    let cfg = config(dir.path(), "");
    let env: Vec<(&str, &str)> = cloud.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let (code, log) = run(&["--config", &cfg, "--image-id", &new.id], &env);

    assert_eq!(code, 0, "{log}");
    assert_eq!(cloud.get(&old.id).await.name(), today_archive(&name));
    cloud.cleanup().await;
}

#[tokio::test]
async fn a_bad_password_fails_with_exit_1_naming_the_status_but_not_the_secret() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "n0t-the-Passw0rd-8472";
    let mut vars: Vec<(&str, &str)> = cloud
        .env
        .iter()
        .filter(|(k, _)| k.as_str() != "OS_PASSWORD")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    vars.push(("OS_PASSWORD", secret));
    let rc = write_rc(dir.path(), "wrong-openrc.sh", &vars).display().to_string();
    let cfg = config(dir.path(), "");

    let (code, log) = run(&["--config", &cfg, "--auth-file", &rc, "any name"], &[]);

    assert_eq!(code, 1, "{log}");
    assert!(log.contains("Keystone POST") && log.contains("HTTP 401"), "{log}");
    assert!(!log.contains(secret), "the password leaked: {log}");
}

#[test]
fn bad_arguments_and_config_are_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    // No name and no --image-id.
    let (code, log) = run(&["--config", &cfg], &[]);
    assert_eq!(code, 2, "{log}");
    // Both.
    let (code, log) = run(&["--config", &cfg, "--image-id", "x", "name"], &[]);
    assert_eq!(code, 2, "{log}");
    // No credentials anywhere.
    let (code, log) = run(&["--config", &cfg, "some", "name"], &[]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("OS_AUTH_URL"), "{log}");
    // A config that is not there, or a bad key, is named.
    let missing = dir.path().join("missing.ini").display().to_string();
    let (code, log) = run(&["--config", &missing, "name"], &[]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("missing.ini"), "{log}");
    let bad = dir.path().join("bad.ini");
    std::fs::write(&bad, "[rabbit2packer]\nARCHIVE_NAME = archive {date}\n").unwrap();
    let bad = bad.display().to_string();
    let (code, log) = run(&["--config", &bad, "name"], &[]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("ARCHIVE_NAME"), "{log}");
    // An auth file that is not there.
    let (code, log) = run(
        &["--config", &cfg, "--auth-file", "/nonexistent/openrc.sh", "name"],
        &[],
    );
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("/nonexistent/openrc.sh"), "{log}");
}

#[test]
fn help_explains_the_call() {
    let (code, out) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for word in ["--auth-file", "--image-id", "--dry-run", "--config", "WORD"] {
        assert!(out.contains(word), "{out}");
    }
}

#[tokio::test]
async fn show_and_rollback_from_the_command_line() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    let owner = cloud.project("cli-rollback").await;
    let member = cloud.project("cli-rollback-member").await;
    let personality = unique_name("rollback");
    let name = format!("sl7x-x86_64 {personality}");
    let old = cloud.image(&name, &owner, "shared").await;
    cloud.share(&old.id, &member, "accepted").await;
    let new = cloud.image(&name, &owner, "shared").await;
    glance_rotate::rotate(
        &cloud.glance,
        glance_rotate::Target::ImageId(new.id.clone()),
        &RotateOptions::default(),
    )
    .await
    .unwrap();
    let cfg = config(dir.path(), "BROKEN_NAME = bad {name}\n");
    let rc = cloud.openrc().display().to_string();
    let base = ["--config", cfg.as_str(), "--auth-file", rc.as_str()];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra)
            .map(|s| s.to_string())
            .chain(["sl7x-x86_64".to_string(), personality.clone()])
            .collect()
    };
    let call = |extra: &[&str]| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&refs, &[])
    };

    let (code, out) = call(&["--show"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ROLE") && out.contains("MEMBERS"), "{out}");
    assert!(out.contains(&format!("live     {}", new.id)), "{out}");
    assert!(out.contains(&format!("archive  {}", old.id)), "{out}");

    let before = cloud.snapshot(&owner).await;
    let (code, out) = call(&["--rollback", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("move member {member} from {} to {}", new.id, old.id)),
        "{out}"
    );
    assert!(
        out.contains(&format!("rename {} {name:?} -> \"bad {name}\" (private)", new.id)),
        "{out}"
    );
    assert_eq!(cloud.snapshot(&owner).await, before, "--dry-run changes nothing");

    let (code, out) = call(&["--rollback"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("rolled back {name:?}: image {}", old.id)),
        "{out}"
    );
    assert_eq!(cloud.get(&old.id).await.name(), name);
    assert_eq!(cloud.get(&new.id).await.name(), format!("bad {name}"));

    let (code, out) = call(&["--rollback"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already rolled back"), "{out}");

    let (code, out) = call(&["--show", "--json"]);
    assert_eq!(code, 0, "{out}");
    // stdout (the list, its `]` alone on a line) comes before the log lines.
    let json_part = &out[..out.find("\n]").expect("a JSON list") + 2];
    let shown: serde_json::Value = serde_json::from_str(json_part).unwrap();
    let roles: Vec<(&str, &str)> = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["role"].as_str().unwrap(), i["id"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, vec![("live", old.id.as_str()), ("broken", new.id.as_str())]);
    assert_eq!(shown[0]["members"], 1);

    // Nothing older left: exit 1, naming the name.
    let (code, out) = call(&["--rollback", "--again"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("no archive of {name:?} to roll back to")),
        "{out}"
    );
    cloud.cleanup().await;
}

#[test]
fn show_and_rollback_arguments_that_do_not_fit_are_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    for args in [
        vec!["--show"],
        vec!["--rollback"],
        vec!["--show", "--rollback", "name"],
        vec!["--show", "--image-id", "x"],
        vec!["--rollback", "--image-id", "x"],
        vec!["--show", "--dry-run", "name"],
        vec!["--again", "name"],
        vec!["--json", "name"],
    ] {
        let mut all = vec!["--config", cfg.as_str()];
        all.extend(&args);
        let (code, out) = run(&all, &[]);
        assert_eq!(code, 2, "{args:?}: {out}");
    }
    let (code, out) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for word in ["--show", "--rollback", "--again", "--json", "BROKEN_NAME"] {
        assert!(out.contains(word), "{out}");
    }
}
