//! `cargo bench -p cdb2rabbit`: the performance check, on loopback.
//!
//! A site of 100,000 profiles (2% of them `ci-*`, matching PROFILE_MATCH),
//! each a JSON file of about 3 KB, served on loopback by two servers in
//! turn: a plain `python3 -m http.server` (HTTP/1.0, listen backlog 5) and
//! testsupport's keep-alive ProfileServer. For each server and index size (10k, 50k,
//! 100k entries): a baseline run, a warm run with nothing changed, two
//! changed runs that bring the cache to its steady state, then a run
//! that finds changed CI profiles (1,000 at 100k; 1% of the index elsewhere,
//! so the work grows with the index) and publishes them to a queue of its own
//! on the shared RabbitMQ node (deleted afterwards). The floor is one `curl`
//! process fetching the index and the same changed files one after another
//! from the same server, measured just before each cdb2rabbit run (paired
//! runs, floor then cdb2rabbit, alternating). Wall time, the median of the
//! paired ratios and the peak RSS of the cdb2rabbit process (wait4's
//! rusage) go to one markdown table per server on stdout.
//!
//! Environment: `CDB2RABBIT_BENCH_CONCURRENCY` (DOWNLOAD_CONCURRENCY, default
//! 8), `CDB2RABBIT_BENCH_SERVER` (`plain`: only `python3 -m http.server`;
//! `keepalive`: only testsupport's ProfileServer, HTTP/1.1 keep-alive;
//! `backlog128`: only Python's threading server with a listen backlog of
//! 128; unset: `plain` then `keepalive`), `CDB2RABBIT_BENCH_KEEP=1` (keep the site, caches and logs),
//! `PACKUILON_LOG` (passed to cdb2rabbit; `cdb2rabbit=debug` logs confirm and
//! cache-write times).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use packuilon_testsupport::broker::TestQueue;

const TOTAL: usize = 100_000;
const SIZES: [usize; 3] = [10_000, 50_000, 100_000];
/// Every 50th profile is a CI profile: 2%.
const CI_EVERY: usize = 50;
/// Measured runs per size (the table shows medians: the machine is shared,
/// and one run's ratio swings by a tenth either way with the floor's own noise).
const REPS: usize = 7;
/// Changed runs before the measured ones (see where it is used).
const WARMUP: usize = 2;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn name(i: usize) -> String {
    if i.is_multiple_of(CI_EVERY) {
        format!("ci-host{i:06}.example.org.json")
    } else {
        format!("host{i:06}.example.org.json")
    }
}

/// About 3 KB of profile JSON.
fn body(i: usize, revision: u32) -> String {
    let mut packages = String::new();
    for p in 0..40 {
        if p > 0 {
            packages.push_str(", ");
        }
        let _ = write!(
            packages,
            "\"package-{p:02}\": {{\"arch\": {{\"x86_64\": \"\"}}, \"version\": \"1.{p}.{revision}\"}}"
        );
    }
    format!(
        "{{\"metadata\": {{\"template\": {{\"branch\": {{\"name\": \"prod\", \"type\": \"domain\"}}}}}}, \
         \"system\": {{\"personality\": {{\"name\": \"p{}\"}}, \"archetype\": {{\"name\": \"ral-tier1\"}}, \
         \"os\": {{\"distribution\": {{\"name\": \"sl\"}}, \"version\": {{\"name\": \"7x\"}}, \"architecture\": \"x86_64\"}}, \
         \"network\": {{\"hostname\": \"host{i:06}\", \"domainname\": \"example.org\"}}, \"revision\": {revision}}}, \
         \"software\": {{\"packages\": {{{packages}}}}}}}",
        i % 97
    )
}

fn write_index(path: &Path, size: usize, mtime_of: impl Fn(usize) -> u64) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    out.write_all(b"<?xml version='1.0' encoding='utf-8'?>\n<profiles>\n")
        .unwrap();
    for i in 0..size {
        writeln!(out, "<profile mtime='{}'>{}</profile>", mtime_of(i), name(i)).unwrap();
    }
    out.write_all(b"</profiles>").unwrap();
}

struct Measured {
    wall: Duration,
    /// User + system CPU time.
    cpu: Duration,
    max_rss_kib: i64,
    status: i32,
}

/// Python's `http.server` on loopback: a plain static server (threaded,
/// HTTP/1.0, one connection per request), stopped on drop. `plain`: exactly
/// `python3 -m http.server`, listen backlog 5 (concurrent clients see
/// dropped SYNs and 1 s retransmits, as with many a real server); else with
/// a listen backlog of 128.
struct StaticServer {
    child: std::process::Child,
    base: String,
}

impl StaticServer {
    fn serve(root: &Path, plain: bool) -> StaticServer {
        let port = packuilon_testsupport::free_port();
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let script = "import functools, http.server, sys\n\
            class Server(http.server.ThreadingHTTPServer):\n    request_queue_size = 128\n\
            handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])\n\
            handler.func.log_message = lambda *a: None\n\
            Server(('127.0.0.1', int(sys.argv[1])), handler).serve_forever()\n";
        let mut cmd = Command::new(python);
        if plain {
            cmd.args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
                .arg(root)
                .arg(port.to_string());
        } else {
            cmd.args(["-c", script, &port.to_string()]).arg(root);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "python3 -m http.server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        StaticServer {
            child,
            base: format!("http://127.0.0.1:{port}/"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Which servers the bench measures (see the module's docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Backlog128,
    KeepAlive,
}

impl Kind {
    fn selected() -> Vec<Kind> {
        match std::env::var("CDB2RABBIT_BENCH_SERVER").as_deref() {
            Ok("plain") | Ok("python") => vec![Kind::Plain],
            Ok("backlog128") => vec![Kind::Backlog128],
            Ok("keepalive") => vec![Kind::KeepAlive],
            Ok(other) if !other.is_empty() => {
                panic!("CDB2RABBIT_BENCH_SERVER={other}: expected plain, backlog128 or keepalive")
            }
            _ => vec![Kind::Plain, Kind::KeepAlive],
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Backlog128 => "backlog128",
            Kind::KeepAlive => "keepalive",
        }
    }
}

/// The server under the bench.
enum Server {
    Python(StaticServer, Kind),
    KeepAlive(packuilon_testsupport::http::ProfileServer),
}

impl Server {
    fn start(root: &Path, kind: Kind) -> Server {
        match kind {
            Kind::KeepAlive => Server::KeepAlive(packuilon_testsupport::http::ProfileServer::serve(root)),
            Kind::Plain => Server::Python(StaticServer::serve(root, true), kind),
            Kind::Backlog128 => Server::Python(StaticServer::serve(root, false), kind),
        }
    }

    fn url(&self, path: &str) -> String {
        match self {
            Server::Python(s, _) => s.url(path),
            Server::KeepAlive(s) => s.url(path),
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Server::Python(_, Kind::Plain) => {
                "`python3 -m http.server`: HTTP/1.0, one connection per request for both, listen backlog 5"
            }
            Server::Python(..) => {
                "Python's `http.server.ThreadingHTTPServer` + `SimpleHTTPRequestHandler`, listen backlog 128: \
                 HTTP/1.0, so one connection per request for both"
            }
            Server::KeepAlive(_) => {
                "packuilon-testsupport's ProfileServer: HTTP/1.1 keep-alive, one thread per connection, \
                 so curl uses one connection and cdb2rabbit DOWNLOAD_CONCURRENCY"
            }
        }
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs cdb2rabbit and reaps it with wait4, for its own rusage.
fn run_cdb2rabbit(config: &Path, log: &Path, extra: &[&str]) -> Measured {
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_cdb2rabbit"))
        .arg("--config")
        .arg(config)
        .args(["--log", "stderr"])
        .args(extra)
        .env(
            "PACKUILON_LOG",
            std::env::var("PACKUILON_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn cdb2rabbit");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let wall = start.elapsed();
    std::mem::forget(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Measured {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
    }
}

fn check(m: &Measured, log: &Path, what: &str) {
    if m.status != 0 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let problems: Vec<&str> = text.lines().filter(|l| !l.contains(" INFO ")).take(20).collect();
        let kept = std::env::temp_dir().join(format!("cdb2rabbit-bench-{what}-failed.log"));
        let _ = std::fs::copy(log, &kept);
        panic!(
            "{what} run exited {} (log kept in {}):\n{}",
            m.status,
            kept.display(),
            problems.join("\n")
        );
    }
}

/// One curl process fetching `urls` one after another.
fn curl_floor(urls: &[String], dir: &Path) -> Duration {
    let cfg = dir.join("curl.cfg");
    let mut text = String::new();
    for u in urls {
        let _ = writeln!(text, "url = \"{u}\"\noutput = \"/dev/null\"");
    }
    std::fs::write(&cfg, text).unwrap();
    let start = Instant::now();
    let status = Command::new("curl")
        .args(["-s", "-f", "-K"])
        .arg(&cfg)
        .status()
        .expect("curl");
    let wall = start.elapsed();
    assert!(status.success(), "curl failed: {status}");
    wall
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is not meaningful here.
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("cdb2rabbit-bench-").tempdir().unwrap();
    let www = dir.path().join("www");
    let profiles = www.join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    for i in 0..TOTAL {
        std::fs::write(profiles.join(name(i)), body(i, 1)).unwrap();
    }
    eprintln!("generated {TOTAL} profiles in {:.1?}", started.elapsed());
    let queue = TestQueue::new("cdb2rabbit-bench");
    // DOWNLOAD_CONCURRENCY of the runs (default 8, as an installation's default).
    let concurrency: usize = std::env::var("CDB2RABBIT_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut verdicts = Vec::new();
    for kind in Kind::selected() {
        let server = Server::start(&www, kind);
        let (table, ratio, rss) = bench_server(&server, kind, dir.path(), &www, &queue, concurrency, started);
        println!("\n### {}\n\n{table}", kind.label());
        println!(
            "Server: {}. Floor: one `curl -s -f -K list` process fetching the index and the same changed files one after another \
             from the same loopback server, just before each measured cdb2rabbit run (paired runs). cdb2rabbit: \
             DOWNLOAD_CONCURRENCY {concurrency} (the ceiling of its adaptive concurrency), publishing with confirms to the local RabbitMQ, cached copies made durable by one syncfs and the cached index fsynced. \
             Everything flushed (sync) before each timed run. {WARMUP} changed runs before the measured ones, so that \
             each changed profile has its cached copy and spare (the steady state). Dry run: `cdb2rabbit --dry-run` just before \
             each floor, the same downloads and comparisons with nothing published or written. Medians of {REPS} runs; ratio: the median of the \
             {REPS} paired ratios (each run's wall to the floor measured just before it), with their lowest and highest; CPU and peak RSS of the cdb2rabbit process from wait4(2).",
            server.describe(),
        );
        verdicts.push((kind, ratio, rss));
    }
    drop(queue);
    if std::env::var_os("CDB2RABBIT_BENCH_KEEP").is_some() {
        eprintln!("kept {}", dir.keep().display());
    }
    println!();
    for (kind, ratio, rss) in verdicts {
        println!(
            "Targets at 100k, {} server: ratio {ratio:.2}x <= 1.5x: {}; peak RSS < 64 MB: {}",
            kind.label(),
            if ratio <= 1.5 { "met" } else { "NOT met" },
            if rss < 64 * 1024 { "met" } else { "NOT met" }
        );
    }
    println!("Total bench time {:.0?}.", started.elapsed());
}

/// Every index size against one server: its markdown table, and the ratio
/// and peak RSS (KiB) at the largest size.
fn bench_server(
    server: &Server,
    kind: Kind,
    dir: &Path,
    www: &Path,
    queue: &TestQueue,
    concurrency: usize,
    started: Instant,
) -> (String, f64, i64) {
    let profiles = www.join("profiles");
    let mut table = String::from(
        "| index entries | changed CI profiles | cdb2rabbit wall | curl floor | ratio (paired) | ratio, run by run | cdb2rabbit CPU | peak RSS | no-change run | dry run (downloads only) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut last = (0.0, 0);
    for size in SIZES {
        let run_dir = dir.join(format!("run-{}-{size}", kind.label()));
        std::fs::create_dir_all(&run_dir).unwrap();
        let index_name = format!("profiles-info-{size}.xml");
        let index_path = www.join(&index_name);
        let config = run_dir.join("config.ini");
        std::fs::write(
            &config,
            format!(
                "{}\n[cdb2rabbit]\nPROFILE_INFO_URL = {}\nPROFILE_DIR_URL = {}\nPROFILE_MATCH = ci-\nCACHE_DIR = {}\nDOWNLOAD_CONCURRENCY = {concurrency}\n",
                queue.broker.global_section(&queue.name),
                server.url(&index_name),
                server.url("profiles/"),
                run_dir.join("cache").display()
            ),
        )
        .unwrap();
        let log = run_dir.join("cdb2rabbit.log");

        write_index(&index_path, size, |_| 1_700_000_000);
        unsafe { libc::sync() };
        let base = run_cdb2rabbit(&config, &log, &[]);
        check(&base, &log, "baseline");
        let mut warm = Vec::new();
        for _ in 0..REPS {
            let m = run_cdb2rabbit(&config, &log, &[]);
            check(&m, &log, "no-change");
            warm.push(m.wall);
        }

        let changes = if size == TOTAL { 1_000 } else { size / 100 };
        let changed: Vec<usize> = (0..size).filter(|i| i.is_multiple_of(CI_EVERY)).take(changes).collect();
        assert_eq!(changed.len(), changes);
        let changed_set: std::collections::HashSet<usize> = changed.iter().copied().collect();
        let mut urls = vec![server.url(&index_name)];
        urls.extend(changed.iter().map(|&i| server.url(&format!("profiles/{}", name(i)))));
        let (mut walls, mut floors, mut cpu, mut rss) = (Vec::new(), Vec::new(), Vec::new(), 0);
        let mut dries = Vec::new();
        // WARMUP changed runs first, not measured: the measured runs see the
        // cache's steady state, where each changed profile already has its
        // cached copy and its spare (see cdb2rabbit's cache.rs). The first
        // change ever seen of a profile creates both files; on ext4 without
        // a journal creating files shortly after many were deleted (the
        // previous bench's clean-up) is slow for reasons of the filesystem.
        for rep in 0..WARMUP + REPS {
            let revision = 2 + rep as u32;
            for &i in &changed {
                std::fs::write(profiles.join(name(i)), body(i, revision)).unwrap();
            }
            write_index(&index_path, size, |i| {
                if changed_set.contains(&i) {
                    1_700_000_000 + u64::from(revision)
                } else {
                    1_700_000_000
                }
            });
            // The bench's own writes are flushed first: on ext4 (data=ordered) the first
            // syncfs/fsync of the measured run would otherwise write them out on its behalf.
            // SAFETY: sync(2) has no arguments and cannot fail.
            unsafe { libc::sync() };
            if rep >= WARMUP {
                // The same downloads and comparisons without publishing or
                // writing anything: what the web server alone allows.
                let dry = run_cdb2rabbit(&config, &log, &["--dry-run"]);
                check(&dry, &log, "dry-run");
                dries.push(dry.wall);
                // The pair: the floor, then the measured run.
                floors.push(curl_floor(&urls, &run_dir));
                unsafe { libc::sync() };
            }
            let measured = run_cdb2rabbit(&config, &log, &[]);
            check(&measured, &log, "measured");
            let published = block_on(queue.broker.message_count(&queue.name)).unwrap();
            assert_eq!(published as usize, changes, "not every change was published");
            block_on(queue.broker.drain(&queue.name)).unwrap();
            if rep < WARMUP {
                continue;
            }
            walls.push(measured.wall);
            cpu.push(measured.cpu);
            rss = rss.max(measured.max_rss_kib);
        }
        // Each run against the floor measured just before it.
        let mut run_ratios: Vec<f64> = walls
            .iter()
            .zip(&floors)
            .map(|(w, f)| w.as_secs_f64() / f.as_secs_f64())
            .collect();
        run_ratios.sort_by(f64::total_cmp);
        let ratio = run_ratios[run_ratios.len() / 2];
        let (wall, floor) = (median(&mut walls), median(&mut floors));
        let _ = writeln!(
            table,
            "| {size} | {changes} | {:.2} s | {:.2} s | {ratio:.2}x | {:.2}x-{:.2}x | {:.2} s | {:.1} MB | {:.2} s | {:.2} s ({:.2}x) |",
            wall.as_secs_f64(),
            floor.as_secs_f64(),
            run_ratios[0],
            run_ratios[run_ratios.len() - 1],
            median(&mut cpu).as_secs_f64(),
            rss as f64 / 1024.0,
            median(&mut warm).as_secs_f64(),
            median(&mut dries).as_secs_f64(),
            median(&mut dries).as_secs_f64() / floor.as_secs_f64(),
        );
        last = (ratio, rss);
        eprintln!("{}, {size}: done at {:.1?}", kind.label(), started.elapsed());
    }
    (table, last.0, last.1)
}

/// The broker helpers are async; a small runtime per call is plenty here.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}
