//! A small Aquilon site for one test: a profiles directory and its
//! `profiles-info.xml` served over real HTTP, a cache directory, a config.ini
//! pointing at the shared RabbitMQ with a queue of the test's own, and the
//! real `cdb2rabbit` binary to run against them.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::AMQPValue;
use packuilon_testsupport::broker::TestQueue;
use packuilon_testsupport::http::ProfileServer;
use serde_json::{json, Value};

/// A profile as Aquilon compiles it (enough of it for the names).
pub fn profile(personality: &str, revision: u32) -> Value {
    json!({
        "system": {
            "personality": {"name": personality},
            "archetype": {"name": "ral-tier1"},
            "os": {"distribution": {"name": "sl"}, "version": {"name": "7x"}, "architecture": "x86_64"},
            "revision": revision
        },
        "metadata": {"template": {"branch": {"name": "prod", "type": "domain"}}}
    })
}

/// Expected cached index, in name order.
pub fn mt<const N: usize>(pairs: [(&str, u64); N]) -> Vec<(String, u64)> {
    pairs.iter().map(|(n, m)| (n.to_string(), *m)).collect()
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub struct Site {
    pub dir: tempfile::TempDir,
    pub server: ProfileServer,
    pub queue: TestQueue,
    profile_match: String,
    entries: RefCell<BTreeMap<String, u64>>,
    index_extra: RefCell<String>,
    gzip_index: Cell<bool>,
    dir_url_slash: Cell<bool>,
    extra_cdb: RefCell<String>,
    extra_global: RefCell<String>,
    broker_port: Cell<Option<u16>>,
    rabbit_host: RefCell<Option<String>>,
    file_urls: Cell<bool>,
}

/// A message taken from the test's queue.
#[derive(Debug)]
pub struct Msg {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub app_id: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
    pub message_id: Option<String>,
    pub profile_header: Option<String>,
}

pub struct Outcome {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn assert_status(&self, want: i32) {
        assert_eq!(
            self.status, want,
            "exit status\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
    }

    /// Each text appears in stderr, on lines in this order.
    pub fn assert_logs_in_order(&self, texts: &[&str]) {
        let mut lines = self.stderr.lines();
        for t in texts {
            assert!(
                lines.any(|l| l.contains(t)),
                "{t:?} missing (or out of order) in stderr:\n{}",
                self.stderr
            );
        }
    }
}

impl Site {
    pub fn new(profile_match: &str) -> Site {
        let dir = tempfile::Builder::new().prefix("cdb2rabbit-test-").tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("www/profiles")).unwrap();
        let server = ProfileServer::serve(&dir.path().join("www"));
        let site = Site {
            dir,
            server,
            queue: TestQueue::new("cdb2rabbit-test"),
            profile_match: profile_match.to_string(),
            entries: RefCell::new(BTreeMap::new()),
            index_extra: RefCell::new(String::new()),
            gzip_index: Cell::new(false),
            dir_url_slash: Cell::new(true),
            extra_cdb: RefCell::new(String::new()),
            extra_global: RefCell::new(String::new()),
            broker_port: Cell::new(None),
            rabbit_host: RefCell::new(None),
            file_urls: Cell::new(false),
        };
        site.write_index();
        site
    }

    /// PROFILE_DIR_URL with or without its trailing slash.
    pub fn with_dir_url_slash(self, slash: bool) -> Site {
        self.dir_url_slash.set(slash);
        self
    }

    /// The index is `profiles-info.xml.gz`, a gzip file.
    pub fn with_gzip_index_file(self) -> Site {
        self.gzip_index.set(true);
        self.write_index();
        self
    }

    /// PROFILE_INFO_URL and PROFILE_DIR_URL as `file://` URLs of the site's directory.
    pub fn with_file_urls(self) -> Site {
        self.file_urls.set(true);
        self
    }

    /// Extra lines for `[cdb2rabbit]`.
    pub fn with_extra_cdb(self, lines: &str) -> Site {
        self.extra_cdb.borrow_mut().push_str(lines);
        self
    }

    /// Extra lines for `[global]`.
    pub fn with_extra_global(self, lines: &str) -> Site {
        self.extra_global.borrow_mut().push_str(lines);
        self
    }

    /// The site after its first run: `names` served (each as [`profile`]
    /// revision 1 of the personality its name carries, `ci-a.json` -> `a`,
    /// listed with mtime 100) and recorded by that run as the baseline.
    pub fn with_baseline(self, names: &[&str]) -> Site {
        for name in names {
            let file = name.rsplit('/').next().unwrap_or(name);
            let personality = file.strip_prefix("ci-").unwrap_or(file);
            let personality = personality.split('.').next().unwrap_or(personality);
            self.put(name, &profile(personality, 1), 100);
        }
        self.run(&[]).assert_status(0);
        self
    }

    /// Points RABBIT_PORT elsewhere (`None`: the test broker).
    pub fn set_broker_port(&self, port: Option<u16>) {
        self.broker_port.set(port);
    }

    /// RABBIT_HOST's value (`None`: the test broker's host).
    pub fn set_rabbit_host(&self, value: Option<&str>) {
        *self.rabbit_host.borrow_mut() = value.map(str::to_string);
    }

    pub fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Serves `value` as profile `name` (gzip when the name ends in `.gz`),
    /// listed with `mtime`. Returns the JSON bytes.
    pub fn put(&self, name: &str, value: &Value, mtime: u64) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(value).unwrap();
        self.put_raw(name, &body, mtime);
        body
    }

    pub fn put_raw(&self, name: &str, body: &[u8], mtime: u64) {
        let path = self.www().join("profiles").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        if name.ends_with(".gz") {
            std::fs::write(&path, gzip(body)).unwrap();
        } else {
            std::fs::write(&path, body).unwrap();
        }
        self.entries.borrow_mut().insert(name.to_string(), mtime);
        self.write_index();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.www().join("profiles").join(name)).unwrap();
        self.entries.borrow_mut().remove(name);
        self.write_index();
    }

    /// Raw `<profile>` lines added to the index as they are.
    pub fn set_index_extra(&self, xml: &str) {
        *self.index_extra.borrow_mut() = xml.to_string();
        self.write_index();
    }

    fn index_name(&self) -> &'static str {
        if self.gzip_index.get() {
            "profiles-info.xml.gz"
        } else {
            "profiles-info.xml"
        }
    }

    /// As the Aquilon broker writes it.
    fn write_index(&self) {
        let mut xml = String::from("<?xml version='1.0' encoding='utf-8'?>\n<profiles>\n");
        for (name, mtime) in self.entries.borrow().iter() {
            xml.push_str(&format!("<profile mtime='{mtime}'>{name}</profile>\n"));
        }
        xml.push_str(&self.index_extra.borrow());
        xml.push_str("</profiles>");
        let path = self.www().join(self.index_name());
        if self.gzip_index.get() {
            std::fs::write(path, gzip(xml.as_bytes())).unwrap();
        } else {
            std::fs::write(path, xml).unwrap();
        }
    }

    pub fn config_text(&self) -> String {
        let mut global = self.queue.broker.global_section(&self.queue.name);
        if let Some(port) = self.broker_port.get() {
            global = global.replace(
                &format!("RABBIT_PORT = {}", self.queue.broker.port),
                &format!("RABBIT_PORT = {port}"),
            );
        }
        if let Some(hosts) = &*self.rabbit_host.borrow() {
            global = global.replace(
                &format!("RABBIT_HOST = {}\n", self.queue.broker.host),
                &format!("RABBIT_HOST = {hosts}\n"),
            );
        }
        let url = |path: &str| {
            if self.file_urls.get() {
                format!("file://{}/{path}", self.www().display())
            } else {
                self.server.url(path)
            }
        };
        let dir_url = if self.dir_url_slash.get() {
            url("profiles/")
        } else {
            url("profiles")
        };
        format!(
            "{global}RABBIT_RETRIES = 2\nRABBIT_RETRY_DELAY = 0.1\nADMIN_MAIL = ops@example.org\n{}\n\
             [cdb2rabbit]\nPROFILE_INFO_URL = {}\nPROFILE_DIR_URL = {dir_url}\nPROFILE_MATCH = {}\nCACHE_DIR = {}\n{}\n\
             [rabbit2packer]\nTHREAD_COUNT = 4\n",
            self.extra_global.borrow(),
            url(self.index_name()),
            self.profile_match,
            self.cache().display(),
            self.extra_cdb.borrow()
        )
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdb2rabbit"));
        cmd.args(["--log", "stderr"])
            .args(args)
            .env_remove("PACKER_UTILS_CONFIG")
            .env("PACKUILON_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("config.ini");
        std::fs::write(&path, self.config_text()).unwrap();
        path
    }

    pub fn run(&self, args: &[&str]) -> Outcome {
        let path = self.write_config();
        self.run_with_config(&path, args)
    }

    pub fn run_with_config(&self, config: &Path, args: &[&str]) -> Outcome {
        let mut cmd = self.command(args);
        cmd.arg("--config").arg(config);
        outcome(cmd.output().unwrap())
    }

    /// Runs with the config named by PACKER_UTILS_CONFIG instead of --config.
    pub fn run_env_config(&self, args: &[&str]) -> Outcome {
        let path = self.write_config();
        let mut cmd = self.command(args);
        cmd.env("PACKER_UTILS_CONFIG", path);
        outcome(cmd.output().unwrap())
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        let path = self.write_config();
        let mut cmd = self.command(args);
        cmd.arg("--config")
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    }

    /// Whether the queue exists on the broker (cdb2rabbit declares it when it publishes).
    pub fn queue_exists(&self) -> bool {
        block_on(async {
            let conn = self.queue.broker.connect().await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            let exists = ch
                .queue_declare(
                    self.queue.name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .is_ok();
            conn.close(200, "checked".into()).await.ok();
            exists
        })
    }

    /// Takes every message now in the queue (none when it does not exist).
    pub fn published(&self) -> Vec<Msg> {
        if !self.queue_exists() {
            return Vec::new();
        }
        block_on(async {
            let conn = self.queue.broker.connect().await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            let mut out = Vec::new();
            while let Some(m) = ch
                .basic_get(self.queue.name.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                let p = &m.delivery.properties;
                let header = p.headers().as_ref().and_then(|h| {
                    h.inner().get("profile").and_then(|v| match v {
                        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                        _ => None,
                    })
                });
                out.push(Msg {
                    body: m.delivery.data.clone(),
                    content_type: p.content_type().as_ref().map(|s| s.to_string()),
                    app_id: p.app_id().as_ref().map(|s| s.to_string()),
                    delivery_mode: *p.delivery_mode(),
                    timestamp: *p.timestamp(),
                    message_id: p.message_id().as_ref().map(|s| s.to_string()),
                    profile_header: header,
                });
            }
            conn.close(200, "drained".into()).await.ok();
            out
        })
    }

    /// Profile names of the messages now in the queue, sorted (drains it).
    pub fn published_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .published()
            .into_iter()
            .map(|m| m.profile_header.expect("profile header"))
            .collect();
        names.sort();
        names
    }

    /// The cached index, sorted by name.
    pub fn cached_mtimes(&self) -> Vec<(String, u64)> {
        let bytes = std::fs::read(self.cache().join("cached_info.xml")).unwrap();
        let idx = cdb2rabbit::index::parse(bytes).unwrap();
        assert!(idx.problems.is_empty(), "{:?}", idx.problems);
        let mut v: Vec<_> = idx.entries.into_iter().map(|e| (e.name, e.mtime)).collect();
        v.sort();
        v
    }

    pub fn cached_mtime(&self, name: &str) -> Option<u64> {
        self.cached_mtimes()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m)
    }

    pub fn cached_copy(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.cache().join(name)).ok()
    }

    /// Every file under CACHE_DIR with its contents.
    /// Temp files left in the cache directory (there should be none after a run).
    pub fn temp_files(&self) -> Vec<String> {
        std::fs::read_dir(self.cache().join(".cdb2rabbit-tmp"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn cache_snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for e in entries {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).unwrap().display().to_string();
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.cache(), &self.cache(), &mut out);
        out
    }
}

/// Waits for a spawned run at most `limit`; a run still going then is
/// killed and the test fails, showing what it logged.
pub fn finish_within(mut child: Child, limit: std::time::Duration) -> Outcome {
    let mut stderr = child.stderr.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let outcome = Outcome {
        status: status.and_then(|s| s.code()).unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    assert!(
        status.is_some(),
        "cdb2rabbit still ran after {limit:?} (killed)\n--- stderr\n{}",
        outcome.stderr
    );
    outcome
}

pub fn finish(child: Child) -> Outcome {
    outcome(child.wait_with_output().unwrap())
}

fn outcome(out: std::process::Output) -> Outcome {
    Outcome {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A RabbitMQ policy on one queue of the shared node, cleared on drop.
pub struct Policy {
    name: String,
}

impl Policy {
    pub fn set(queue: &str, definition: &str) -> Policy {
        let name = packuilon_testsupport::unique_name("cdb2rabbit-policy");
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        let out = Command::new("rabbitmqctl")
            .args([
                "-q",
                "set_policy",
                &name,
                &pattern,
                definition,
                "--apply-to",
                "queues",
                "--priority",
                "100",
            ])
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "set_policy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Policy { name }
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "clear_policy", &self.name])
            .output();
    }
}
