//! `rabbit2packer plan PROFILE.json`: the real binary, the real `packer
//! validate`, a site's own template map and source images; nothing is
//! built and no broker or journal is touched.

mod support;

use std::path::PathBuf;

use serde_json::{json, Value};
use support::{prod, profile, Site, Step};

fn write_profile(site: &Site, v: &Value) -> PathBuf {
    let path = site.dir.path().join("profile.json");
    std::fs::write(&path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    path
}

#[test]
fn a_good_profile_is_planned_without_building_anything() {
    let site = Site::new(1, "");
    let p = write_profile(&site, &profile("inventory", "7x", "ral", prod()));
    let out = site.dir.path().join("plan-out");
    let (code, stdout, stderr) = site.cli(&["plan", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for line in [
        "image key: inventory-sl7x-x86_64",
        "templates (the DEFAULT entry of",
        "source image: src-7x-uuid (entry \"sl7x-x86_64\")",
        "packer validate: ok",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    // The build file is what a build would run, with the job's values.
    let build_file = stdout
        .lines()
        .find_map(|l| l.strip_prefix("build file: "))
        .unwrap_or_else(|| panic!("no build file line in:\n{stdout}"));
    assert!(build_file.starts_with(out.to_str().unwrap()), "{build_file}");
    let text = std::fs::read_to_string(build_file).unwrap();
    assert!(text.contains("src-7x-uuid"), "{text}");
    // Nothing ran: no packer build, no journal.
    assert!(!site.out.join("runs").exists(), "a build ran");
    assert!(!site.state_dir.join("rabbit2packer.sqlite").exists());
}

#[test]
fn a_profile_without_a_source_image_is_named_and_exits_1() {
    let site = Site::new(1, "");
    let p = write_profile(&site, &profile("inventory", "9x", "ral", prod()));
    let (code, stdout, stderr) = site.cli(&["plan", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("FAIL source image: no \"sl9x-x86_64\" in"), "{stdout}");
    assert!(stdout.contains("(IMAGES_CONFIG)"), "{stdout}");
}

#[test]
fn a_template_packer_validate_rejects_is_named_and_exits_1() {
    let site = Site::new(1, "");
    site.template("good.json", Step { sleep: 0.0, exit: 0 });
    std::fs::write(
        site.templates.join("bad.json"),
        serde_json::to_vec(&json!({"builders": [{"type": "no-such-builder", "name": "$NAME"}]})).unwrap(),
    )
    .unwrap();
    site.write_map(json!({
        "DEFAULT": ["templates/a.json"],
        "inventory-sl7x-x86_64": ["templates/good.json", "templates/bad.json"]
    }));
    let p = write_profile(&site, &profile("inventory", "7x", "ral", prod()));
    let (code, stdout, stderr) = site.cli(&["plan", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("templates (its own entry in"), "{stdout}");
    // One section per template, after the header.
    let good = stdout.split("\n== ").skip(1).find(|s| s.contains("good.json")).unwrap();
    assert!(good.contains("packer validate: ok"), "{stdout}");
    let bad = stdout.split("\n== ").skip(1).find(|s| s.contains("bad.json")).unwrap();
    assert!(bad.contains("FAIL packer validate: exit 1"), "{stdout}");
    assert!(
        bad.contains("no-such-builder"),
        "packer's own words are shown: {stdout}"
    );
}

#[test]
fn a_missing_or_malformed_profile_exits_2_naming_it() {
    let site = Site::new(1, "");
    let missing = site.dir.path().join("nope.json");
    let (code, _, stderr) = site.cli(&["plan", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("{}: cannot read", missing.display())),
        "{stderr}"
    );

    let bad = site.dir.path().join("bad.json");
    std::fs::write(&bad, b"{ not json").unwrap();
    let (code, _, stderr) = site.cli(&["plan", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("{}: not a profile", bad.display())),
        "{stderr}"
    );
}

/// `--rotation` against the real Keystone and Glance: what would be archived
/// and which member would move, with nothing changed.
#[test]
fn rotation_shows_what_would_be_archived_and_moved_and_changes_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cloud = rt.block_on(packuilon_testsupport::cloud::Cloud::new());
    let personality = packuilon_testsupport::unique_name("plan-rot");
    let name = format!("sl7x-x86_64 {personality}");
    let owner = cloud.admin_project.clone();
    let live = rt.block_on(cloud.image(&name, &owner, "shared"));
    let consumer = rt.block_on(cloud.project("plan-consumer"));
    rt.block_on(cloud.share(&live.id, &consumer, "accepted"));
    // This test's images only: the project is shared with other tests.
    let snapshot = || {
        let mut all = rt.block_on(cloud.snapshot(&owner));
        all.retain(|_, (name, _, _)| name.contains(&personality));
        all
    };
    let before = snapshot();

    let rc = cloud.openrc();
    let site = Site::new(
        1,
        &format!("PACKER_ADMIN_AUTH_FILE = {}\nTEST_COMMAND = /bin/true\n", rc.display()),
    );
    let p = write_profile(&site, &profile(&personality, "7x", "ral", prod()));
    let (code, stdout, stderr) = site.cli(&["plan", p.to_str().unwrap(), "--rotation"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let today = chrono::Local::now().format("%Y-%m-%d");
    for line in [
        format!("test gate: each new image waits as \"next-{name}\""),
        "rotation (read-only preview".to_string(),
        format!("would archive {} \"{name}\" as \"archive-{name} {today}\"", live.id),
        format!("would move member {consumer} from {} to the new image", live.id),
    ] {
        assert!(stdout.contains(&line), "{line:?} missing from:\n{stdout}");
    }
    assert_eq!(snapshot(), before, "plan changed Glance");

    // A name with no image: nothing to archive. Glance unreachable: a FAIL line, exit 1.
    let p = write_profile(&site, &profile(&format!("{personality}-new"), "7x", "ral", prod()));
    let (code, stdout, _) = site.cli(&["plan", p.to_str().unwrap(), "--rotation"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("nothing to archive"), "{stdout}");
    let dead = packuilon_testsupport::cloud::write_rc(
        site.dir.path(),
        "dead-rc.sh",
        &[
            (
                "OS_AUTH_URL",
                &format!("http://127.0.0.1:{}/v3", packuilon_testsupport::free_port()),
            ),
            ("OS_USERNAME", "admin"),
            ("OS_PASSWORD", "x"),
            ("OS_PROJECT_NAME", "admin"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_DOMAIN_NAME", "Default"),
        ],
    );
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        text.replace(&rc.display().to_string(), &dead.display().to_string()),
    )
    .unwrap();
    let (code, stdout, _) = site.cli(&["plan", p.to_str().unwrap(), "--rotation"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("FAIL rotation: "), "{stdout}");
    rt.block_on(cloud.cleanup());
}
