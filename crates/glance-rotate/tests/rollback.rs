//! Rollback, `--show` and the rotation preview against a real Keystone +
//! Glance (like rotation.rs: `make test` exports PACKUILON_TEST_OPENRC, else
//! the fixture starts its own). Every test owns its projects and images.

use std::collections::BTreeMap;
use std::time::Duration;

use glance_rotate::gate::{self, BROKEN_AT, BROKEN_OF};
use glance_rotate::glance::Image;
use glance_rotate::rollback::{RESTORED_FROM, ROLLED_BACK_TO};
use glance_rotate::rotate::{archive_name, ARCHIVED_AT, ARCHIVE_OF, PREVIEW_IMAGE_ID};
use glance_rotate::{preview, rollback, rollback_again, rotate, show, Role, RotateError, RotateOptions, Target};
use packuilon_testsupport::cloud::Cloud;
use packuilon_testsupport::unique_name;
use serde_json::json;

fn opts() -> RotateOptions {
    RotateOptions {
        hide_archived: true,
        ..RotateOptions::default()
    }
}

/// A name with three generations, made by real rotations: `first` and
/// `second` archived (second the newer, hidden), `live` has the name and the
/// members `m1` (accepted) and `m2` (pending, added after the rotation).
struct History {
    owner: String,
    name: String,
    first: Image,
    second: Image,
    live: Image,
    m1: String,
    m2: String,
}

async fn history(cloud: &Cloud, prefix: &str) -> History {
    let owner = cloud.project(prefix).await;
    let (m1, m2) = (cloud.project("member").await, cloud.project("member").await);
    let name = unique_name(&format!("sl7x-x86_64 {prefix}"));
    let first = cloud.image(&name, &owner, "shared").await;
    cloud.share(&first.id, &m1, "accepted").await;
    let second = cloud
        .image_with(
            &name,
            &owner,
            "shared",
            json!({"aq_personality": prefix, "packuilon_job": "41"}),
        )
        .await;
    rotate(&cloud.glance, Target::ImageId(second.id.clone()), &opts())
        .await
        .unwrap();
    // Archived a second later than `first`.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let live = cloud
        .image_with(
            &name,
            &owner,
            "private",
            json!({"aq_personality": prefix, "packuilon_job": "42"}),
        )
        .await;
    rotate(&cloud.glance, Target::ImageId(live.id.clone()), &opts())
        .await
        .unwrap();
    cloud.share(&live.id, &m2, "pending").await;
    History {
        owner,
        name,
        first,
        second,
        live,
        m1,
        m2,
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn rollback_gives_the_name_and_members_back_to_the_newest_archive_and_marks_the_live_image_broken() {
    let cloud = Cloud::new().await;
    let h = history(&cloud, "rollback").await;
    assert!(cloud.get(&h.second.id).await.os_hidden, "the archive is hidden");
    // Other names: `<name> AQ` with an archive of its own, the name in another project.
    let aq_name = format!("{} AQ", h.name);
    let aq_old = cloud.image(&aq_name, &h.owner, "shared").await;
    let aq = cloud.image(&aq_name, &h.owner, "shared").await;
    rotate(&cloud.glance, Target::ImageId(aq.id.clone()), &opts())
        .await
        .unwrap();
    // A newer archive of the name in another project is not this name's archive.
    let theirs = cloud.project("theirs").await;
    let their_archive = cloud
        .image_with(
            &format!("archive-{}", h.name),
            &theirs,
            "shared",
            json!({ ARCHIVE_OF: h.name }),
        )
        .await;
    let their_before = cloud.snapshot(&theirs).await;
    let aq_before = (
        cloud.get(&aq_old.id).await.name().to_string(),
        cloud.get(&aq.id).await.name().to_string(),
    );

    let report = rollback(&cloud.glance, &h.name, &opts()).await.unwrap();

    let restored = cloud.get(&h.second.id).await;
    assert_eq!(restored.name(), h.name);
    assert!(!restored.os_hidden, "a restored image is visible again");
    assert_eq!(restored.property(ARCHIVE_OF), None);
    assert_eq!(restored.property(ARCHIVED_AT), None);
    assert_eq!(restored.property(RESTORED_FROM), Some(h.live.id.as_str()));
    assert_eq!(
        restored.property("packuilon_job"),
        Some("41"),
        "its own properties stay"
    );
    let members = cloud.members(&h.second.id).await;
    assert_eq!(
        members.keys().cloned().collect::<Vec<_>>(),
        sorted(vec![h.m1.clone(), h.m2.clone()])
    );
    assert!(members.values().all(|s| s == "accepted"), "{members:?}");

    let broken = cloud.get(&h.live.id).await;
    let broken_prefix = format!("broken-{} ", h.name);
    assert!(broken.name().starts_with(&broken_prefix), "{}", broken.name());
    assert_eq!(broken.visibility, "private");
    assert_eq!(broken.property(BROKEN_OF), Some(h.name.as_str()));
    assert!(broken.property(BROKEN_AT).is_some());
    assert_eq!(broken.property(ROLLED_BACK_TO), Some(h.second.id.as_str()));
    // (Glance lists no members of a private image: the report says who moved.)

    // The older archive, and every other name, untouched.
    let first = cloud.get(&h.first.id).await;
    assert_eq!(first.property(ARCHIVE_OF), Some(h.name.as_str()));
    assert!(first.name().starts_with(&format!("archive-{}", h.name)));
    assert_eq!(cloud.snapshot(&theirs).await, their_before);
    assert_eq!(
        cloud.get(&their_archive.id).await.property(ARCHIVE_OF),
        Some(h.name.as_str())
    );
    assert_eq!(
        (
            cloud.get(&aq_old.id).await.name().to_string(),
            cloud.get(&aq.id).await.name().to_string()
        ),
        aq_before
    );

    assert_eq!(report.restored_image_id, h.second.id);
    assert!(report
        .restored_image_old_name
        .starts_with(&format!("archive-{}", h.name)));
    assert_eq!(report.broken_image_id.as_deref(), Some(h.live.id.as_str()));
    assert_eq!(report.broken_name.as_deref(), Some(broken.name()));
    assert_eq!(
        sorted(report.members_moved.clone()),
        sorted(vec![h.m1.clone(), h.m2.clone()])
    );
    assert!(!report.already_done && !report.dry_run && !report.resumed);
    assert!(report.http_requests > 0);

    // Again: already rolled back, nothing changes.
    let before = cloud.snapshot(&h.owner).await;
    let again = rollback(&cloud.glance, &h.name, &opts()).await.unwrap();
    assert!(again.already_done, "{again:?}");
    assert_eq!(again.restored_image_id, h.second.id);
    assert_eq!(again.broken_image_id.as_deref(), Some(h.live.id.as_str()));
    assert_eq!(cloud.snapshot(&h.owner).await, before);
    cloud.cleanup().await;
}

#[tokio::test]
async fn rollback_again_goes_back_one_more_archive() {
    let cloud = Cloud::new().await;
    let h = history(&cloud, "again").await;
    rollback(&cloud.glance, &h.name, &opts()).await.unwrap();

    let report = rollback_again(&cloud.glance, &h.name, &opts()).await.unwrap();

    assert_eq!(report.restored_image_id, h.first.id);
    assert_eq!(report.broken_image_id.as_deref(), Some(h.second.id.as_str()));
    assert_eq!(cloud.get(&h.first.id).await.name(), h.name);
    assert_eq!(
        cloud.get(&h.first.id).await.property(RESTORED_FROM),
        Some(h.second.id.as_str())
    );
    let second = cloud.get(&h.second.id).await;
    assert_eq!(second.property(BROKEN_OF), Some(h.name.as_str()));
    assert!(second.name().starts_with(&format!("broken-{}", h.name)));
    let members = cloud.members(&h.first.id).await;
    assert_eq!(
        members.keys().cloned().collect::<Vec<_>>(),
        sorted(vec![h.m1.clone(), h.m2.clone()])
    );
    // No archive left: a third time is an error naming the name.
    let err = rollback_again(&cloud.glance, &h.name, &opts()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("no archive of {:?} to roll back to", h.name)),
        "{err}"
    );
    cloud.cleanup().await;
}

/// What a rollback leaves when it stops after step 3 (the live image renamed
/// and tagged, the archive not yet renamed), made with the same calls; and
/// the state after step 1 (members added to the archive, not yet removed).
#[tokio::test]
async fn a_rollback_stopped_half_way_is_finished_by_a_rerun() {
    let cloud = Cloud::new().await;
    let h = history(&cloud, "halfway").await;
    // The newest archive is deactivated: `first` is the one to restore.
    deactivate(&cloud, &h.second.id).await;

    // After step 1: `first` shared and given m1 only.
    cloud.share(&h.first.id, &h.m1, "accepted").await;
    let report = rollback(
        &cloud.glance,
        &h.name,
        &RotateOptions {
            dry_run: true,
            ..opts()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.restored_image_id, h.first.id, "{report:?}");
    assert!(report
        .left_alone
        .iter()
        .any(|(id, why)| id == &h.second.id && why.contains("deactivated")));

    // Steps 2 and 3 by hand, as the rollback does them.
    for m in [&h.m1, &h.m2] {
        cloud.share(&h.first.id, m, "accepted").await;
        cloud.glance.remove_member(&h.live.id, m).await.unwrap();
    }
    let to = BTreeMap::from([(ROLLED_BACK_TO.to_string(), h.first.id.clone())]);
    gate::set_properties(&cloud.glance, &h.live.id, &to).await.unwrap();
    let broken_name = format!("broken-{} by hand", h.name);
    gate::mark_broken(&cloud.glance, &h.live.id, &broken_name, &h.name)
        .await
        .unwrap();
    assert!(cloud.named(&h.name, &h.owner).await.is_empty(), "no image has the name");

    let dry = rollback(
        &cloud.glance,
        &h.name,
        &RotateOptions {
            dry_run: true,
            ..opts()
        },
    )
    .await
    .unwrap();
    assert!(dry.resumed && dry.dry_run, "{dry:?}");
    assert_eq!(cloud.get(&h.first.id).await.property(ARCHIVE_OF), Some(h.name.as_str()));

    let report = rollback(&cloud.glance, &h.name, &opts()).await.unwrap();

    assert!(report.resumed, "{report:?}");
    assert_eq!(report.restored_image_id, h.first.id);
    assert_eq!(report.broken_image_id.as_deref(), Some(h.live.id.as_str()));
    assert_eq!(report.broken_name.as_deref(), Some(broken_name.as_str()));
    let restored = cloud.get(&h.first.id).await;
    assert_eq!(restored.name(), h.name);
    assert_eq!(restored.property(ARCHIVE_OF), None);
    assert_eq!(restored.property(RESTORED_FROM), Some(h.live.id.as_str()));
    assert_eq!(cloud.get(&h.live.id).await.name(), broken_name);
    let second = cloud.get(&h.second.id).await;
    assert_eq!(
        second.property(ARCHIVE_OF),
        Some(h.name.as_str()),
        "the deactivated archive stays one"
    );
    assert_eq!(second.status, "deactivated");
    // And now it is done.
    let before = cloud.snapshot(&h.owner).await;
    assert!(rollback(&cloud.glance, &h.name, &opts()).await.unwrap().already_done);
    assert_eq!(cloud.snapshot(&h.owner).await, before);
    cloud.cleanup().await;
}

async fn deactivate(cloud: &Cloud, id: &str) {
    let token = cloud.glance.session().token().await.unwrap();
    let resp = cloud
        .http
        .post(format!("{}/v2/images/{id}/actions/deactivate", cloud.image_url))
        .header("X-Auth-Token", token.value())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "deactivate: {}", resp.status());
}

#[tokio::test]
async fn dry_run_rollback_changes_nothing_and_says_what_it_would_do() {
    let cloud = Cloud::new().await;
    let h = history(&cloud, "dryrun").await;
    let before = cloud.snapshot(&h.owner).await;

    let report = rollback(
        &cloud.glance,
        &h.name,
        &RotateOptions {
            dry_run: true,
            ..opts()
        },
    )
    .await
    .unwrap();

    assert!(report.dry_run);
    assert_eq!(report.restored_image_id, h.second.id);
    assert_eq!(report.broken_image_id.as_deref(), Some(h.live.id.as_str()));
    assert!(report
        .broken_name
        .as_deref()
        .unwrap()
        .starts_with(&format!("broken-{}", h.name)));
    assert_eq!(
        sorted(report.members_moved.clone()),
        sorted(vec![h.m1.clone(), h.m2.clone()])
    );
    assert_eq!(cloud.snapshot(&h.owner).await, before);
    assert_eq!(cloud.get(&h.live.id).await.property(ROLLED_BACK_TO), None);
    cloud.cleanup().await;
}

#[tokio::test]
async fn without_an_archive_a_rollback_is_an_error_naming_the_name() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("noarchive").await;
    let name = unique_name("no archive");
    let live = cloud.image(&name, &owner, "shared").await;
    // An archive of the name in another project does not count.
    let other = cloud.project("noarchive-other").await;
    cloud
        .image_with(
            &format!("archive-{name}"),
            &other,
            "shared",
            json!({ ARCHIVE_OF: name }),
        )
        .await;
    let before = cloud.snapshot(&owner).await;

    let err = rollback(&cloud.glance, &name, &opts()).await.unwrap_err();

    assert!(matches!(err, RotateError::NothingToRollBack(_)), "{err:?}");
    assert_eq!(err.to_string(), format!("no archive of {name:?} to roll back to"));
    assert_eq!(cloud.snapshot(&owner).await, before);
    assert_eq!(cloud.get(&live.id).await.name(), name);

    // Only a deactivated archive: named as the reason.
    let old = cloud
        .image_with(
            &format!("archive-{name} 2020-01-01"),
            &owner,
            "shared",
            json!({ ARCHIVE_OF: name }),
        )
        .await;
    deactivate(&cloud, &old.id).await;
    let err = rollback(&cloud.glance, &name, &opts()).await.unwrap_err();
    assert!(
        err.to_string().contains(&old.id) && err.to_string().contains("deactivated"),
        "{err}"
    );

    // Live images of the name in two projects: which to roll back is not guessed.
    let other_live = cloud.image(&name, &other, "shared").await;
    let err = rollback(&cloud.glance, &name, &opts()).await.unwrap_err();
    assert!(
        err.to_string().contains("several projects") && err.to_string().contains(&other),
        "{err}"
    );
    assert_eq!(cloud.get(&other_live.id).await.name(), name);

    // No image of the name at all.
    let err = rollback(&cloud.glance, &unique_name("never built"), &opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no active image named"), "{err}");
    cloud.cleanup().await;
}

#[tokio::test]
async fn show_lists_live_archives_and_broken_images_with_their_properties() {
    let cloud = Cloud::new().await;
    let h = history(&cloud, "show").await;
    let unrelated = cloud.image(&format!("{} AQ", h.name), &h.owner, "shared").await;
    let before = cloud.snapshot(&h.owner).await;

    let shown = show(&cloud.glance, &h.name).await.unwrap();

    assert_eq!(cloud.snapshot(&h.owner).await, before, "show changes nothing");
    let roles: Vec<(Role, &str)> = shown.iter().map(|i| (i.role, i.id.as_str())).collect();
    assert_eq!(
        roles,
        vec![
            (Role::Live, h.live.id.as_str()),
            (Role::Archive, h.second.id.as_str()),
            (Role::Archive, h.first.id.as_str()),
        ]
    );
    let live = &shown[0];
    assert_eq!(live.members, 2);
    assert_eq!(live.visibility, "shared");
    assert_eq!(live.properties.get("packuilon_job").map(String::as_str), Some("42"));
    assert_eq!(live.properties.get("aq_personality").map(String::as_str), Some("show"));
    assert!(shown[1].os_hidden && shown[1].archived_at.is_some());
    assert!(!shown.iter().any(|i| i.id == unrelated.id));

    rollback(&cloud.glance, &h.name, &opts()).await.unwrap();
    let shown = show(&cloud.glance, &h.name).await.unwrap();
    let roles: Vec<(Role, &str)> = shown.iter().map(|i| (i.role, i.id.as_str())).collect();
    assert_eq!(
        roles,
        vec![
            (Role::Live, h.second.id.as_str()),
            (Role::Archive, h.first.id.as_str()),
            (Role::Broken, h.live.id.as_str()),
        ]
    );
    assert_eq!(shown[0].restored_from.as_deref(), Some(h.live.id.as_str()));
    assert_eq!(shown[2].rolled_back_to.as_deref(), Some(h.second.id.as_str()));
    assert!(shown[2].broken_at.is_some());
    assert_eq!(shown[2].properties.get("packuilon_job").map(String::as_str), Some("42"));

    assert!(show(&cloud.glance, &unique_name("nothing")).await.unwrap().is_empty());
    cloud.cleanup().await;
}

#[tokio::test]
async fn preview_reports_what_a_rotation_would_do_without_changing_anything() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("preview").await;
    let member = cloud.project("preview-member").await;
    let name = unique_name("preview");
    let tag = json!({ ARCHIVE_OF: name });
    let old_archive = cloud
        .image_with(&format!("archive-{name} 2020-01-01"), &owner, "shared", tag)
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let live = cloud.image(&name, &owner, "shared").await;
    cloud.share(&live.id, &member, "accepted").await;
    let before = cloud.snapshot(&owner).await;
    let options = RotateOptions {
        keep_archives: Some(1),
        ..RotateOptions::default()
    };

    let report = preview(&cloud.glance, &name, None, &options).await.unwrap();

    assert_eq!(cloud.snapshot(&owner).await, before);
    assert!(report.dry_run);
    assert_eq!(report.new_image_id, PREVIEW_IMAGE_ID);
    let today = archive_name(&options.archive_name, &name, chrono::Local::now());
    assert_eq!(report.archived, vec![(live.id.clone(), name.clone(), today)]);
    assert_eq!(
        report.members_moved,
        vec![(member.clone(), live.id.clone(), PREVIEW_IMAGE_ID.to_string())]
    );
    assert!(report.shared_new_image);
    assert_eq!(report.deleted, vec![old_archive.id.clone()]);

    // A new image of another project would archive nothing here.
    let other = cloud.project("preview-other").await;
    let report = preview(&cloud.glance, &name, Some(&other), &options).await.unwrap();
    assert!(report.archived.is_empty() && report.skipped.is_some(), "{report:?}");
    // No live image and no owner: nothing to preview, said so.
    let report = preview(&cloud.glance, &unique_name("unbuilt"), None, &options)
        .await
        .unwrap();
    assert!(report.skipped.unwrap().contains("owner"));
    cloud.cleanup().await;
}
