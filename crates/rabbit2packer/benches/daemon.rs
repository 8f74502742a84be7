//! `cargo bench -p rabbit2packer`: the daemon against real RabbitMQ and real
//! packer (null builder, a 0.2 s shell-local step), THREAD_COUNT=4.
//!
//! - 1,000 messages for 100 images: builds run (goal: at most 2 per image),
//!   wall time against the ideal `ceil(builds / 4) x build time`;
//! - arrival -> packer start latency with a free worker (goal: median < 20 ms;
//!   the original polled every 2 s);
//! - daemon RSS idle and with 1,000 waiting jobs (goal < 40 MB);
//! - CPU used while idle for a minute (goal: near zero; no polling).
//!
//! Prints a markdown table.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rabbit2packer::journal::JobState;
use support::*;

const THREADS: usize = 4;

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// utime + stime of the process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn ticks_per_sec() -> u64 {
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as u64
}

/// Publishes over one connection; every message gets a fresh message id.
fn publish_many(site: &Site, bodies: &[Vec<u8>]) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let messages: Vec<(Vec<u8>, Option<String>)> = bodies
        .iter()
        .map(|b| {
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (b.clone(), Some(format!("bench-{n}")))
        })
        .collect();
    publish_all(&site.queue.broker, &site.queue.name, &messages);
}

fn parse_ts(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .with_timezone(&chrono::Utc)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep that quick.
    if std::env::args().any(|a| a == "--test") || !std::env::args().any(|a| a == "--bench") {
        println!("rabbit2packer bench: run with `cargo bench -p rabbit2packer`");
        return;
    }
    let idle_secs: u64 = std::env::var("R2P_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // --- Idle: RSS and CPU over a minute.
    let site = Site::new(THREADS, "");
    site.template("a.json", Step { sleep: 0.2, exit: 0 });
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = rss_kib(d.pid());
    let c0 = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_cpu = (cpu_ticks(d.pid()) - c0) as f64 / ticks_per_sec() as f64;
    rows.push((
        "daemon RSS, idle".into(),
        format!("{:.1} MiB", rss_idle as f64 / 1024.0),
        "< 40 MB".into(),
    ));
    rows.push((
        format!("CPU while idle for {idle_secs} s"),
        format!("{:.2} s ({:.3} %)", idle_cpu, idle_cpu * 100.0 / idle_secs as f64),
        "near zero".into(),
    ));

    // --- Latency: one message at a time, a worker always free.
    let n_lat = 30;
    let mut lat = Vec::new();
    let mut lat_daemon = Vec::new();
    let mut durations = Vec::new();
    let publisher = Publisher::new(&site.queue.broker, &site.queue.name);
    for i in 0..n_lat {
        let body = serde_json::to_vec(&profile(&format!("lat{i}"), "7x", "a", prod())).unwrap();
        let sent = chrono::Utc::now();
        publisher.publish(&body, &format!("latency-{i}"));
        let jobs = site.wait_jobs("latency build", T, |j| succeeded(j) == i + 1);
        let b = &jobs[i].builds[0];
        let started = parse_ts(b.started_at.as_deref().unwrap());
        lat.push((started - sent).num_microseconds().unwrap() as f64 / 1000.0);
        let received = parse_ts(jobs[i].received_at.as_deref().unwrap());
        lat_daemon.push((started - received).num_microseconds().unwrap() as f64 / 1000.0);
        let finished = parse_ts(b.finished_at.as_deref().unwrap());
        durations.push((finished - started).num_milliseconds() as f64 / 1000.0);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat_daemon.sort_by(|a, b| a.partial_cmp(b).unwrap());
    durations.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let build_time = percentile(&durations, 0.5);
    rows.push((
        format!("message published (persistent, confirmed) -> packer start, worker free ({n_lat} runs)"),
        format!(
            "median {:.1} ms, p95 {:.1} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.95)
        ),
        "median < 20 ms (original: 2 s polling)".into(),
    ));
    rows.push((
        "  of which: journaled (message received) -> packer start".into(),
        format!(
            "median {:.1} ms, p95 {:.1} ms",
            percentile(&lat_daemon, 0.5),
            percentile(&lat_daemon, 0.95)
        ),
        "".into(),
    ));
    rows.push((
        "one build (null builder, 0.2 s step), packer's own start-up included".into(),
        format!("median {build_time:.2} s"),
        "".into(),
    ));

    // --- Throughput and coalescing: 1,000 messages for 100 images.
    let before = site.journal().len();
    let bodies: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            serde_json::to_vec(&profile(
                &format!("img{}", i % 100),
                "7x",
                &format!("v{}", i / 100),
                prod(),
            ))
            .unwrap()
        })
        .collect();
    let t0 = Instant::now();
    publish_many(&site, &bodies);
    let jobs = site.wait_jobs("1,000 messages settled", Duration::from_secs(900), |j| {
        j.len() == before + 1000
            && j.iter()
                .all(|j| !matches!(j.state, JobState::Running | JobState::Waiting))
    });
    let wall = t0.elapsed().as_secs_f64();
    let jobs = &jobs[before..];
    let mut per_image: HashMap<&str, usize> = HashMap::new();
    for j in jobs.iter().filter(|j| j.state == JobState::Succeeded) {
        *per_image.entry(&j.image_key).or_default() += 1;
    }
    let builds: usize = per_image.values().sum();
    let max_per_image = per_image.values().copied().max().unwrap_or(0);
    let failed = jobs.iter().filter(|j| j.state == JobState::Failed).count();
    let ideal = (builds as f64 / THREADS as f64).ceil() * build_time;
    // Four packers at once on a small machine are each slower than one alone.
    let mut loaded: Vec<f64> = jobs
        .iter()
        .flat_map(|j| &j.builds)
        .filter_map(|b| {
            let (s, f) = (b.started_at.as_deref()?, b.finished_at.as_deref()?);
            Some((parse_ts(f) - parse_ts(s)).num_milliseconds() as f64 / 1000.0)
        })
        .collect();
    loaded.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let loaded_time = percentile(&loaded, 0.5);
    let ideal_loaded = (builds as f64 / THREADS as f64).ceil() * loaded_time;
    let received: Vec<_> = jobs
        .iter()
        .filter_map(|j| j.received_at.as_deref())
        .map(parse_ts)
        .collect();
    let journal_span = (*received.iter().max().unwrap() - *received.iter().min().unwrap()).num_milliseconds();
    rows.push((
        "1,000 messages / 100 images: builds run".into(),
        format!(
            "{builds} ({} images, max {max_per_image} per image, {} superseded, {failed} failed)",
            per_image.len(),
            jobs.iter().filter(|j| j.state == JobState::Superseded).count()
        ),
        "<= 2 per image".into(),
    ));
    rows.push((
        "1,000 messages / 100 images: wall time".into(),
        format!(
            "{wall:.1} s vs ideal ceil({builds}/{THREADS}) x {build_time:.2} s = {ideal:.1} s ({:.2}x)",
            wall / ideal
        ),
        "close to ideal".into(),
    ));
    rows.push((
        "  same, ideal from the build time under that load".into(),
        format!(
            "median build {loaded_time:.2} s with {THREADS} at once: ideal {ideal_loaded:.1} s ({:.2}x)",
            wall / ideal_loaded
        ),
        "".into(),
    ));
    rows.push((
        "1,000 messages journaled and acked (first -> last arrival)".into(),
        format!(
            "{:.2} s ({:.1} ms per message, fsync'd)",
            journal_span as f64 / 1000.0,
            journal_span as f64 / 1000.0
        ),
        "".into(),
    ));
    d.stop();
    drop(site);

    // --- Memory with 1,000 waiting jobs (1,000 images, builds that take a while).
    let site = Site::new(1, "STOP_TIMEOUT = 5");
    site.template("a.json", Step { sleep: 600.0, exit: 0 });
    let mut d = site.start();
    d.wait_log("Consuming from queue", T);
    let bodies: Vec<Vec<u8>> = (0..1001)
        .map(|i| serde_json::to_vec(&profile(&format!("wait{i}"), "7x", "a", prod())).unwrap())
        .collect();
    publish_many(&site, &bodies);
    site.wait_jobs("1,001 jobs journaled", Duration::from_secs(120), |j| j.len() == 1001);
    std::thread::sleep(Duration::from_millis(500));
    let rss_busy = rss_kib(d.pid());
    rows.push((
        "daemon RSS with 1,000 waiting jobs (+1 running)".into(),
        format!("{:.1} MiB", rss_busy as f64 / 1024.0),
        "< 40 MB".into(),
    ));
    d.stop();

    println!("\n| rabbit2packer (THREAD_COUNT={THREADS}, null builder) | measured | goal |");
    println!("|---|---|---|");
    for (what, value, goal) in rows {
        println!("| {what} | {value} | {goal} |");
    }
}
