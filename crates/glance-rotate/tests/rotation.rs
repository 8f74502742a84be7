//! The rotation against a real Keystone + Glance (`make test` starts one and
//! exports PACKUILON_TEST_OPENRC; otherwise the fixture starts its own).
//! Every test owns its projects and images (unique names) and deletes them.

use std::sync::Arc;
use std::time::Duration;

use glance_rotate::glance::Glance;
use glance_rotate::rotate::{archive_name, ARCHIVE_OF};
use glance_rotate::{rotate, rotate_with_credentials, Credentials, RotateError, RotateOptions, Session, Target};
use packuilon_testsupport::cloud::Cloud;
use packuilon_testsupport::openstack::OpenStack;
use packuilon_testsupport::unique_name;
use serde_json::json;

fn today_archive(name: &str) -> String {
    archive_name(&RotateOptions::default().archive_name, name, chrono::Local::now())
}

fn opts() -> RotateOptions {
    RotateOptions::default()
}

#[tokio::test]
async fn password_auth_gets_a_token_and_the_image_endpoint_from_the_catalog() {
    let cloud = Cloud::new().await;
    let creds = Credentials::from_env(&cloud.env).unwrap();
    let session = Session::new(creds).unwrap();
    let token = session.token().await.unwrap();
    assert_eq!(token.project_id.as_deref(), Some(cloud.admin_project.as_str()));
    assert!(token.image_url.starts_with("http://127.0.0.1:"), "{}", token.image_url);
    // Reused, not issued again.
    let again = session.token().await.unwrap();
    assert_eq!(again.value(), token.value());
    assert_eq!(session.requests(), 1);
}

/// A TCP front for Keystone that closes the first connection it accepts
/// without answering (as a restarting uwsgi, Apache or HAProxy may), then
/// forwards every later one; returns its address.
fn keystone_front_dropping_the_first_connection(keystone: &str) -> String {
    let target = keystone
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut first = true;
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if std::mem::take(&mut first) {
                // Read the request, then close without a word.
                let mut buf = [0u8; 4096];
                let _ = std::io::Read::read(&mut &client, &mut buf);
                drop(client);
                continue;
            }
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut &c2, &mut &s2));
            std::thread::spawn(move || std::io::copy(&mut &server, &mut &client));
        }
    });
    let path = keystone
        .trim_start_matches("http://")
        .split_once('/')
        .map_or("", |(_, p)| p);
    format!("http://{addr}/{path}")
}

#[tokio::test]
async fn a_keystone_connection_closed_before_an_answer_is_tried_again() {
    let cloud = Cloud::new().await;
    let mut env = cloud.env.clone();
    let front = keystone_front_dropping_the_first_connection(&env["OS_AUTH_URL"]);
    env.insert("OS_AUTH_URL".into(), front);
    let session = Session::new(Credentials::from_env(&env).unwrap()).unwrap();
    let token = session.token().await.expect("the second try gets a token");
    assert_eq!(token.project_id.as_deref(), Some(cloud.admin_project.as_str()));
    // The dropped POST and the one that was answered.
    assert_eq!(session.requests(), 2);
}

#[tokio::test]
async fn a_token_glance_rejects_is_replaced_and_the_request_repeated() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("reauth").await;
    let img = cloud.image(&unique_name("reauth"), &owner, "shared").await;
    let session = Arc::new(Session::new(Credentials::from_env(&cloud.env).unwrap()).unwrap());
    let token = session.token().await.unwrap();
    // Revoked before Glance ever saw it, so Glance's token cache cannot hide the revocation.
    let resp = cloud
        .http
        .delete(format!("{}/auth/tokens", cloud.keystone))
        .header("X-Auth-Token", cloud.glance.session().token().await.unwrap().value())
        .header("X-Subject-Token", token.value())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "revoking: {}", resp.status());

    let glance = Glance::new(session.clone());
    assert_eq!(glance.image(&img.id).await.unwrap().id, img.id);
    // token, GET (401), new token, GET again.
    assert_eq!(session.requests(), 4);
    assert_ne!(session.token().await.unwrap().value(), token.value());
    cloud.cleanup().await;
}

#[tokio::test]
async fn os_image_url_and_os_region_name_choose_the_glance_used() {
    let cloud = Cloud::new().await;
    let target = || Target::ImageId("7d0b1b0e-0000-4000-8000-000000000001".into());
    // OS_IMAGE_URL wins over the catalog: a port where nothing listens, named in the error.
    let mut env = cloud.env.clone();
    env.insert("OS_IMAGE_URL".into(), "http://127.0.0.1:1/v2/".into());
    let err = rotate_with_credentials(Credentials::from_env(&env).unwrap(), target(), &opts())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("Glance GET http://127.0.0.1:1/v2/images/"),
        "{err}"
    );
    assert_eq!(err.status(), None);
    // A region without an image endpoint.
    let mut env = cloud.env.clone();
    env.insert("OS_REGION_NAME".into(), "NoSuchRegion".into());
    let err = rotate_with_credentials(Credentials::from_env(&env).unwrap(), target(), &opts())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no image endpoint with interface public in region NoSuchRegion"),
        "{err}"
    );
    // Keystone issued the token: its 201 is not what went wrong.
    assert!(!err.to_string().contains("HTTP 201"), "{err}");
}

#[tokio::test]
async fn application_credential_auth_rotates() {
    let cloud = Cloud::new().await;
    let (id, secret) = cloud.app_credential().await;
    let mut env = std::collections::BTreeMap::new();
    env.insert("OS_AUTH_URL".to_string(), cloud.env["OS_AUTH_URL"].clone());
    env.insert("OS_AUTH_TYPE".to_string(), "v3applicationcredential".to_string());
    env.insert("OS_APPLICATION_CREDENTIAL_ID".to_string(), id);
    env.insert("OS_APPLICATION_CREDENTIAL_SECRET".to_string(), secret.clone());
    let creds = Credentials::from_env(&env).unwrap();
    assert!(!format!("{creds:?}").contains(&secret));

    let owner = cloud.project("appcred-owner").await;
    let name = unique_name("appcred image");
    let old = cloud.image(&name, &owner, "shared").await;
    let new = cloud.image(&name, &owner, "shared").await;
    let report = rotate_with_credentials(creds, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();
    assert_eq!(
        report.archived,
        vec![(old.id.clone(), name.clone(), today_archive(&name))]
    );
    assert_eq!(cloud.get(&old.id).await.name(), today_archive(&name));
    cloud.cleanup().await;
}

#[tokio::test]
async fn a_bad_password_is_a_clear_error_without_the_secret() {
    let cloud = Cloud::new().await;
    let mut env = cloud.env.clone();
    let secret = "Wr0ng-pässword-1234";
    env.insert("OS_PASSWORD".to_string(), secret.to_string());
    let creds = Credentials::from_env(&env).unwrap();
    let err = rotate_with_credentials(
        creds,
        Target::ImageId("00000000-0000-0000-0000-000000000000".into()),
        &opts(),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.status(), Some(401), "{text}");
    assert!(text.contains("Keystone") && text.contains("401"), "{text}");
    assert!(!text.contains(secret) && !format!("{err:?}").contains(secret), "{text}");
}

#[tokio::test]
async fn older_images_are_archived_and_their_members_moved_and_accepted() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("owner").await;
    let (m1, m2, m3) = (
        cloud.project("member").await,
        cloud.project("member").await,
        cloud.project("member").await,
    );
    let name = unique_name("sl7x-x86_64 rotated");
    let old1 = cloud.image(&name, &owner, "shared").await;
    cloud.share(&old1.id, &m1, "pending").await;
    cloud.share(&old1.id, &m2, "accepted").await;
    let old2 = cloud.image(&name, &owner, "shared").await;
    cloud.share(&old2.id, &m2, "rejected").await;
    cloud.share(&old2.id, &m3, "accepted").await;
    let new = cloud.image(&name, &owner, "shared").await;

    let report = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();

    let base = today_archive(&name);
    let mut names = vec![
        cloud.get(&old1.id).await.name().to_string(),
        cloud.get(&old2.id).await.name().to_string(),
    ];
    names.sort();
    assert_eq!(
        names,
        vec![base.clone(), format!("{base} (2)")],
        "same-day archives must not collide"
    );
    assert_eq!(cloud.get(&old1.id).await.property(ARCHIVE_OF), Some(name.as_str()));
    assert_eq!(cloud.get(&new.id).await.name(), name);
    let on_new = cloud.members(&new.id).await;
    assert_eq!(on_new.keys().cloned().collect::<Vec<_>>(), {
        let mut v = vec![m1.clone(), m2.clone(), m3.clone()];
        v.sort();
        v
    });
    assert!(on_new.values().all(|s| s == "accepted"), "{on_new:?}");
    assert!(cloud.members(&old1.id).await.is_empty());
    assert!(cloud.members(&old2.id).await.is_empty());
    assert_eq!(report.archived.len(), 2);
    assert_eq!(report.members_moved.len(), 4);
    assert!(report
        .members_moved
        .contains(&(m3.clone(), old2.id.clone(), new.id.clone())));
    assert!(report.http_requests > 0);

    // Again: nothing left to do, nothing changes.
    let before = cloud.snapshot(&owner).await;
    let again = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();
    assert!(again.archived.is_empty() && again.members_moved.is_empty(), "{again:?}");
    assert!(again.skipped.is_some());
    assert_eq!(cloud.snapshot(&owner).await, before);
    cloud.cleanup().await;
}

#[tokio::test]
async fn rotating_a_personality_leaves_its_aq_image_and_other_personalities_alone() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("personalities").await;
    let old = cloud.image("sl7x-x86_64 inventory", &owner, "shared").await;
    let aq = cloud.image("sl7x-x86_64 inventory AQ", &owner, "shared").await;
    let other = cloud.image("sl7x-x86_64 inventory2", &owner, "shared").await;
    let prefix = cloud.image("sl7x-x86_64 inv", &owner, "shared").await;
    let new = cloud.image("sl7x-x86_64 inventory", &owner, "shared").await;

    let report = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();

    assert_eq!(report.archived.len(), 1, "{report:?}");
    assert_eq!(cloud.get(&old.id).await.name(), today_archive("sl7x-x86_64 inventory"));
    assert_eq!(cloud.get(&aq.id).await.name(), "sl7x-x86_64 inventory AQ");
    assert_eq!(cloud.get(&other.id).await.name(), "sl7x-x86_64 inventory2");
    assert_eq!(cloud.get(&prefix.id).await.name(), "sl7x-x86_64 inv");
    cloud.cleanup().await;
}

#[tokio::test]
async fn the_same_name_in_another_project_is_left_alone() {
    let cloud = Cloud::new().await;
    let ours = cloud.project("ours").await;
    let theirs = cloud.project("theirs").await;
    let name = unique_name("shared name");
    let their_old = cloud.image(&name, &theirs, "shared").await;
    let our_old = cloud.image(&name, &ours, "shared").await;
    let new = cloud.image(&name, &ours, "shared").await;

    rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();

    assert_eq!(cloud.get(&our_old.id).await.name(), today_archive(&name));
    assert_eq!(cloud.get(&their_old.id).await.name(), name);
    cloud.cleanup().await;
}

#[tokio::test]
async fn newer_and_unfinished_images_of_the_name_are_left_alone() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("newer").await;
    let name = unique_name("newer");
    let uploading = cloud.queued_image(&name, &owner).await;
    let new = cloud.image(&name, &owner, "shared").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let newer = cloud.image(&name, &owner, "shared").await;
    let report = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();
    assert!(report.archived.is_empty());
    assert_eq!(report.left_alone.len(), 2, "{report:?}");
    assert!(report
        .left_alone
        .contains(&(uploading.id.clone(), "status queued".to_string())));
    assert_eq!(cloud.get(&newer.id).await.name(), name);
    assert_eq!(cloud.get(&uploading.id).await.name(), name);
    cloud.cleanup().await;
}

#[tokio::test]
async fn candidates_on_several_list_pages_are_all_archived() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("paged").await;
    let name = unique_name("paged");
    let member = cloud.project("paged-member").await;
    let mut olds = Vec::new();
    for _ in 0..12 {
        let img = cloud.image(&name, &owner, "shared").await;
        cloud.share(&img.id, &member, "accepted").await;
        olds.push(img);
    }
    let new = cloud.image(&name, &owner, "private").await;
    // Same admin session, 5 images per page: the 13 images span three pages.
    let mut glance: Glance = cloud.glance.clone();
    glance.page_limit = 5;
    let report = rotate(&glance, Target::ImageId(new.id.clone()), &opts()).await.unwrap();
    assert_eq!(report.archived.len(), 12);
    for img in &olds {
        assert!(cloud.get(&img.id).await.name().starts_with(&today_archive(&name)));
    }
    assert!(cloud.named(&name, &owner).await.iter().all(|i| i.id == new.id));
    assert_eq!(
        cloud.members(&new.id).await.get(&member).map(String::as_str),
        Some("accepted")
    );
    cloud.cleanup().await;
}

#[tokio::test]
async fn a_private_new_image_is_shared_to_receive_members() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("private").await;
    let member = cloud.project("private-member").await;
    let name = unique_name("private new");
    let old = cloud.image(&name, &owner, "shared").await;
    cloud.share(&old.id, &member, "accepted").await;
    let new = cloud.image(&name, &owner, "private").await;

    let report = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();

    assert!(report.shared_new_image);
    assert_eq!(cloud.get(&new.id).await.visibility, "shared");
    assert_eq!(
        cloud.members(&new.id).await.get(&member).map(String::as_str),
        Some("accepted")
    );
    assert!(cloud.members(&old.id).await.is_empty());
    cloud.cleanup().await;
}

#[tokio::test]
async fn a_private_new_image_without_members_to_receive_stays_private() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("private-alone").await;
    let name = unique_name("private alone");
    let old = cloud.image(&name, &owner, "private").await;
    let new = cloud.image(&name, &owner, "private").await;
    let report = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();
    assert!(!report.shared_new_image);
    assert_eq!(cloud.get(&new.id).await.visibility, "private");
    assert_eq!(cloud.get(&old.id).await.name(), today_archive(&name));
    cloud.cleanup().await;
}

#[tokio::test]
async fn hide_archived_hides_and_keep_archives_never_deletes_one_with_members() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("keep").await;
    let member = cloud.project("keep-member").await;
    let name = unique_name("keep");
    let tag = json!({ ARCHIVE_OF: name });
    let plain_old = cloud
        .image_with(&format!("archive-{name} 2020-01-01"), &owner, "shared", tag.clone())
        .await;
    let with_member = cloud
        .image_with(&format!("archive-{name} 2020-01-02"), &owner, "shared", tag.clone())
        .await;
    cloud.share(&with_member.id, &member, "accepted").await;
    let hidden_old = cloud
        .image_with(
            &format!("archive-{name} 2020-01-03"),
            &owner,
            "shared",
            json!({ ARCHIVE_OF: name, "os_hidden": true }),
        )
        .await;
    // Not made by a rotation of this name: never counted.
    let unrelated = cloud
        .image(&format!("archive-{name} 2020-01-04"), &owner, "shared")
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let old = cloud.image(&name, &owner, "shared").await;
    let new = cloud.image(&name, &owner, "shared").await;

    let options = RotateOptions {
        hide_archived: true,
        keep_archives: Some(1),
        ..opts()
    };
    let report = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &options)
        .await
        .unwrap();

    let archived = cloud.get(&old.id).await;
    assert_eq!(archived.name(), today_archive(&name));
    assert!(archived.os_hidden, "HIDE_ARCHIVED sets os_hidden");
    let mut deleted = report.deleted.clone();
    deleted.sort();
    let mut expected = vec![plain_old.id.clone(), hidden_old.id.clone()];
    expected.sort();
    assert_eq!(deleted, expected, "{report:?}");
    assert!(matches!(cloud.glance.image(&plain_old.id).await, Err(e) if e.status() == Some(404)));
    assert!(matches!(cloud.glance.image(&hidden_old.id).await, Err(e) if e.status() == Some(404)));
    assert_eq!(
        cloud.get(&with_member.id).await.status,
        "active",
        "an archive with members is kept"
    );
    assert!(report
        .kept
        .iter()
        .any(|(id, why)| id == &with_member.id && why.contains("members")));
    assert_eq!(cloud.get(&unrelated.id).await.status, "active");
    cloud.cleanup().await;
}

#[tokio::test]
async fn rotation_by_name_picks_the_newest_active_image_created_after_the_build_started() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("byname").await;
    let name = unique_name("by name");
    let old = cloud.image(&name, &owner, "shared").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = chrono::Utc::now().to_rfc3339();
    let new = cloud.image(&name, &owner, "shared").await;

    let report = rotate(
        &cloud.glance,
        Target::Name {
            name: name.clone(),
            created_after: Some(started),
        },
        &opts(),
    )
    .await
    .unwrap();
    assert_eq!(report.new_image_id, new.id);
    assert_eq!(cloud.get(&old.id).await.name(), today_archive(&name));

    // Nothing created after "now": nothing to do, not an error.
    let later = (chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc3339();
    let report = rotate(
        &cloud.glance,
        Target::Name {
            name: name.clone(),
            created_after: Some(later),
        },
        &opts(),
    )
    .await
    .unwrap();
    assert!(report.skipped.is_some() && report.archived.is_empty(), "{report:?}");
    cloud.cleanup().await;
}

#[tokio::test]
async fn an_unknown_or_unfinished_new_image_is_an_error_naming_it() {
    let cloud = Cloud::new().await;
    let err = rotate(
        &cloud.glance,
        Target::ImageId("7d0b1b0e-0000-4000-8000-000000000000".into()),
        &opts(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RotateError::NewImage(_)), "{err}");
    assert!(
        err.to_string().contains("7d0b1b0e-0000-4000-8000-000000000000"),
        "{err}"
    );
}

/// Glance goes away in the middle of a rotation; the rerun finishes the job:
/// every old image renamed once, every member on the new image once, accepted.
#[tokio::test]
async fn glance_stopped_half_way_then_a_rerun_completes_without_duplicates() {
    let os = Arc::new(OpenStack::private().expect("a private Keystone + Glance"));
    let cloud = Cloud::on(os.clone()).await;
    let owner = cloud.project("restart").await;
    let members: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(cloud.project("restart-member").await);
        }
        v
    };
    let name = unique_name("restart");
    let mut olds = Vec::new();
    for _ in 0..16 {
        let img = cloud.image(&name, &owner, "shared").await;
        for m in &members {
            cloud.share(&img.id, m, "accepted").await;
        }
        olds.push(img);
    }
    let new = cloud.image(&name, &owner, "shared").await;

    // First run, on a session of its own; Glance is stopped once it is under way.
    let creds = Credentials::from_env(&cloud.env).unwrap();
    let glance = Glance::new(Arc::new(Session::new(creds).unwrap()));
    let run = {
        let glance = glance.clone();
        let id = new.id.clone();
        tokio::spawn(async move { rotate(&glance, Target::ImageId(id), &RotateOptions::default()).await })
    };
    // Plan: token + image + list + 16 member lists + new's members + name checks = 22;
    // then 4 adds, 4 accepts, 64 removals, 16 renames. Stop among the removals.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while glance.session().requests() < 34 {
        assert!(std::time::Instant::now() < deadline, "rotation never got under way");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let os2 = os.clone();
    tokio::task::spawn_blocking(move || os2.stop_glance())
        .await
        .unwrap()
        .unwrap();
    let first = run.await.unwrap();
    let err = first.expect_err("the first run must fail when Glance stops");
    eprintln!(
        "first run stopped after {} requests: {err}",
        glance.session().requests()
    );
    assert!(err.to_string().contains("Glance"), "{err}");

    os.start_glance().unwrap();
    let second = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
        .await
        .unwrap();
    assert!(
        !second.archived.is_empty() || !second.members_moved.is_empty(),
        "the rerun had work left: {second:?}"
    );

    let base = today_archive(&name);
    let mut names = Vec::new();
    for img in &olds {
        let now = cloud.get(&img.id).await;
        assert!(now.name().starts_with(&base), "{} named {:?}", img.id, now.name());
        assert_eq!(
            now.property(ARCHIVE_OF),
            Some(name.as_str()),
            "renamed once, from the real name"
        );
        assert!(cloud.members(&img.id).await.is_empty());
        names.push(now.name().to_string());
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), olds.len(), "archive names are distinct: {names:?}");
    let on_new = cloud.members(&new.id).await;
    assert_eq!(on_new.len(), members.len(), "{on_new:?}");
    assert!(on_new.values().all(|s| s == "accepted"));
    cloud.cleanup().await;
}

/// Glance reads `x:` in a name filter as an operator and `,` as a list; the
/// name still matches exactly, and a name with `"` too.
#[tokio::test]
async fn names_with_colons_commas_and_quotes_match_exactly() {
    let cloud = Cloud::new().await;
    let owner = cloud.project("odd-names").await;
    for name in ["in: sl7x, \"x86_64\"", "gte:2020-01-01T00:00:00Z", "say \"hi\", all"] {
        let old = cloud.image(name, &owner, "shared").await;
        let near = cloud.image(&format!("{name} AQ"), &owner, "shared").await;
        let part = cloud.image(&name[..name.len() - 2], &owner, "shared").await;
        let new = cloud.image(name, &owner, "shared").await;
        let report = rotate(&cloud.glance, Target::ImageId(new.id.clone()), &opts())
            .await
            .unwrap();
        assert_eq!(report.archived.len(), 1, "{name}: {report:?}");
        assert_eq!(cloud.get(&old.id).await.name(), today_archive(name));
        assert_eq!(cloud.get(&near.id).await.name(), format!("{name} AQ"));
        assert_eq!(cloud.get(&part.id).await.name(), &name[..name.len() - 2]);
    }
    cloud.cleanup().await;
}
