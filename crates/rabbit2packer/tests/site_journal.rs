//! The shared site journal (issue #13) against a real PostgreSQL: one
//! private cluster for this file, a database for each test; the test that
//! stops PostgreSQL starts a cluster of its own (with TLS). "Hosts" are
//! SiteJournal connections naming themselves A, B, C, as daemons on
//! different machines would.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use packuilon_testsupport::postgres::PrivatePostgres;
use rabbit2packer::journal::JobState;
use rabbit2packer::site_journal::{Finished, Inserted, Request, SiteJournal, SiteJournalError};

const LEASE: Duration = Duration::from_secs(60);

fn pg() -> &'static PrivatePostgres {
    PrivatePostgres::shared().expect("a private PostgreSQL (Debian's postgresql package)")
}

async fn journal(url: &str) -> SiteJournal {
    SiteJournal::connect(url, None)
        .await
        .expect("connect to the site journal")
}

fn request(key: &str, mid: &str, body: &str) -> Request {
    Request::new(key, Some(mid), Some("p.example.org"), body.as_bytes().to_vec())
}

fn new_id(i: Inserted) -> i64 {
    match i {
        Inserted::New { id, .. } => id,
        other => panic!("expected a new job, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemons_starting_at_once_apply_each_schema_version_exactly_once() {
    let url = pg().database("migrations").unwrap();
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { SiteJournal::connect(&url, None).await })
        })
        .collect();
    let mut applied = Vec::new();
    for s in starts {
        let j = s.await.unwrap().expect("every daemon starts");
        applied.extend_from_slice(j.applied_migrations());
    }
    applied.sort();
    let all: Vec<i32> = (1..=rabbit2packer::site_journal::SCHEMA_VERSION).collect();
    assert_eq!(applied, all, "each version applied by exactly one daemon");
    let db = url.rsplit('/').next().unwrap();
    let rows = pg().psql(db, "SELECT count(*) FROM schema_migrations").unwrap();
    assert_eq!(rows.trim(), all.len().to_string());
    // A later start applies nothing; the password may come from a file.
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("state-db.pw");
    std::fs::write(&pw, format!("{}\n", pg().password())).unwrap();
    let j = SiteJournal::connect(&pg().url_without_password(db), Some(&pw))
        .await
        .unwrap();
    assert!(j.applied_migrations().is_empty());
    std::fs::write(&pw, "wrong\n").unwrap();
    let e = SiteJournal::connect(&pg().url_without_password(db), Some(&pw))
        .await
        .unwrap_err();
    assert!(e.is_config(), "a wrong password is a configuration error: {e}");
    assert!(!e.to_string().contains(pg().password()));
    // A database set up by a newer rabbit2packer is refused.
    pg().psql(
        db,
        "INSERT INTO schema_migrations (version, applied_by) VALUES (99, 'future')",
    )
    .unwrap();
    let e = SiteJournal::connect(&url, None).await.unwrap_err();
    assert!(
        e.is_config() && e.to_string().contains("newer rabbit2packer (schema 99"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_is_journaled_once_site_wide() {
    let url = pg().database("dedupe").unwrap();
    let a = journal(&url).await;
    let b = journal(&url).await;
    let first = new_id(a.insert(&request("inv-sl7x-x86_64", "m1", "{1}"), false).await.unwrap());
    // Redelivered to another daemon: known there too (3).
    assert_eq!(
        b.insert(&request("inv-sl7x-x86_64", "m1", "{1}"), true).await.unwrap(),
        Inserted::Duplicate(first)
    );
    // One message id delivered to ten daemons at once: one job.
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(Arc::new(journal(&url).await));
    }
    let tries: Vec<_> = (0..10)
        .map(|i| {
            let j = conns[i % conns.len()].clone();
            tokio::spawn(async move { j.insert(&request("web-el9-x86_64", "m2", "{2}"), false).await })
        })
        .collect();
    let mut new = 0;
    let mut ids = HashSet::new();
    for t in tries {
        match t.await.unwrap().unwrap() {
            Inserted::New { id, .. } => {
                new += 1;
                ids.insert(id);
            }
            Inserted::Duplicate(id) => {
                ids.insert(id);
            }
        }
    }
    assert_eq!((new, ids.len()), (1, 1));
    // Without a message id: a redelivered body is a copy, a fresh one a new request.
    let no_id = |body: &str| Request::new("db-el8-x86_64", None, None, body.as_bytes().to_vec());
    let x = new_id(a.insert(&no_id("{x}"), false).await.unwrap());
    assert_eq!(b.insert(&no_id("{x}"), true).await.unwrap(), Inserted::Duplicate(x));
    match b.insert(&no_id("{x}"), false).await.unwrap() {
        Inserted::New { id, superseded } => assert_eq!((id > x, superseded), (true, Some(x))),
        other => panic!("a fresh message is a new request: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_requests_from_many_daemons_leave_one_running_and_the_newest_waiting() {
    let url = pg().database("coalesce").unwrap();
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(Arc::new(journal(&url).await));
    }
    let images = ["a-sl7x-x86_64", "b-sl7x-x86_64", "c-sl7x-x86_64"];
    // One build of "a" runs already.
    conns[0]
        .insert(&request(images[0], "first", "{\"n\": -1}"), false)
        .await
        .unwrap();
    let running = conns[0].claim("A", "Thread-1", LEASE).await.unwrap().unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|c| {
            let j = conns[c].clone();
            tokio::spawn(async move {
                for n in 0..25 {
                    let key = images[n % 3];
                    let body = format!("{{\"c\": {c}, \"n\": {n}}}");
                    j.insert(&request(key, &format!("{c}-{n}"), &body), false)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let all = conns[1].all().await.unwrap();
    assert_eq!(all.len(), 101);
    for key in images {
        let jobs: Vec<_> = all.iter().filter(|j| j.image_key == key).collect();
        let waiting: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Waiting).collect();
        let running_n = jobs.iter().filter(|j| j.state == JobState::Running).count();
        assert_eq!(waiting.len(), 1, "{key}: one waiting job");
        assert_eq!(running_n, usize::from(key == images[0]), "{key}: running jobs");
        // The newest request is the waiting one, with its body; every other
        // waiting request was superseded by the one after it.
        let newest = jobs.iter().map(|j| j.id).max().unwrap();
        assert_eq!(waiting[0].id, newest, "{key}");
        let body = conns[2].body(newest).await.unwrap().unwrap();
        let last_mid = waiting[0].message_id.clone().unwrap();
        let (c, n) = last_mid.split_once('-').unwrap();
        assert_eq!(String::from_utf8(body).unwrap(), format!("{{\"c\": {c}, \"n\": {n}}}"));
        for j in jobs.iter().filter(|j| j.state == JobState::Superseded) {
            let by = j.superseded_by.expect("superseded by a newer job");
            assert!(
                by > j.id && jobs.iter().any(|o| o.id == by),
                "{key}: job {} superseded by {by}",
                j.id
            );
            assert_eq!(conns[3].body(j.id).await.unwrap(), None, "a superseded body is dropped");
        }
    }
    assert_eq!(
        all.iter().find(|j| j.id == running.id).unwrap().state,
        JobState::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hosts_claiming_at_once_never_build_one_image_twice() {
    let url = pg().database("claim").unwrap();
    let producer = Arc::new(journal(&url).await);
    let images: Vec<String> = (0..10).map(|i| format!("img{i}-sl7x-x86_64")).collect();
    let building: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let built: Arc<Mutex<Vec<i64>>> = Arc::default();
    let produced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for host in ["A", "B", "C"] {
        let j = Arc::new(journal(&url).await);
        for w in 1..=2 {
            let (j, building, built, produced) = (j.clone(), building.clone(), built.clone(), produced.clone());
            workers.push(tokio::spawn(async move {
                let worker = format!("Thread-{w}");
                loop {
                    match j.claim(host, &worker, LEASE).await.unwrap() {
                        Some(c) => {
                            if let Some(other) = building.lock().unwrap().insert(c.image_key.clone(), host.into()) {
                                panic!("{} builds on {host} and on {other} at once", c.image_key);
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            building.lock().unwrap().remove(&c.image_key);
                            j.finish(host, c.id, c.attempt, Finished::Succeeded, None)
                                .await
                                .unwrap();
                            built.lock().unwrap().push(c.id);
                        }
                        None if produced.load(std::sync::atomic::Ordering::SeqCst)
                            && j.counts().await.unwrap() == (0, 0) =>
                        {
                            return;
                        }
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }));
        }
    }
    for n in 0..60 {
        let key = &images[(n * 7) % 10];
        producer
            .insert(&request(key, &format!("r{n}"), &format!("{{\"n\": {n}}}")), false)
            .await
            .unwrap();
        if n % 5 == 0 {
            tokio::task::yield_now().await;
        }
    }
    produced.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w).await.unwrap().unwrap();
    }
    let all = producer.all().await.unwrap();
    assert_eq!(all.len(), 60);
    let built = built.lock().unwrap().clone();
    for j in &all {
        match j.state {
            JobState::Succeeded => {
                assert_eq!(j.attempts, 1, "job {} built once", j.id);
                assert!(["A", "B", "C"].contains(&j.host.as_deref().unwrap()));
                assert!(built.contains(&j.id));
            }
            JobState::Superseded => assert!(!built.contains(&j.id)),
            other => panic!("job {} left {other:?}", j.id),
        }
    }
    // Every image's newest request was built.
    for key in &images {
        let newest = all.iter().filter(|j| &j.image_key == key).map(|j| j.id).max().unwrap();
        assert!(built.contains(&newest), "{key}: newest request {newest} built");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lease_is_taken_over_once_and_the_old_owner_may_not_record() {
    let url = pg().database("lease").unwrap();
    let a = journal(&url).await;
    let b = journal(&url).await;
    let c = journal(&url).await;
    let key = "inv-sl7x-x86_64";
    let id = new_id(a.insert(&request(key, "m1", "{1}"), false).await.unwrap());
    let lease = Duration::from_millis(1500);
    let claim = a.claim("A", "Thread-1", lease).await.unwrap().unwrap();
    assert_eq!((claim.id, claim.attempt, claim.body.as_slice()), (id, 1, &b"{1}"[..]));
    let build = a
        .start_build(
            "A",
            id,
            1,
            "t.json",
            "/var/log/packuilon/t.log".as_ref(),
            "/b/t.json".as_ref(),
            "src",
        )
        .await
        .unwrap();
    // Renewed while alive: nobody may take it.
    assert_eq!(a.renew("A", lease, &[id]).await.unwrap(), vec![(id, 1)]);
    assert!(b.take_over_expired("B").await.unwrap().is_empty());
    // A stops renewing (it died, or lost the network); the lease runs out.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let (rb, rc) = tokio::join!(b.take_over_expired("B"), c.take_over_expired("C"));
    let requeued: Vec<_> = rb.unwrap().into_iter().chain(rc.unwrap()).collect();
    assert_eq!(requeued.len(), 1, "taken over exactly once: {requeued:?}");
    assert_eq!(
        (requeued[0].id, requeued[0].host.as_str(), requeued[0].attempt),
        (id, "A", 1)
    );
    let job = b.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Waiting);
    assert!(
        job.error.as_deref().unwrap().contains("lease of A (attempt 1) ran out"),
        "{job:?}"
    );
    let events = b.events(id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1, "interrupted");
    // It runs once more, on B.
    let again = b.claim("B", "Thread-1", LEASE).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempt), (id, 2));
    // A comes back: it holds nothing, may record nothing, and its restart
    // does not take B's job.
    assert!(a.renew("A", lease, &[id]).await.unwrap().is_empty());
    let e = a.finish("A", id, 1, Finished::Failed, Some("late")).await.unwrap_err();
    assert!(
        matches!(&e, SiteJournalError::NotYours { job, .. } if *job == id),
        "{e}"
    );
    assert!(e.to_string().contains("running on B (attempt 2)"), "{e}");
    let e = a
        .start_build("A", id, 1, "t.json", "/l".as_ref(), "/b".as_ref(), "src")
        .await
        .unwrap_err();
    assert!(matches!(e, SiteJournalError::NotYours { .. }), "{e}");
    assert!(a.release("A", "rabbit2packer on A restarted").await.unwrap().is_empty());
    a.finish_build(build, Some(1), None, Some("interrupted"), b"A's log\n")
        .await
        .unwrap();
    // B builds it; its log is kept with the build, compressed.
    let log = "==> null: building\n".repeat(500);
    let b_build = b
        .start_build(
            "B",
            id,
            2,
            "t.json",
            "/var/log/packuilon/t2.log".as_ref(),
            "/b/t.json".as_ref(),
            "src",
        )
        .await
        .unwrap();
    b.finish_build(b_build, Some(0), Some("Null"), None, log.as_bytes())
        .await
        .unwrap();
    b.finish("B", id, 2, Finished::Succeeded, None).await.unwrap();
    assert_eq!(a.build_log(b_build).await.unwrap().unwrap(), log.as_bytes());
    let job = c.job(id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.host.as_deref(), job.attempts),
        (JobState::Succeeded, Some("B"), 2)
    );
    let hosts: Vec<_> = job.builds.iter().map(|b| b.host.as_deref()).collect();
    assert_eq!(hosts, vec![Some("A"), Some("B")]);
    let db = url.rsplit('/').next().unwrap();
    let sizes = pg()
        .psql(
            db,
            &format!("SELECT length(log_gz) < log_size / 10 FROM builds WHERE id = {b_build}"),
        )
        .unwrap();
    assert_eq!(sizes.trim(), "t", "the log is stored compressed");

    // A lease that runs out while a newer request waits: the newer one
    // supersedes the interrupted job (one running + one waiting, 2).
    let old = new_id(a.insert(&request(key, "m2", "{2}"), false).await.unwrap());
    let taken = a
        .claim("A", "Thread-1", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.id, old);
    let newer = new_id(a.insert(&request(key, "m3", "{3}"), false).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = b.take_over_expired("B").await.unwrap();
    assert_eq!((r.len(), r[0].superseded_by), (1, Some(newer)));
    assert_eq!(b.job(old).await.unwrap().unwrap().state, JobState::Superseded);
    assert_eq!(b.claim("B", "Thread-2", LEASE).await.unwrap().unwrap().id, newer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_journaled_job_wakes_a_daemon_listening_elsewhere() {
    let url = pg().database("notify").unwrap();
    let a = journal(&url).await;
    let b = journal(&url).await;
    let mut listener = b.listen().await.unwrap();
    let t0 = Instant::now();
    a.insert(&request("inv-sl7x-x86_64", "m1", "{}"), false).await.unwrap();
    let key = tokio::time::timeout(Duration::from_secs(5), listener.next())
        .await
        .expect("woken, no polling")
        .unwrap();
    assert_eq!(key, "inv-sl7x-x86_64");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "woken at once: {:?}",
        t0.elapsed()
    );
    // A finished job frees its image: the waiting one may run anywhere.
    let c = b.claim("B", "Thread-1", LEASE).await.unwrap().unwrap();
    a.insert(&request("inv-sl7x-x86_64", "m2", "{}"), false).await.unwrap();
    assert_eq!(listener.next().await.unwrap(), "inv-sl7x-x86_64");
    b.finish("B", c.id, c.attempt, Finished::Succeeded, None).await.unwrap();
    let key = tokio::time::timeout(Duration::from_secs(5), listener.next())
        .await
        .unwrap();
    assert_eq!(key.as_deref(), Some("inv-sl7x-x86_64"));
    // A duplicate wakes nobody (nothing was committed).
    a.insert(&request("inv-sl7x-x86_64", "m2", "{}"), true).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(300), listener.next())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_going_away_loses_nothing_and_doubles_nothing() {
    // A cluster of this test's own, over TLS (verify-full against its CA).
    let pg = PrivatePostgres::start_tls().unwrap();
    let url = pg.database("restart").unwrap();
    let ca = pg.ca().unwrap().display().to_string();
    let tls_url = format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    // TLS is on and checked: without the CA the certificate is refused.
    let e = SiteJournal::connect(&format!("{url}?sslmode=require"), None)
        .await
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    let j = journal(&tls_url).await;
    let first = new_id(j.insert(&request("inv-sl7x-x86_64", "m1", "{1}"), false).await.unwrap());
    let mut listener = j.listen().await.unwrap();
    for crash in [false, true] {
        pg.stop(crash).unwrap();
        // Unreachable: a transient error, to retry after a pause (7).
        let e = j
            .insert(&request("web-el9-x86_64", "m2", "{2}"), false)
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(j.claim("A", "Thread-1", LEASE).await.unwrap_err().is_transient());
        if !crash {
            // The listening connection says it is gone: listen again, claim once.
            let end = tokio::time::timeout(Duration::from_secs(5), listener.next())
                .await
                .unwrap();
            assert_eq!(end, None);
        }
        pg.start_again().unwrap();
        // The caller's retry with backoff: connected again, the request journaled once.
        let mut pause = Duration::from_millis(50);
        let t0 = Instant::now();
        let inserted = loop {
            match j.insert(&request("web-el9-x86_64", "m2", "{2}"), false).await {
                Ok(i) => break i,
                Err(e) if e.is_transient() && t0.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => panic!("{e}"),
            }
        };
        if crash {
            // The first round journaled it: the same message is not doubled.
            assert!(matches!(inserted, Inserted::Duplicate(_)), "{inserted:?}");
        } else {
            assert!(matches!(inserted, Inserted::New { .. }), "{inserted:?}");
        }
        listener = j.listen().await.unwrap();
    }
    let all = j.all().await.unwrap();
    let keys: Vec<_> = all.iter().map(|r| (r.id, r.image_key.as_str(), r.state)).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0], (first, "inv-sl7x-x86_64", JobState::Waiting));
    assert_eq!(j.body(first).await.unwrap().as_deref(), Some(&b"{1}"[..]));
}

#[test]
fn migrate_journal_says_what_is_wrong_with_exit_status_1_or_2() {
    let bin = packuilon_testsupport::workspace_bin("rabbit2packer");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .env_remove("PACKER_UTILS_CONFIG")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let state = dir.path().display().to_string();
    // No journal in STATE_DIR: 2, naming the file.
    let url = pg().database("cli").unwrap();
    let (code, err) = run(&["migrate-journal", "--to", &url, "--state-dir", &state]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("rabbit2packer.sqlite: does not exist"), "{err}");
    // Not a PostgreSQL URL: 2, without the password.
    let (code, err) = run(&[
        "migrate-journal",
        "--to",
        "mysql://u:secret@db/x",
        "--state-dir",
        &state,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("postgresql://") && err.contains("not a postgresql:// URL"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
    // The database unreachable: 1 (try again later).
    std::fs::write(dir.path().join("rabbit2packer.sqlite"), "").unwrap();
    let port = packuilon_testsupport::free_port();
    let (code, err) = run(&[
        "migrate-journal",
        "--to",
        &format!("postgresql://u:secret@127.0.0.1:{port}/x?connect_timeout=2"),
        "--state-dir",
        &state,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unavailable") && !err.contains("secret"), "{err}");
}
