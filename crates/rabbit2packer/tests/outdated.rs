//! Outdated images, end to end: the real daemon, RabbitMQ and packer. An
//! image built from a source image that IMAGES_CONFIG no longer names is
//! marked by `status` and the API; `rebuild --outdated` (or
//! REBUILD_OUTDATED by itself) builds each once with its last profile.

mod support;

use rabbit2packer::journal::JobState;
use serde_json::json;
use support::*;

/// `$IMAGE` of each packer start of `name` (`sl7x-x86_64 <personality>`).
fn sources_of(site: &Site, name: &str) -> Vec<String> {
    site.starts()
        .into_iter()
        .filter(|r| r[2] == name)
        .map(|r| r[3].clone())
        .collect()
}

#[test]
fn a_new_source_image_marks_the_images_built_from_the_old_one_and_rebuild_outdated_builds_each_once() {
    let site = Site::new(2, "");
    let mut d = site.start();
    for p in ["inventory", "web"] {
        site.publish(&profile(p, "7x", "a", prod()), None);
    }
    site.publish(&profile("db", "8x", "a", prod()), None);
    site.wait_jobs("three builds", T, |j| succeeded(j) == 3);
    let (code, out, err) = site.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("outdated"), "{out}");

    // A new 7x source image: the two 7x images are outdated, the 8x one is not.
    site.write_images(json!({"sl7x-x86_64": "src-7x-new", "sl8x-x86_64": "src-8x-uuid"}));
    let (_, out, _) = site.cli(&["status"]);
    assert!(out.contains("outdated: 2"), "{out}");
    assert!(
        out.contains("inventory-sl7x-x86_64 built from src-7x-uuid by job #"),
        "{out}"
    );
    assert!(out.contains(", now src-7x-new"), "{out}");
    assert!(!out.contains("db-sl8x"), "{out}");
    let api = support::browser::Http::new(d.status_addr()).json("/api/images");
    let marked: Vec<(String, bool)> = api["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["image_key"].as_str().unwrap().to_string(), !i["outdated"].is_null()))
        .collect();
    assert_eq!(
        marked,
        vec![
            ("db-sl8x-x86_64".to_string(), false),
            ("inventory-sl7x-x86_64".to_string(), true),
            ("web-sl7x-x86_64".to_string(), true)
        ]
    );
    let web = api["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image_key"] == "web-sl7x-x86_64")
        .unwrap();
    assert_eq!(web["outdated"]["built_from"], "src-7x-uuid");
    assert_eq!(web["outdated"]["current"], "src-7x-new");

    // rebuild --outdated: one build of each, from the new source image.
    let (code, out, err) = site.cli(&["rebuild", "--outdated"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 rebuild(s) of outdated images queued"), "{out}");
    site.wait_jobs("the two rebuilds", T, |j| succeeded(j) == 5);
    assert_eq!(
        sources_of(&site, "sl7x-x86_64 inventory"),
        vec!["src-7x-uuid", "src-7x-new"]
    );
    assert_eq!(sources_of(&site, "sl7x-x86_64 web"), vec!["src-7x-uuid", "src-7x-new"]);
    assert_eq!(sources_of(&site, "sl8x-x86_64 db"), vec!["src-8x-uuid"]);
    let (_, out, _) = site.cli(&["status"]);
    assert!(!out.contains("outdated"), "{out}");
    // Nothing is outdated now: a second call queues nothing.
    let (code, out, _) = site.cli(&["rebuild", "--outdated"]);
    assert_eq!(code, 0);
    assert!(out.contains("no outdated image"), "{out}");
    assert_eq!(site.journal().len(), 5);
    // Both or neither: an image key and --outdated are refused together.
    let (code, _, err) = site.cli(&["rebuild", "web-sl7x-x86_64", "--outdated"]);
    assert_eq!(code, 2, "{err}");
    d.stop();
}

#[test]
fn rebuild_outdated_rebuilds_by_itself_when_images_config_changes() {
    let site = Site::new(1, "REBUILD_OUTDATED = true\n");
    let mut d = site.start();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("the build", T, |j| succeeded(j) == 1);
    // An edit that changes no source image of a built image queues nothing.
    site.write_images(json!({"sl7x-x86_64": "src-7x-uuid", "sl8x-x86_64": "src-8x-new"}));
    site.write_images(json!({"sl7x-x86_64": "src-7x-new", "sl8x-x86_64": "src-8x-new"}));
    let jobs = site.wait_jobs("the rebuild", T, |j| succeeded(j) == 2);
    assert!(jobs.iter().all(|j| j.state == JobState::Succeeded));
    d.wait_log("REBUILD_OUTDATED (IMAGES_CONFIG changed)", T);
    assert_eq!(
        sources_of(&site, "sl7x-x86_64 inventory"),
        vec!["src-7x-uuid", "src-7x-new"]
    );
    // Built from the current one now: no further rebuild.
    std::thread::sleep(std::time::Duration::from_secs(6));
    assert_eq!(site.journal().len(), 2);
    d.stop();
}
