//! `cargo bench -p rabbit2packer --bench status`: the status server over a
//! journal of 100,000 finished jobs (100 image keys, 1,000 jobs each, one
//! template build per job), the real daemon, real RabbitMQ, real Chromium.
//!
//! - p50 / p99 of `/api/jobs?limit=50`, `/api/images` and `/metrics`
//!   (1,000 sequential requests each on one keep-alive connection; goal:
//!   p99 < 20 ms);
//! - the page's load in headless Chromium, navigation to its data drawn
//!   (`window.firstLoadMs`; goal < 300 ms);
//! - the daemon's CPU while idle with the page open (goal < 1% of a core).
//!
//! Prints a markdown table.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::browser::{Browser, Http};
use support::*;

const IMAGES: usize = 100;
const JOBS_PER_IMAGE: usize = 1000;
const REQUESTS: usize = 1000;
const LOADS: usize = 20;

/// utime + stime of the process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// 100,000 finished jobs, written straight into the journal the daemon made.
fn fill(site: &Site) {
    let mut conn = rusqlite::Connection::open(site.state_dir.join("rabbit2packer.sqlite")).unwrap();
    let tx = conn.transaction().unwrap();
    let start = chrono::Utc::now() - chrono::Duration::days(400);
    {
        let mut job = tx
            .prepare(
                "INSERT INTO jobs (message_id, body_sha256, profile, image_key, body, state, received_at,
                                   started_at, finished_at, attempts, worker, error)
                 VALUES (?1, ?2, ?3, ?4, X'', ?5, ?6, ?6, ?7, 1, 'Thread-1', ?8)",
            )
            .unwrap();
        let mut build = tx
            .prepare(
                "INSERT INTO builds (job_id, template, started_at, finished_at, exit_code, log_path, build_file,
                                     artifact_id, rotation, error)
                 VALUES (?1, 'openstack-managed.json', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .unwrap();
        for n in 0..IMAGES * JOBS_PER_IMAGE {
            let key = format!("personality{:03}-sl7x-x86_64", n % IMAGES);
            let t0 = start + chrono::Duration::seconds(n as i64 * 300);
            let t1 = t0 + chrono::Duration::seconds(240);
            let (s0, s1) = (
                t0.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                t1.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
            let failed = n % 20 == 7;
            let error = failed.then(|| "openstack-managed.json: packer exited with code 1".to_string());
            job.execute(rusqlite::params![
                format!("bench-{n}"),
                format!("{n:064x}"),
                format!("{key}.example.org.json"),
                key,
                if failed { "failed" } else { "succeeded" },
                s0,
                s1,
                error
            ])
            .unwrap();
            let id = tx.last_insert_rowid();
            let log = site
                .log_dir
                .join(format!("{key}.openstack-managed.json.{}.log", t0.timestamp()));
            build
                .execute(rusqlite::params![
                    id,
                    s0,
                    s1,
                    if failed { 1 } else { 0 },
                    log.display().to_string(),
                    site.build_dir.join(format!("{key}.json")).display().to_string(),
                    (!failed).then(|| format!("{:08x}-0000-4000-8000-{n:012x}", n)),
                    (!failed).then_some("skipped: rotation is off (no PACKER_ADMIN_AUTH_FILE)"),
                    error
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

fn measure(http: &Http, path: &str) -> (f64, f64, usize) {
    for _ in 0..50 {
        http.get(path);
    }
    let mut times = Vec::with_capacity(REQUESTS);
    let mut size = 0;
    for _ in 0..REQUESTS {
        let t = Instant::now();
        let (status, body) = http.get(path);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200, "{path}: {body}");
        size = body.len();
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (percentile(&times, 0.5), percentile(&times, 0.99), size)
}

fn main() {
    if std::env::args().any(|a| a == "--test") || !std::env::args().any(|a| a == "--bench") {
        println!("status bench: run with `cargo bench -p rabbit2packer --bench status`");
        return;
    }
    let idle_secs: u64 = std::env::var("R2P_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let site = Site::new(2, "");
    // The daemon makes the journal (its schema, at its version); then it is filled.
    let mut d = site.start();
    d.status_addr();
    d.stop();
    let t = Instant::now();
    fill(&site);
    let fill_secs = t.elapsed().as_secs_f64();
    let d = site.start();
    let addr = d.status_addr();
    let http = Http::new(addr);
    let mut rows: Vec<(String, String, String)> = Vec::new();
    rows.push((
        format!(
            "journal: {} finished jobs, {IMAGES} image keys",
            IMAGES * JOBS_PER_IMAGE
        ),
        format!("filled in {fill_secs:.1} s"),
        String::new(),
    ));
    for path in ["/api/jobs?limit=50", "/api/images", "/metrics"] {
        let (p50, p99, size) = measure(&http, path);
        rows.push((
            format!("`{path}` ({REQUESTS} requests, {} KiB)", size / 1024),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
            "p99 < 20 ms".into(),
        ));
    }

    let browser = Browser::start();
    let base = format!("http://{addr}/");
    let mut loads = Vec::new();
    let mut html = Vec::new();
    // The first navigation also starts Chromium's renderer process: not counted.
    browser.goto(&base);
    for n in 0..LOADS {
        // A new navigation each time (a new document, its requests all made again).
        browser.goto(&format!("{base}?n={n}"));
        let v = browser.wait("the page's data", "return window.firstLoadMs || null;", |v| {
            v.is_number()
        });
        loads.push(v.as_f64().unwrap());
        let h = browser.eval("return performance.getEntriesByType('navigation')[0].responseEnd;");
        html.push(h.as_f64().unwrap());
    }
    let rows_shown = browser.eval("return document.querySelectorAll('#images tr[data-image]').length;");
    assert_eq!(rows_shown, IMAGES as u64);
    loads.sort_by(|a, b| a.partial_cmp(b).unwrap());
    html.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rows.push((
        format!("page load in Chromium, navigation to {IMAGES} images and 50 jobs drawn ({LOADS} loads)"),
        format!(
            "median {:.0} ms, p90 {:.0} ms, max {:.0} ms (HTML received: median {:.0} ms)",
            percentile(&loads, 0.5),
            percentile(&loads, 0.9),
            loads[loads.len() - 1],
            percentile(&html, 0.5)
        ),
        "< 300 ms".into(),
    ));

    // Idle, with the page open and following.
    std::thread::sleep(Duration::from_secs(2));
    let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let used = (cpu_ticks(d.pid()) - before) as f64 / tps;
    rows.push((
        format!("daemon CPU, idle {idle_secs} s with the page open"),
        format!("{used:.2} s ({:.2}% of a core)", used / idle_secs as f64 * 100.0),
        "< 1% of a core".into(),
    ));
    drop(browser);
    let mut d = d;
    d.stop();

    println!("\n| status server | measured | goal |");
    println!("|---|---|---|");
    for (what, value, goal) in rows {
        println!("| {what} | {value} | {goal} |");
    }
}
