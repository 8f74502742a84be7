//! Scale out (issue #13) end to end: three rabbit2packer daemons on one
//! queue of the shared RabbitMQ node and one site journal in a private
//! PostgreSQL (`STATE_DB`), each with its own HOST_NAME (d1, d2, d3),
//! STATE_DIR, LOG_DIR, BUILD_FILE_DIR and status port; real packer, with a
//! template whose step records when each build of each image starts and
//! ends, with which profile and on which daemon (`Site::timed_template`).
//! The requests are numbered by their profile's archetype (`v0`, `v1`, ...).
//!
//! What is asserted is what the issue promises site-wide: coalescing over
//! every daemon, one build of an image at a time, an expired lease taken
//! over once, PostgreSQL going away losing and doubling nothing, and
//! `status` on any daemon showing the whole site.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use packuilon_testsupport::postgres::PrivatePostgres;
use rabbit2packer::journal::{JobRecord, JobState};
use serde_json::{json, Value};
use support::*;

const TEMPLATE: &str = "build.json";

/// This file's PostgreSQL: a database in it for each test, except the one
/// that stops PostgreSQL (it starts a cluster of its own).
fn pg() -> &'static PrivatePostgres {
    PrivatePostgres::shared().expect("a private PostgreSQL (Debian's postgresql package)")
}

/// `STATE_DB = <url>` for a new database in this file's PostgreSQL.
fn state_db(prefix: &str) -> String {
    format!("STATE_DB = {}", pg().database(prefix).unwrap())
}

/// The HOST_NAME of daemon `i`.
fn host(i: usize) -> String {
    format!("d{}", i + 1)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A request as cdb2rabbit publishes it: `personality`'s profile, numbered
/// `n` by its archetype `v<n>`, with a message id of its own.
fn request(personality: &str, n: usize) -> (Vec<u8>, Option<String>) {
    let body = profile(personality, "7x", &format!("v{n}"), prod());
    (serde_json::to_vec(&body).unwrap(), Some(format!("{personality}-{n}")))
}

fn key(personality: &str) -> String {
    format!("{personality}-sl7x-x86_64")
}

/// The daemons of one site: `sites[i]` and `daemons[i]` are host `d<i+1>`.
struct Scale {
    sites: Vec<Site>,
    daemons: Vec<Option<Daemon>>,
}

impl Scale {
    /// Three daemons of `thread_count` workers each, their builds taking
    /// `sleep` s; `db` holds the STATE_DB lines, `extra` further keys of
    /// every daemon.
    fn new(db: &str, thread_count: usize, sleep: f64, extra: &str) -> Scale {
        let keys = |i: usize| format!("{db}\nHOST_NAME = {}\n{extra}", host(i));
        let first = Site::new(thread_count, &keys(0));
        first.timed_template(TEMPLATE, sleep);
        first.write_map(json!({"DEFAULT": [format!("templates/{TEMPLATE}")]}));
        let mut sites = vec![first];
        for i in 1..3 {
            let site = Site::joining(&sites[0], thread_count, &keys(i));
            sites.push(site);
        }
        Scale {
            sites,
            daemons: vec![None, None, None],
        }
    }

    /// Starts daemon `i` (its builds record its host name).
    fn start(&mut self, i: usize) {
        let d = self.sites[i].start_with_env(&[("R2P_TEST_HOST", &host(i))]);
        self.daemons[i] = Some(d);
    }

    /// Starts the three and waits until each consumes.
    fn start_all(&mut self) {
        for i in 0..3 {
            self.start(i);
        }
        for i in 0..3 {
            self.daemon(i).wait_log("Consuming from queue", T);
        }
    }

    fn daemon(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().expect("daemon running")
    }

    fn index_of(&self, host_name: &str) -> usize {
        (0..3)
            .find(|&i| host(i) == host_name)
            .unwrap_or_else(|| panic!("no daemon is host {host_name:?}"))
    }

    /// Every daemon's log (for failure messages).
    fn said(&self) -> String {
        let mut out = String::new();
        for (i, d) in self.daemons.iter().enumerate() {
            if let Some(d) = d {
                out.push_str(&format!("---- {} said:\n{}\n", host(i), d.output()));
            }
        }
        out
    }

    /// The lines in which a daemon says it took over a job of `key`
    /// (`taken over by <its HOST_NAME>`).
    fn takeovers(&self, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, d) in self.daemons.iter().enumerate() {
            if let Some(d) = d {
                let needle = format!("taken over by {}", host(i));
                out.extend(
                    d.output()
                        .lines()
                        .filter(|l| l.contains(&needle) && l.contains(key))
                        .map(str::to_string),
                );
            }
        }
        out
    }

    /// SIGTERM to every running daemon at once, then a clean exit of each.
    fn stop_all(&mut self) {
        for d in self.daemons.iter().flatten() {
            d.signal(libc::SIGTERM);
        }
        for i in 0..3 {
            if let Some(d) = self.daemons[i].as_mut() {
                let code = d.wait_exit(T);
                assert_eq!(code, 0, "{} exit code; the daemons said:\n{}", host(i), self.said());
            }
        }
    }

    fn publish(&self, messages: &[(Vec<u8>, Option<String>)]) {
        let q = &self.sites[0].queue;
        publish_all(&q.broker, &q.name, messages);
    }

    /// Waits until `f` holds for the site journal's jobs and the recorded
    /// builds; returns both.
    fn wait(&self, what: &str, f: impl Fn(&[JobRecord], &[BuildRun]) -> bool) -> (Vec<JobRecord>, Vec<BuildRun>) {
        let deadline = Instant::now() + T;
        loop {
            let (jobs, problem) = match self.sites[0].try_journal() {
                Ok(jobs) => (jobs, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            let runs = self.sites[0].build_runs();
            if problem.is_none() && f(&jobs, &runs) {
                return (jobs, runs);
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; journal ({problem:?}): {jobs:#?}\nbuilds: {runs:#?}\n{}",
                    self.said()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `n` jobs are journaled and every one has finished
    /// (built or superseded), and every recorded build has ended.
    fn wait_settled(&self, n: usize) -> (Vec<JobRecord>, Vec<BuildRun>) {
        self.wait(&format!("{n} jobs, all finished"), |jobs, runs| {
            jobs.len() == n
                && jobs
                    .iter()
                    .all(|j| matches!(j.state, JobState::Succeeded | JobState::Superseded | JobState::Failed))
                && runs.iter().all(|r| r.end.is_some())
        })
    }
}

/// After a failed assertion: the daemons are asked to stop (so they stop
/// their packer runs) before they are killed.
impl Drop for Scale {
    fn drop(&mut self) {
        let mut running: Vec<&mut Daemon> = self.daemons.iter_mut().flatten().collect();
        running.retain_mut(|d| matches!(d.child.try_wait(), Ok(None)));
        for d in &running {
            d.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for d in running {
            while matches!(d.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
}

/// Messages each daemon journaled (its `... queued (message ID)` lines).
fn journaled_by(d: &Daemon) -> usize {
    d.count(" queued (message ")
}

/// What the journal and the recorded builds must agree on whatever
/// happened: every request journaled once (its message id), every job
/// built (succeeded) or superseded, each succeeded job built exactly once
/// and each build a succeeded job's, by the host the journal names; no
/// two builds of one image overlapping; each image's last build with its
/// newest profile (`newest[key]`).
fn assert_site_consistent(
    jobs: &[JobRecord],
    runs: &[BuildRun],
    published: &BTreeSet<String>,
    newest: &BTreeMap<String, String>,
    said: &str,
) {
    let context = || format!("journal: {jobs:#?}\nbuilds: {runs:#?}\n{said}");
    // Every request accounted for, once.
    let ids: Vec<String> = jobs.iter().map(|j| j.message_id.clone().unwrap_or_default()).collect();
    let id_set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), id_set.len(), "a message journaled twice; {}", context());
    assert_eq!(
        &id_set,
        published,
        "journaled messages vs published ones; {}",
        context()
    );
    // Each build is one succeeded job's, built once, on the host the journal names.
    let profile_of = |j: &JobRecord| {
        let mid = j.message_id.as_deref().unwrap();
        format!("v{}", mid.rsplit('-').next().unwrap())
    };
    let mut built: BTreeMap<(String, String), Vec<&BuildRun>> = BTreeMap::new();
    for r in runs {
        built.entry((r.key.clone(), r.profile.clone())).or_default().push(r);
    }
    for ((k, p), rs) in &built {
        assert_eq!(
            rs.len(),
            1,
            "{k} with profile {p} built {} times; {}",
            rs.len(),
            context()
        );
    }
    for j in jobs {
        let built_as = built.get(&(j.image_key.clone(), profile_of(j)));
        match j.state {
            JobState::Succeeded => {
                let run = built_as.unwrap_or_else(|| panic!("job {} succeeded, never built; {}", j.id, context()));
                assert_eq!(
                    j.host.as_deref(),
                    Some(run[0].host.as_str()),
                    "job {}: the host that built it; {}",
                    j.id,
                    context()
                );
            }
            JobState::Superseded => assert!(built_as.is_none(), "job {} superseded, yet built; {}", j.id, context()),
            other => panic!("job {} ended {other:?}; {}", j.id, context()),
        }
    }
    let succeeded = jobs.iter().filter(|j| j.state == JobState::Succeeded).count();
    assert_eq!(runs.len(), succeeded, "builds vs succeeded jobs; {}", context());
    // One build of an image at a time; its last one with its newest profile.
    for (k, p) in newest {
        let mut of_key: Vec<&BuildRun> = runs.iter().filter(|r| &r.key == k).collect();
        of_key.sort_by(|a, b| a.start.total_cmp(&b.start));
        for w in of_key.windows(2) {
            assert!(
                w[1].start >= w[0].end.unwrap(),
                "two builds of {k} overlap: {:?} and {:?}; {}",
                w[0],
                w[1],
                context()
            );
        }
        let last = of_key
            .last()
            .unwrap_or_else(|| panic!("{k} never built; {}", context()));
        assert_eq!(&last.profile, p, "{k}: the last build's profile; {}", context());
    }
}

#[test]
fn twenty_requests_for_one_image_over_three_daemons_build_it_twice_at_most_the_last_with_the_newest_profile() {
    let mut s = Scale::new(&state_db("coalesce"), 2, 3.0, "JOB_LEASE = 10s");
    s.start_all();
    let k = key("inventory");
    s.publish(&[request("inventory", 0)]);
    s.wait("the first build to start", |_, runs| !runs.is_empty());
    // 18 requests while it builds, spread over the three daemons, then the
    // newest (after the others are journaled: which of two daemons
    // journals first is a race, the newest must not be).
    let burst: Vec<_> = (1..=18).map(|n| request("inventory", n)).collect();
    s.publish(&burst);
    s.wait("19 jobs", |jobs, _| jobs.len() == 19);
    s.publish(&[request("inventory", 19)]);
    let (_, runs) = s.wait("20 jobs", |jobs, _| jobs.len() == 20);
    assert!(
        runs[0].end.is_none(),
        "the test's premise: every request journaled while the first build runs (make the build longer?): {runs:#?}"
    );
    for i in 0..3 {
        assert!(
            journaled_by(s.daemon(i)) > 0,
            "the test's premise: requests spread over the three daemons; {}",
            s.said()
        );
    }
    let (jobs, _) = s.wait_settled(20);
    s.stop_all();
    let runs = s.sites[0].build_runs();
    let profiles: Vec<&str> = runs.iter().map(|r| r.profile.as_str()).collect();
    assert_eq!(
        profiles,
        vec!["v0", "v19"],
        "at most two builds site-wide, the last with the newest profile: {runs:#?}\n{}",
        s.said()
    );
    let published = (0..20).map(|n| format!("inventory-{n}")).collect();
    let newest = BTreeMap::from([(k, "v19".to_string())]);
    assert_site_consistent(&jobs, &runs, &published, &newest, &s.said());
    assert_eq!(s.sites[0].queue_len(), 0, "the queue ends empty");
}

#[test]
fn sixty_requests_over_ten_images_never_build_one_image_twice_at_once_and_end_on_each_newest_profile() {
    let mut s = Scale::new(&state_db("overlap"), 2, 1.0, "JOB_LEASE = 10s");
    s.start_all();
    let images: Vec<String> = (0..10).map(|i| format!("img{i}")).collect();
    // Six rounds of one request per image, while the earlier ones build;
    // each round journaled before the next is published (so "newest" is
    // the order of publishing, not a race between daemons).
    for round in 0..6 {
        let messages: Vec<_> = (0..10).map(|i| request(&images[(i + 3 * round) % 10], round)).collect();
        s.publish(&messages);
        s.wait(&format!("round {round} journaled"), |jobs, _| {
            jobs.len() == 10 * (round + 1)
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    let (jobs, runs) = s.wait_settled(60);
    s.stop_all();
    let published = (0..6)
        .flat_map(|round| images.iter().map(move |p| format!("{p}-{round}")))
        .collect();
    let newest = images.iter().map(|p| (key(p), "v5".to_string())).collect();
    assert_site_consistent(&jobs, &runs, &published, &newest, &s.said());
    // The builds really were spread and concurrent (else the test proves little).
    let hosts: BTreeSet<&str> = runs.iter().map(|r| r.host.as_str()).collect();
    assert!(hosts.len() >= 2, "builds on {hosts:?} only");
    assert_eq!(s.sites[0].queue_len(), 0, "the queue ends empty");
}

#[test]
fn a_killed_daemons_build_is_taken_over_once_after_the_lease_and_not_built_again_at_its_restart() {
    const LEASE: f64 = 3.0;
    let url = pg().database("lease").unwrap();
    let db = url.rsplit('/').next().unwrap();
    let mut s = Scale::new(&format!("STATE_DB = {url}"), 1, 4.0, "JOB_LEASE = 3s");
    s.start_all();
    let k = key("inventory");
    s.publish(&[request("inventory", 1)]);
    let (_, runs) = s.wait("the build to start", |_, runs| !runs.is_empty());
    let first = runs[0].clone();
    let victim = s.index_of(&first.host);
    // Its lease as renewed so far (renewals only push it further).
    let lease_until: f64 = pg()
        .psql(
            db,
            "SELECT extract(epoch FROM lease_until) FROM jobs WHERE state = 'running'",
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The host is lost: its daemon and its build are killed at once.
    s.daemon(victim).signal(libc::SIGKILL);
    unsafe { libc::killpg(first.pgid, libc::SIGKILL) };
    let killed_at = now();
    assert_eq!(s.daemons[victim].as_mut().unwrap().wait_exit(T), 128 + libc::SIGKILL);
    wait_for("the killed build's processes to be gone", T, || {
        !group_alive(first.pgid)
    });

    // Another daemon builds it, once the lease has run out.
    let (_, runs) = s.wait("the build taken over", |_, runs| runs.len() >= 2);
    let second = runs[1].clone();
    assert_ne!(second.host, first.host, "{runs:#?}");
    assert_eq!((second.key.as_str(), second.profile.as_str()), (k.as_str(), "v1"));
    assert!(
        lease_until - killed_at <= LEASE + 0.5,
        "a lease of JOB_LEASE: it ran until {lease_until}, killed at {killed_at}"
    );
    assert!(
        second.start >= lease_until,
        "built again {:.2} s after the kill, {:.2} s before the lease ran out",
        second.start - killed_at,
        lease_until - second.start
    );
    // A daemon (not necessarily the one that builds it again) took it over and said so.
    wait_for("a daemon to say it took the job over", T, || {
        !s.takeovers(&k).is_empty()
    });

    // The killed daemon restarts while the other builds its job.
    s.start(victim);
    s.daemon(victim).wait_log("Consuming from queue", T);
    let restarted_at = Instant::now();
    assert!(
        s.sites[0].build_runs()[1].end.is_none(),
        "the test's premise: the killed daemon is back while the other builds its job"
    );
    let (jobs, _) = s.wait("the job built", |jobs, runs| {
        jobs.len() == 1
            && jobs[0].state == JobState::Succeeded
            && runs.iter().all(|r| r.pgid == first.pgid || r.end.is_some())
    });
    // The restarted daemon has a lease's time to do anything wrong.
    let settle = Duration::from_secs_f64(LEASE).saturating_sub(restarted_at.elapsed());
    std::thread::sleep(settle);
    s.stop_all();
    let runs = s.sites[0].build_runs();
    assert_eq!(
        runs.iter().map(|r| r.host.as_str()).collect::<Vec<_>>(),
        vec![first.host.as_str(), second.host.as_str()],
        "built once more after the lease, not again at the restart: {runs:#?}\n{}",
        s.said()
    );
    let job = &jobs[0];
    assert_eq!(
        (job.state, job.host.as_deref(), job.attempts),
        (JobState::Succeeded, Some(second.host.as_str()), 2),
        "{job:#?}"
    );
    assert_eq!(s.sites[0].journal().len(), 1, "no new job either");
    let takeovers = s.takeovers(&k);
    assert_eq!(takeovers.len(), 1, "taken over once: {takeovers:?}");
    assert_eq!(s.sites[0].queue_len(), 0);
}

#[test]
fn postgresql_stopped_and_started_mid_run_loses_nothing_and_doubles_nothing() {
    // A cluster of this test's own, since it stops it. The lease outlasts
    // the outage: no job may be taken over (that would be a second build).
    let pg = PrivatePostgres::start().unwrap();
    let db = format!("STATE_DB = {}", pg.database("outage").unwrap());
    let mut s = Scale::new(&db, 2, 2.0, "JOB_LEASE = 30s");
    s.start_all();
    let images: Vec<String> = (0..10).map(|i| format!("img{i}")).collect();
    let round = |n: usize| -> Vec<(Vec<u8>, Option<String>)> { images.iter().map(|p| request(p, n)).collect() };

    s.publish(&round(0));
    s.wait("round 0 journaled and builds running", |jobs, runs| {
        jobs.len() == 10 && runs.iter().filter(|r| r.end.is_none()).count() >= 3
    });
    pg.stop(false).unwrap();
    let running_at_stop: Vec<BuildRun> = s.sites[0]
        .build_runs()
        .into_iter()
        .filter(|r| r.end.is_none())
        .collect();
    assert!(
        !running_at_stop.is_empty(),
        "the test's premise: builds running when PostgreSQL stops"
    );
    // Requests arrive while the database is away: consumed, not acked.
    s.publish(&round(1));
    // Running builds go on.
    wait_for("the builds running at the stop to end", T, || {
        let runs = s.sites[0].build_runs();
        running_at_stop.iter().all(|b| {
            runs.iter()
                .any(|r| r.pgid == b.pgid && r.key == b.key && r.end.is_some())
        })
    });
    assert_eq!(
        s.sites[0].queue_total(),
        10,
        "the requests that came while the database was away stay in RabbitMQ (none acked unjournaled)"
    );
    // Each daemon says so, in its log and its readiness.
    let addrs: Vec<_> = (0..3).map(|i| s.daemon(i).status_addr()).collect();
    for (i, &addr) in addrs.iter().enumerate() {
        s.daemon(i).wait_log("consuming paused", T);
        let (code, text) = raw_status(addr, "/readyz");
        assert_eq!(code, 503, "{} /readyz with the database away: {text}", host(i));
    }
    pg.start_again().unwrap();
    for (i, &addr) in addrs.iter().enumerate() {
        s.daemon(i).wait_log("reachable again", T);
        wait_for(&format!("{} ready again", host(i)), T, || {
            raw_status(addr, "/readyz").0 == 200
        });
    }

    s.wait("round 1 journaled", |jobs, _| jobs.len() == 20);
    s.publish(&round(2));
    s.wait("round 2 journaled", |jobs, _| jobs.len() == 30);
    s.publish(&round(3));
    let (jobs, runs) = s.wait_settled(40);
    s.stop_all();
    let published = (0..4)
        .flat_map(|n| images.iter().map(move |p| format!("{p}-{n}")))
        .collect();
    let newest = images.iter().map(|p| (key(p), "v3".to_string())).collect();
    assert_site_consistent(&jobs, &runs, &published, &newest, &s.said());
    for j in &jobs {
        assert!(
            j.attempts <= 1,
            "job {} started {} times\n{}",
            j.id,
            j.attempts,
            s.said()
        );
    }
    assert_eq!(s.sites[0].queue_len(), 0, "the queue ends empty");
}

#[test]
fn status_on_one_daemon_shows_the_builds_running_on_the_others() {
    // STATE_DB without the password, which comes from a file.
    let url = pg().database("status").unwrap();
    let db = url.rsplit('/').next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("state-db.pw");
    std::fs::write(&pw, format!("{}\n", pg().password())).unwrap();
    let keys = format!(
        "STATE_DB = {}?sslmode=disable\nSTATE_DB_PASSWORD_FILE = {}",
        pg().url_without_password(db),
        pw.display()
    );
    let mut s = Scale::new(&keys, 1, 60.0, "JOB_LEASE = 10s");
    s.start_all();
    // One worker each, three images: one build on each daemon.
    let names = ["alpha", "beta", "gamma"];
    s.publish(&names.iter().map(|p| request(p, 1)).collect::<Vec<_>>());
    let (jobs, runs) = s.wait("three builds running", |jobs, runs| {
        runs.len() == 3 && jobs.iter().filter(|j| j.state == JobState::Running).count() == 3
    });
    let hosts: BTreeSet<&str> = runs.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(hosts.len(), 3, "{runs:#?}");
    let id_of = |k: &str| jobs.iter().find(|j| j.image_key == k).unwrap().id;
    let expected: BTreeSet<(String, String, String)> = runs
        .iter()
        .map(|r| (r.key.clone(), "running".to_string(), r.host.clone()))
        .collect();
    for i in 0..3 {
        let (code, out, err) = s.sites[i].cli(&["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let json = out;
        let shown: BTreeSet<(String, String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|j| {
                (
                    j["image_key"].as_str().unwrap().to_string(),
                    j["state"].as_str().unwrap().to_string(),
                    j["host"].as_str().unwrap_or("(no host)").to_string(),
                )
            })
            .collect();
        assert_eq!(shown, expected, "status --json on {}:\n{json}", host(i));

        let (code, out, err) = s.sites[i].cli(&["status"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("running: 3"), "status on {}:\n{out}", host(i));
        for r in &runs {
            let line = out
                .lines()
                .find(|l| l.contains(&format!("#{} {} since ", id_of(&r.key), r.key)))
                .unwrap_or_else(|| panic!("status on {} names no build of {}:\n{out}", host(i), r.key));
            assert!(
                line.contains(&format!(" on {}/Thread-1", r.host)),
                "status on {}: {line:?} (built on {})",
                host(i),
                r.host
            );
            // What it builds and where its log is (on that host), as the
            // status of one host says.
            assert!(
                line.contains(&format!(" on {}/Thread-1, building {TEMPLATE}, log /", r.host)),
                "status on {}: {line:?} (building {TEMPLATE} on {}); status:\n{out}\nstatus --json:\n{json}",
                host(i),
                r.host
            );
        }
    }
    s.stop_all();
}
