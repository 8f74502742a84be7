//! `cargo bench -p rabbit2packer --bench site`: several daemons on one site
//! journal (`STATE_DB`, issue #13), against real RabbitMQ, a private
//! PostgreSQL (Debian's `postgresql`, started here) and real packer (null
//! builder), each daemon with THREAD_COUNT=2, its own HOST_NAME, STATE_DIR,
//! LOG_DIR and BUILD_FILE_DIR, all on one queue; a fresh database per run.
//!
//! - 1,000 messages over 200 images, builds that take 2 s (the template's
//!   shell-local step sleeps 2 s): ONE daemon, then THREE. Wall time from
//!   the first publish to every job settled (goal: three < 0.4x one), builds
//!   run, max builds per image (goal <= 2), and whether two builds of one
//!   image ever overlapped (from the times the builds themselves wrote, and
//!   from the site journal's);
//! - message published -> packer start on an idle site, one message at a
//!   time, 30 runs: three idle daemons on PostgreSQL (goal: median < 50 ms),
//!   and, in the same run, one daemon on its SQLite journal (goal < 20 ms).
//!
//! Prints a markdown table.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use packuilon_testsupport::postgres::PrivatePostgres;
use rabbit2packer::journal::{JobRecord, JobState};
use rabbit2packer::site_journal::SiteJournal;
use support::*;

/// THREAD_COUNT of each daemon.
const THREADS: usize = 2;
/// How long the template's step sleeps in the throughput runs.
const BUILD_SECS: f64 = 2.0;
const MESSAGES: usize = 1000;
const IMAGES: usize = 200;
/// Publish -> packer start runs.
const LATENCY_RUNS: usize = 30;

fn parse_ts(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .with_timezone(&chrono::Utc)
}

fn secs(a: &str, b: &str) -> f64 {
    (parse_ts(b) - parse_ts(a)).num_microseconds().unwrap() as f64 / 1e6
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// The config of daemon `name` on `site`: the site's (queue, templates,
/// THREAD_COUNT), with dirs of its own, HOST_NAME and `extra`.
fn daemon_config(site: &Site, name: &str, extra: &str) -> PathBuf {
    let base = site.dir.path().join(name);
    let text: Vec<String> = std::fs::read_to_string(&site.config)
        .unwrap()
        .lines()
        .map(|l| match l.split_once(" = ") {
            Some(("STATE_DIR", _)) => format!("STATE_DIR = {}", base.join("state").display()),
            Some(("LOG_DIR", _)) => format!("LOG_DIR = {}", base.join("log").display()),
            Some(("BUILD_FILE_DIR", _)) => format!("BUILD_FILE_DIR = {}", base.join("build").display()),
            _ => l.to_string(),
        })
        .collect();
    let path = site.dir.path().join(format!("{name}.ini"));
    // The config ends in its [rabbit2packer] section.
    std::fs::write(&path, format!("{}\nHOST_NAME = {name}\n{extra}\n", text.join("\n"))).unwrap();
    path
}

/// Starts `n` daemons (d1, d2, ...) on the site journal at `url`; returns
/// once each consumes.
fn start_daemons(site: &Site, url: &str, n: usize) -> Vec<Daemon> {
    let daemons: Vec<Daemon> = (1..=n)
        .map(|k| {
            Daemon::start(
                &daemon_config(site, &format!("d{k}"), &format!("STATE_DB = {url}")),
                &[],
            )
        })
        .collect();
    for d in &daemons {
        d.wait_log("Consuming from queue", T);
    }
    daemons
}

/// Stops the daemons; says on stderr what each logged at WARN or ERROR.
fn stop_all(daemons: &mut [Daemon], run: &str) {
    for (k, d) in daemons.iter_mut().enumerate() {
        d.stop();
        let out = d.output();
        let bad: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        eprintln!("{run}: d{} logged {} WARN/ERROR lines", k + 1, bad.len());
        for l in bad.iter().take(20) {
            eprintln!("  {l}");
        }
    }
}

/// The site journal, read the way the bench needs: a cheap progress query
/// on a connection of its own, and the whole journal through [`SiteJournal`].
struct Db {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    journal: SiteJournal,
}

impl Db {
    fn connect(url: &str) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (client, journal) = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            (client, SiteJournal::connect(url, None).await.unwrap())
        });
        Db { rt, client, journal }
    }

    /// (jobs, jobs still to settle, jobs succeeded).
    fn progress(&self) -> (i64, i64, i64) {
        self.rt.block_on(async {
            let r = self
                .client
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE state IN ('running', 'waiting', 'interrupted')),
                            count(*) FILTER (WHERE state = 'succeeded')
                     FROM jobs",
                    &[],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1), r.get(2))
        })
    }

    fn wait(&self, what: &str, timeout: Duration, poll: Duration, f: impl Fn((i64, i64, i64)) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.progress();
            if f(p) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: (jobs, active, succeeded) = {p:?}"
            );
            std::thread::sleep(poll);
        }
    }

    fn all(&self) -> Vec<JobRecord> {
        self.rt.block_on(self.journal.all()).unwrap()
    }
}

/// Publishes over one connection; every message gets a fresh message id.
fn publish_many(site: &Site, bodies: &[Vec<u8>]) {
    let messages: Vec<(Vec<u8>, Option<String>)> = bodies
        .iter()
        .enumerate()
        .map(|(n, b)| (b.clone(), Some(format!("bench-{n}"))))
        .collect();
    publish_all(&site.queue.broker, &site.queue.name, &messages);
}

/// One throughput run's figures.
struct Throughput {
    daemons: usize,
    wall: f64,
    /// Publish of the 1,000 messages (confirmed), from the start.
    published: f64,
    /// First -> last job journaled.
    journal_span: f64,
    builds: usize,
    /// Builds the template's step recorded (out/runs).
    step_runs: usize,
    images_built: usize,
    max_per_image: usize,
    superseded: usize,
    failed: usize,
    per_host: BTreeMap<String, usize>,
    /// Median build time under that load (packer's start-up included).
    loaded_build: f64,
    /// Images whose builds overlapped, by the step's own times.
    overlaps_step: Vec<String>,
    /// Images whose builds overlapped, by the site journal's times.
    overlaps_journal: Vec<String>,
}

/// Images (names) whose intervals overlap; `spans` are (name, start, end).
fn overlapping(spans: Vec<(String, f64, f64)>) -> Vec<String> {
    let mut by: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    for (k, s, e) in spans {
        by.entry(k).or_default().push((s, e));
    }
    let mut bad: Vec<String> = by
        .into_iter()
        .filter(|(_, v)| {
            let mut v = v.clone();
            v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            v.windows(2).any(|w| w[1].0 < w[0].1)
        })
        .map(|(k, _)| k)
        .collect();
    bad.sort();
    bad
}

fn throughput(pg: &PrivatePostgres, n_daemons: usize) -> Throughput {
    let site = Site::new(THREADS, "");
    site.template(
        "a.json",
        Step {
            sleep: BUILD_SECS,
            exit: 0,
        },
    );
    let url = pg.database(&format!("bench_{n_daemons}_daemons")).unwrap();
    let mut daemons = start_daemons(&site, &url, n_daemons);
    let db = Db::connect(&url);
    // Five versions of each image, spread over the whole run of messages.
    let bodies: Vec<Vec<u8>> = (0..MESSAGES)
        .map(|i| {
            serde_json::to_vec(&profile(
                &format!("img{}", i % IMAGES),
                "7x",
                &format!("v{}", i / IMAGES),
                prod(),
            ))
            .unwrap()
        })
        .collect();
    let t0 = Instant::now();
    publish_many(&site, &bodies);
    let published = t0.elapsed().as_secs_f64();
    db.wait(
        &format!("{MESSAGES} messages settled on {n_daemons} daemon(s)"),
        Duration::from_secs(1800),
        Duration::from_millis(100),
        |(jobs, active, _)| jobs == MESSAGES as i64 && active == 0,
    );
    let wall = t0.elapsed().as_secs_f64();
    stop_all(&mut daemons, &format!("throughput, {n_daemons} daemon(s)"));
    let jobs = db.all();
    assert_eq!(jobs.len(), MESSAGES);
    let mut per_image: HashMap<&str, usize> = HashMap::new();
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    let mut spans = Vec::new();
    let mut durations = Vec::new();
    for j in &jobs {
        for b in &j.builds {
            *per_image.entry(&j.image_key).or_default() += 1;
            *per_host.entry(b.host.clone().unwrap_or_default()).or_default() += 1;
            if let (Some(s), Some(f)) = (b.started_at.as_deref(), b.finished_at.as_deref()) {
                let s0 = parse_ts(s).timestamp_micros() as f64 / 1e6;
                spans.push((j.image_key.clone(), s0, s0 + secs(s, f)));
                durations.push(secs(s, f));
            }
        }
    }
    // What the builds themselves wrote: start|a.json|NAME|...|<epoch>|..., end|a.json|NAME|<epoch>.
    let mut open: HashMap<String, Vec<f64>> = HashMap::new();
    let mut step_spans = Vec::new();
    let mut step_runs = 0;
    for r in site.runs() {
        match r[0].as_str() {
            "start" => {
                step_runs += 1;
                open.entry(r[2].clone()).or_default().push(r[5].parse().unwrap());
            }
            "end" => {
                let end: f64 = r[3].parse().unwrap();
                // The earliest start of that image not yet ended.
                let starts = open.get_mut(&r[2]).expect("an end after its start");
                let start = starts.remove(0);
                step_spans.push((r[2].clone(), start, end));
            }
            _ => {}
        }
    }
    // A start without an end (its step failed) never ended: any later
    // build of its image overlaps it.
    for (name, starts) in open {
        for s in starts {
            step_spans.push((name.clone(), s, f64::INFINITY));
        }
    }
    let count = |s: JobState| jobs.iter().filter(|j| j.state == s).count();
    let received: Vec<_> = jobs
        .iter()
        .filter_map(|j| j.received_at.as_deref())
        .map(parse_ts)
        .collect();
    let journal_span =
        (*received.iter().max().unwrap() - *received.iter().min().unwrap()).num_milliseconds() as f64 / 1000.0;
    Throughput {
        daemons: n_daemons,
        wall,
        published,
        journal_span,
        builds: per_image.values().sum(),
        step_runs,
        images_built: per_image.len(),
        max_per_image: per_image.values().copied().max().unwrap_or(0),
        superseded: count(JobState::Superseded),
        failed: count(JobState::Failed),
        per_host,
        loaded_build: percentile(&sorted(durations), 0.5),
        overlaps_step: overlapping(step_spans),
        overlaps_journal: overlapping(spans),
    }
}

/// Publish -> packer start and received -> packer start, in ms, sorted.
struct Latency {
    publish: Vec<f64>,
    received: Vec<f64>,
    per_host: BTreeMap<String, usize>,
}

impl Latency {
    fn new(publish: Vec<f64>, received: Vec<f64>, per_host: BTreeMap<String, usize>) -> Latency {
        Latency {
            publish: sorted(publish),
            received: sorted(received),
            per_host,
        }
    }
}

fn latency_body(i: usize, what: &str) -> Vec<u8> {
    serde_json::to_vec(&profile(&format!("{what}{i}"), "7x", "a", prod())).unwrap()
}

/// Three idle daemons on the site journal, one message at a time.
fn latency_site(pg: &PrivatePostgres, n_daemons: usize) -> Latency {
    let site = Site::new(THREADS, "");
    site.template("a.json", Step { sleep: 0.2, exit: 0 });
    let url = pg.database("bench_latency").unwrap();
    let mut daemons = start_daemons(&site, &url, n_daemons);
    let db = Db::connect(&url);
    std::thread::sleep(Duration::from_secs(1));
    let publisher = Publisher::new(&site.queue.broker, &site.queue.name);
    let mut sent_at = Vec::new();
    for i in 0..LATENCY_RUNS {
        let body = latency_body(i, "pglat");
        sent_at.push(chrono::Utc::now());
        publisher.publish(&body, &format!("latency-{i}"));
        db.wait("latency build", T, Duration::from_millis(20), |(_, active, ok)| {
            ok == i as i64 + 1 && active == 0
        });
        // Idle again: the other workers' claims after the finish are done.
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_all(&mut daemons, "latency, PostgreSQL");
    let jobs = db.all();
    let (mut publish, mut received, mut per_host) = (Vec::new(), Vec::new(), BTreeMap::new());
    for (i, sent) in sent_at.iter().enumerate() {
        let mid = format!("latency-{i}");
        let j = jobs.iter().find(|j| j.message_id.as_deref() == Some(&mid)).unwrap();
        let b = &j.builds[0];
        let started = parse_ts(b.started_at.as_deref().unwrap());
        publish.push((started - *sent).num_microseconds().unwrap() as f64 / 1000.0);
        received.push(secs(j.received_at.as_deref().unwrap(), b.started_at.as_deref().unwrap()) * 1000.0);
        *per_host.entry(b.host.clone().unwrap_or_default()).or_default() += 1;
    }
    Latency::new(publish, received, per_host)
}

/// One daemon on its SQLite journal (no STATE_DB), as `--bench daemon` measures it.
fn latency_sqlite() -> Latency {
    let site = Site::new(THREADS, "");
    site.template("a.json", Step { sleep: 0.2, exit: 0 });
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    std::thread::sleep(Duration::from_secs(1));
    let publisher = Publisher::new(&site.queue.broker, &site.queue.name);
    let (mut publish, mut received) = (Vec::new(), Vec::new());
    for i in 0..LATENCY_RUNS {
        let body = latency_body(i, "sqlat");
        let sent = chrono::Utc::now();
        publisher.publish(&body, &format!("latency-{i}"));
        let jobs = site.wait_jobs("latency build", T, |j| succeeded(j) == i + 1);
        let b = &jobs[i].builds[0];
        let started = parse_ts(b.started_at.as_deref().unwrap());
        publish.push((started - sent).num_microseconds().unwrap() as f64 / 1000.0);
        received.push(
            secs(
                jobs[i].received_at.as_deref().unwrap(),
                b.started_at.as_deref().unwrap(),
            ) * 1000.0,
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_all(std::slice::from_mut(&mut d), "latency, SQLite");
    Latency::new(publish, received, BTreeMap::new())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep that quick.
    if std::env::args().any(|a| a == "--test") || !std::env::args().any(|a| a == "--bench") {
        println!("rabbit2packer site bench: run with `cargo bench -p rabbit2packer --bench site`");
        return;
    }
    // fsync on, as a site's database runs (the tests' clusters run without).
    let pg = PrivatePostgres::start_durable().expect("a private PostgreSQL (Debian's postgresql package)");
    let fsync = pg.psql("postgres", "SHOW fsync").unwrap().trim().to_string();
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // --- Latency first, while the machine is quiet.
    let lat_pg = latency_site(&pg, 3);
    let lat_sqlite = latency_sqlite();
    let ms = |v: &[f64]| format!("median {:.1} ms, p95 {:.1} ms", percentile(v, 0.5), percentile(v, 0.95));
    rows.push((
        format!(
            "message published (persistent, confirmed) -> packer start, idle site, 3 daemons on PostgreSQL ({LATENCY_RUNS} runs)"
        ),
        format!(
            "{} (started on {})",
            ms(&lat_pg.publish),
            lat_pg
                .per_host
                .iter()
                .map(|(h, n)| format!("{h}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "median < 50 ms".into(),
    ));
    rows.push((
        "  of which: journaled in PostgreSQL -> packer start".into(),
        ms(&lat_pg.received),
        "".into(),
    ));
    rows.push((
        format!("same, 1 daemon on SQLite (no STATE_DB) ({LATENCY_RUNS} runs)"),
        ms(&lat_sqlite.publish),
        "median < 20 ms".into(),
    ));
    rows.push((
        "  of which: journaled in SQLite -> packer start".into(),
        ms(&lat_sqlite.received),
        "".into(),
    ));

    // --- Throughput: one daemon, then three.
    let runs = [throughput(&pg, 1), throughput(&pg, 3)];
    for r in &runs {
        let total_threads = r.daemons * THREADS;
        let ideal = (r.builds as f64 / total_threads as f64).ceil() * r.loaded_build;
        rows.push((
            format!(
                "{MESSAGES} messages / {IMAGES} images, {BUILD_SECS} s builds, {} daemon(s) x THREAD_COUNT {THREADS}: wall time",
                r.daemons
            ),
            format!(
                "{:.1} s (published in {:.1} s, journaled in {:.1} s); ideal ceil({}/{total_threads}) x {:.2} s (median build under that load) = {ideal:.1} s ({:.2}x)",
                r.wall,
                r.published,
                r.journal_span,
                r.builds,
                r.loaded_build,
                r.wall / ideal
            ),
            "".into(),
        ));
        rows.push((
            format!("  builds run ({} daemon(s))", r.daemons),
            format!(
                "{} ({} images, max {} per image, {} superseded, {} failed; the step ran {} times; {})",
                r.builds,
                r.images_built,
                r.max_per_image,
                r.superseded,
                r.failed,
                r.step_runs,
                r.per_host
                    .iter()
                    .map(|(h, n)| format!("{h}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "<= 2 per image".into(),
        ));
        rows.push((
            format!("  two builds of one image overlapping ({} daemon(s))", r.daemons),
            if r.overlaps_step.is_empty() && r.overlaps_journal.is_empty() {
                "none (by the step's own times and by the site journal's)".into()
            } else {
                format!(
                    "by the step's times: {:?}; by the journal's: {:?}",
                    r.overlaps_step, r.overlaps_journal
                )
            },
            "none".into(),
        ));
    }
    rows.push((
        "three daemons / one daemon, wall time".into(),
        format!("{:.3}", runs[1].wall / runs[0].wall),
        "< 0.4".into(),
    ));

    println!(
        "\n| rabbit2packer on the site journal (PostgreSQL {}, fsync {fsync}; THREAD_COUNT={THREADS} per daemon, null builder) | measured | goal |",
        pg_version()
    );
    println!("|---|---|---|");
    for (what, value, goal) in rows {
        println!("| {what} | {value} | {goal} |");
    }
}

/// The major version of the private PostgreSQL's binaries.
fn pg_version() -> String {
    packuilon_testsupport::postgres::bin_dir()
        .ok()
        .and_then(|b| Some(b.parent()?.file_name()?.to_str()?.to_string()))
        .unwrap_or_default()
}
