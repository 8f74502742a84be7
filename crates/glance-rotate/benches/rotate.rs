//! `cargo bench -p glance-rotate`: one rotation of a name with 200 older
//! images of 20 members each, against the loopback Glance of the test run
//! (PACKUILON_TEST_OPENRC) or a private one. Prints wall time and the HTTP
//! requests made next to the requests strictly needed, as a markdown table.
//!
//! Two member layouts: the same 20 projects on every image (how generations
//! of one image are usually shared), and 20 projects per image drawn from 100
//! (Glance allows at most 128 members on one image, so the new image cannot
//! receive 4000 different ones); the second runs with GLANCE_ROTATE_BENCH_ALL=1.
//! Strictly needed: a token, the new image, one list page per 100 images,
//! every old image's member list and the new image's, one add and one accept
//! per distinct member, one removal per (image, member), one PATCH per image.

use std::time::Instant;

use futures::stream::{self, StreamExt};
use glance_rotate::{rotate, RotateOptions, Target};
use packuilon_testsupport::cloud::Cloud;
use packuilon_testsupport::unique_name;

const IMAGES: usize = 200;
const MEMBERS: usize = 20;
/// Projects the second layout draws each image's members from.
const POOL: usize = 100;
/// Requests in flight while setting up (the rotation uses its own setting).
const SETUP_CONCURRENCY: usize = 8;

struct Row {
    layout: &'static str,
    distinct_members: usize,
    secs: f64,
    made: u64,
    needed: u64,
    archived: usize,
    moved: usize,
}

async fn scenario(cloud: &Cloud, layout: &'static str, same_members: bool) -> Row {
    let owner = cloud.project("bench-owner").await;
    let name = unique_name("bench image");
    let shared: Vec<String> = (0..MEMBERS).map(|i| format!("bench-member-{i:02}")).collect();
    let t = Instant::now();
    let olds: Vec<String> = stream::iter(0..IMAGES)
        .map(|_| async { cloud.image(&name, &owner, "shared").await.id })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let pairs: Vec<(String, String)> = olds
        .iter()
        .enumerate()
        .flat_map(|(i, id)| {
            let shared = &shared;
            (0..MEMBERS).map(move |m| {
                let member = if same_members {
                    shared[m].clone()
                } else {
                    // Glance does not check that a member project exists, but
                    // allows at most 128 members per image (image_member_quota).
                    format!("bench-pool-{:03}", (i * 7 + m) % POOL)
                };
                (id.clone(), member)
            })
        })
        .collect();
    stream::iter(pairs.iter())
        .map(|(id, m)| cloud.share(id, m, "pending"))
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    let new = cloud.image(&name, &owner, "shared").await;
    eprintln!(
        "bench: {layout}: set up {IMAGES} images and {} memberships in {:.1} s",
        pairs.len(),
        t.elapsed().as_secs_f64()
    );

    // A fresh session: its token request counts, as in a real run.
    let creds = glance_rotate::Credentials::from_env(&cloud.env).unwrap();
    let glance = glance_rotate::Glance::new(std::sync::Arc::new(glance_rotate::Session::new(creds).unwrap()));
    let t = Instant::now();
    let report = rotate(&glance, Target::ImageId(new.id.clone()), &RotateOptions::default())
        .await
        .expect("rotation");
    let secs = t.elapsed().as_secs_f64();

    let distinct = if same_members { MEMBERS } else { POOL };
    let pages = (IMAGES as u64 + 1).div_ceil(100);
    let needed = 1 + 1 + pages + (IMAGES as u64 + 1) + 2 * distinct as u64 + (IMAGES * MEMBERS) as u64 + IMAGES as u64;
    assert_eq!(report.archived.len(), IMAGES);
    assert_eq!(report.members_moved.len(), IMAGES * MEMBERS);
    let on_new = cloud.members(&new.id).await;
    assert_eq!(on_new.len(), distinct);
    assert!(on_new.values().all(|s| s == "accepted"));
    Row {
        layout,
        distinct_members: distinct,
        secs,
        made: report.http_requests,
        needed,
        archived: report.archived.len(),
        moved: report.members_moved.len(),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cloud = Cloud::new().await;
        let mut rows = Vec::new();
        // Each layout takes ~2.5 min here (Glance on SQLite answers ~60 requests/s);
        // the second only when asked, to keep `make bench` short.
        let mut layouts = vec![("same 20 members on every image", true)];
        if std::env::var_os("GLANCE_ROTATE_BENCH_ALL").is_some() {
            layouts.push(("20 of 100 projects per image", false));
        }
        for (layout, same) in layouts {
            rows.push(scenario(&cloud, layout, same).await);
            let t = Instant::now();
            cloud.cleanup().await;
            eprintln!("bench: cleaned up in {:.1} s", t.elapsed().as_secs_f64());
        }
        println!();
        println!("Rotation of one name, {IMAGES} older images x {MEMBERS} members, loopback Keystone + Glance (SQLite):");
        println!();
        println!("| members | distinct members | images archived | members moved | wall time | HTTP requests made | strictly needed | ratio |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {:.1} s | {} | {} | {:.2}x |",
                r.layout,
                r.distinct_members,
                r.archived,
                r.moved,
                r.secs,
                r.made,
                r.needed,
                r.made as f64 / r.needed as f64
            );
        }
    });
}
