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
//! paired ratios, the CPU (wait4's rusage) and the peak RSS (VmHWM) of the
//! cdb2rabbit process and the requests the server answered go to one
//! markdown table per server on stdout.
//!
//! Environment: `CDB2RABBIT_BENCH_CONCURRENCY` (DOWNLOAD_CONCURRENCY, default
//! 8), `CDB2RABBIT_BENCH_SERVER` (`plain`: only `python3 -m http.server`;
//! `keepalive`: only testsupport's ProfileServer, HTTP/1.1 keep-alive;
//! `backlog128`: only Python's threading server with a listen backlog of
//! 128; unset: `plain` then `keepalive`), `CDB2RABBIT_BENCH_KEEP=1` (keep
//! the site, caches and logs), `CDB2RABBIT_BENCH_SIZES` (index sizes, e.g.
//! `100000`; default 10000,50000,100000), `CDB2RABBIT_BENCH_REPS` (measured
//! runs per size, default 7), `CDB2RABBIT_BENCH_BEFORE_BIN` (another
//! cdb2rabbit binary, e.g. an earlier commit's, which `scripts/bench.sh`
//! builds from `CDB2RABBIT_BENCH_BEFORE=REV`: measured alongside with a
//! cache of its own and paired with the same floor, which of the two runs
//! first alternating; labelled by `CDB2RABBIT_BENCH_BEFORE_REV`),
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

fn median<T: Ord + Copy>(v: &mut [T]) -> T {
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
    /// Its stderr: a line per request.
    log: std::path::PathBuf,
}

impl StaticServer {
    fn serve(root: &Path, plain: bool, log: &Path) -> StaticServer {
        let port = packuilon_testsupport::free_port();
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let script = "import functools, http.server, sys\n\
            class Server(http.server.ThreadingHTTPServer):\n    request_queue_size = 128\n\
            handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])\n\
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
            .stderr(std::fs::File::create(log).unwrap())
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
            log: log.to_path_buf(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GETs answered so far (as its log says).
    fn requests(&self) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter(|l| l.contains("\"GET ")).count()
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
    fn start(root: &Path, kind: Kind, log: &Path) -> Server {
        match kind {
            Kind::KeepAlive => Server::KeepAlive(packuilon_testsupport::http::ProfileServer::serve(root)),
            Kind::Plain => Server::Python(StaticServer::serve(root, true, log), kind),
            Kind::Backlog128 => Server::Python(StaticServer::serve(root, false, log), kind),
        }
    }

    /// Requests answered so far: how much load the runs put on the server.
    fn requests(&self) -> usize {
        match self {
            Server::Python(s, _) => s.requests(),
            Server::KeepAlive(s) => s.requests().len(),
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
fn run_cdb2rabbit(bin: &Path, config: &Path, log: &Path, extra: &[&str]) -> Measured {
    let start = Instant::now();
    let child = Command::new(bin)
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
    // wait4's ru_maxrss is no use here: the child was spawned sharing this
    // process's memory until its exec (vfork), and the kernel counts that
    // in, so it reports the bench's own peak (90 MB with the keep-alive
    // server's threads). The child's own high-water mark (VmHWM) is read
    // until it exits instead.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let done = done.clone();
        let status_file = format!("/proc/{pid}/status");
        std::thread::spawn(move || {
            let mut peak_kib = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let hwm = std::fs::read_to_string(&status_file).ok().and_then(|text| {
                    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
                    line.split_whitespace().nth(1)?.parse::<i64>().ok()
                });
                peak_kib = peak_kib.max(hwm.unwrap_or(0));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak_kib
        })
    };
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let wall = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let max_rss_kib = poller.join().unwrap();
    std::mem::forget(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Measured {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib,
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
    let concurrency: usize = env_number("CDB2RABBIT_BENCH_CONCURRENCY", 8);
    let reps: usize = env_number("CDB2RABBIT_BENCH_REPS", REPS);
    let mut verdicts = Vec::new();
    for kind in Kind::selected() {
        let server = Server::start(&www, kind, &dir.path().join(format!("server-{}.log", kind.label())));
        let (table, ratio, rss) = bench_server(&server, kind, dir.path(), &www, &queue, concurrency, started);
        println!("\n### {}\n\n{table}", kind.label());
        println!(
            "Server: {}. Floor: one `curl -s -f -K list` process fetching the index and the same changed files one after another \
             from the same loopback server, just before each measured cdb2rabbit run (paired runs). cdb2rabbit: \
             DOWNLOAD_CONCURRENCY {concurrency} (the ceiling of its adaptive concurrency), publishing with confirms to the local RabbitMQ, cached copies made durable by one syncfs and the cached index fsynced. \
             Everything flushed (sync) before each timed run. {WARMUP} changed runs before the measured ones, so that \
             each changed profile has its cached copy and spare (the steady state). Dry run: `cdb2rabbit --dry-run` just before \
             each floor (this tree's cdb2rabbit), the same downloads and comparisons with nothing published or written. Medians of {reps} runs; ratio: the median of the \
             {reps} paired ratios (each run's wall to the floor measured just before it), with their lowest and highest; CPU of the cdb2rabbit process from wait4(2), its peak RSS from /proc/PID/status (VmHWM, read every 2 ms until it exits).",
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

/// A cdb2rabbit binary under the bench: this tree's, or the one of
/// `CDB2RABBIT_BENCH_BEFORE_BIN` (an earlier commit's, for a before/after
/// comparison in the same run).
struct Subject {
    label: String,
    bin: std::path::PathBuf,
}

impl Subject {
    fn selected() -> Vec<Subject> {
        let mut subjects = vec![Subject {
            label: "this tree".into(),
            bin: env!("CARGO_BIN_EXE_cdb2rabbit").into(),
        }];
        if let Some(bin) = std::env::var_os("CDB2RABBIT_BENCH_BEFORE_BIN") {
            let rev = std::env::var("CDB2RABBIT_BENCH_BEFORE_REV").unwrap_or_else(|_| "before".into());
            subjects.push(Subject {
                label: rev,
                bin: bin.into(),
            });
        }
        subjects
    }
}

/// A subject's figures at one index size.
#[derive(Default)]
struct Figures {
    walls: Vec<Duration>,
    ratios: Vec<f64>,
    cpu: Vec<Duration>,
    rss: i64,
    warm: Vec<Duration>,
    /// Requests the server answered during each measured run.
    requests: Vec<usize>,
}

/// An environment variable's number, or `default`.
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Every index size against one server: its markdown table, and the ratio
/// and peak RSS (KiB) of this tree's cdb2rabbit at the largest size.
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
    let subjects = Subject::selected();
    let reps: usize = env_number("CDB2RABBIT_BENCH_REPS", REPS);
    let sizes: Vec<usize> = match std::env::var("CDB2RABBIT_BENCH_SIZES") {
        Ok(list) if !list.is_empty() => list
            .split(',')
            .map(|s| s.trim().parse().expect("CDB2RABBIT_BENCH_SIZES"))
            .collect(),
        _ => SIZES.to_vec(),
    };
    let mut table = String::from(
        "| index entries | changed CI profiles | cdb2rabbit | wall | curl floor | ratio (paired) | ratio, run by run | CPU | peak RSS | requests to the server (most) | no-change run | dry run (downloads only) |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut last = (0.0, 0);
    for size in sizes {
        assert!(size <= TOTAL, "at most {TOTAL} index entries");
        let run_dir = dir.join(format!("run-{}-{size}", kind.label()));
        std::fs::create_dir_all(&run_dir).unwrap();
        let index_name = format!("profiles-info-{size}.xml");
        let index_path = www.join(&index_name);
        // Each subject has its own cache, log and config.
        let setups: Vec<(std::path::PathBuf, std::path::PathBuf)> = (0..subjects.len())
            .map(|s| {
                let config = run_dir.join(format!("config-{s}.ini"));
                std::fs::write(
                    &config,
                    format!(
                        "{}\n[cdb2rabbit]\nPROFILE_INFO_URL = {}\nPROFILE_DIR_URL = {}\nPROFILE_MATCH = ci-\nCACHE_DIR = {}\nDOWNLOAD_CONCURRENCY = {concurrency}\n",
                        queue.broker.global_section(&queue.name),
                        server.url(&index_name),
                        server.url("profiles/"),
                        run_dir.join(format!("cache-{s}")).display()
                    ),
                )
                .unwrap();
                (config, run_dir.join(format!("cdb2rabbit-{s}.log")))
            })
            .collect();

        write_index(&index_path, size, |_| 1_700_000_000);
        unsafe { libc::sync() };
        let mut figures: Vec<Figures> = subjects.iter().map(|_| Figures::default()).collect();
        for (subject, (config, log)) in subjects.iter().zip(&setups) {
            let base = run_cdb2rabbit(&subject.bin, config, log, &[]);
            check(&base, log, "baseline");
        }
        for _ in 0..reps {
            for (s, (subject, (config, log))) in subjects.iter().zip(&setups).enumerate() {
                let m = run_cdb2rabbit(&subject.bin, config, log, &[]);
                check(&m, log, "no-change");
                figures[s].warm.push(m.wall);
            }
        }

        let changes = if size == TOTAL { 1_000 } else { size / 100 };
        let changed: Vec<usize> = (0..size).filter(|i| i.is_multiple_of(CI_EVERY)).take(changes).collect();
        assert_eq!(changed.len(), changes);
        let changed_set: std::collections::HashSet<usize> = changed.iter().copied().collect();
        let mut urls = vec![server.url(&index_name)];
        urls.extend(changed.iter().map(|&i| server.url(&format!("profiles/{}", name(i)))));
        let (mut floors, mut dries) = (Vec::new(), Vec::new());
        // WARMUP changed runs first, not measured: the measured runs see the
        // cache's steady state, where each changed profile already has its
        // cached copy and its spare (see cdb2rabbit's cache.rs). The first
        // change ever seen of a profile creates both files; on ext4 without
        // a journal creating files shortly after many were deleted (the
        // previous bench's clean-up) is slow for reasons of the filesystem.
        for rep in 0..WARMUP + reps {
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
            let mut floor = None;
            if rep >= WARMUP {
                // The same downloads and comparisons without publishing or
                // writing anything: what the web server alone allows.
                let (config, log) = &setups[0];
                let dry = run_cdb2rabbit(&subjects[0].bin, config, log, &["--dry-run"]);
                check(&dry, log, "dry-run");
                dries.push(dry.wall);
                // The floor, then the measured runs, each paired with it.
                let f = curl_floor(&urls, &run_dir);
                floors.push(f);
                floor = Some(f);
                unsafe { libc::sync() };
            }
            // With two subjects, which runs first alternates.
            for k in 0..subjects.len() {
                let s = (k + rep) % subjects.len();
                let (config, log) = &setups[s];
                let served = server.requests();
                let measured = run_cdb2rabbit(&subjects[s].bin, config, log, &[]);
                let requests = server.requests() - served;
                check(&measured, log, "measured");
                let published = block_on(queue.broker.message_count(&queue.name)).unwrap();
                assert_eq!(published as usize, changes, "not every change was published");
                block_on(queue.broker.drain(&queue.name)).unwrap();
                if let Some(floor) = floor {
                    let f = &mut figures[s];
                    f.walls.push(measured.wall);
                    f.ratios.push(measured.wall.as_secs_f64() / floor.as_secs_f64());
                    f.cpu.push(measured.cpu);
                    f.requests.push(requests);
                    f.rss = f.rss.max(measured.max_rss_kib);
                }
            }
        }
        let floor = median(&mut floors);
        for (s, (subject, f)) in subjects.iter().zip(&mut figures).enumerate() {
            f.ratios.sort_by(f64::total_cmp);
            let ratio = f.ratios[f.ratios.len() / 2];
            let dry = if s == 0 {
                let dry = median(&mut dries).as_secs_f64();
                format!("{dry:.2} s ({:.2}x)", dry / floor.as_secs_f64())
            } else {
                "-".into()
            };
            let _ = writeln!(
                table,
                "| {size} | {changes} | {} | {:.2} s | {:.2} s | {ratio:.2}x | {:.2}x-{:.2}x | {:.2} s | {:.1} MB | {} ({}) | {:.2} s | {dry} |",
                subject.label,
                median(&mut f.walls).as_secs_f64(),
                floor.as_secs_f64(),
                f.ratios[0],
                f.ratios[f.ratios.len() - 1],
                median(&mut f.cpu).as_secs_f64(),
                f.rss as f64 / 1024.0,
                median(&mut f.requests),
                f.requests.iter().max().unwrap(),
                median(&mut f.warm).as_secs_f64(),
            );
            if s == 0 {
                last = (ratio, f.rss);
            }
        }
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
