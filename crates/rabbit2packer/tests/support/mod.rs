//! Harness for rabbit2packer's end-to-end tests: a site in a temp dir
//! (config.ini, template map, source images, RC file, null-builder
//! templates whose shell-local step records what it was given), the real
//! daemon binary, real RabbitMQ and real packer. Waits are bounded and wait
//! on events (log lines, journal states, files), never fixed sleeps.

#![allow(dead_code)]

pub mod browser;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use packuilon_testsupport::broker::{BrokerAddr, TestQueue};
use rabbit2packer::journal::{JobRecord, JobState, Journal};
use rabbit2packer::site_journal::SiteJournal;
use serde_json::{json, Value};

pub const PACKER: &str = "/usr/bin/packer";

/// A profile as cdb2rabbit publishes it.
pub fn profile(personality: &str, os_version: &str, archetype: &str, branch: Value) -> Value {
    json!({
        "metadata": {"template": {"branch": branch}},
        "system": {
            "archetype": {"name": archetype},
            "personality": {"name": personality},
            "os": {"distribution": {"name": "sl"}, "version": {"name": os_version}, "architecture": "x86_64"},
            "network": {"hostname": format!("{personality}-ci"), "domainname": "example.org"}
        }
    })
}

pub fn prod() -> Value {
    json!({"name": "prod", "type": "domain"})
}

/// One test's site: its own dirs, queue and config. Several daemons of one
/// site ([`Site::joining`]) each have a `Site` of their own (STATE_DIR,
/// LOG_DIR, BUILD_FILE_DIR, config.ini) sharing the queue, the template
/// map, the source images, the templates and `out`.
pub struct Site {
    pub dir: tempfile::TempDir,
    /// Deleted from the broker when the last site holding it is dropped.
    pub queue: Arc<TestQueue>,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    pub build_dir: PathBuf,
    pub out: PathBuf,
    pub templates: PathBuf,
    pub map: PathBuf,
    pub images: PathBuf,
    /// Log lines of the daemon started last (shown when a wait times out).
    last_daemon: Mutex<Option<Arc<Mutex<Vec<String>>>>>,
    /// `STATE_DB` and `STATE_DB_PASSWORD_FILE`, when the config names the
    /// shared site journal: [`Site::journal`] reads that.
    pub state_db: Option<(String, Option<PathBuf>)>,
    /// The test's own connection to the site journal, made at first use.
    site_journal: Mutex<Option<(tokio::runtime::Runtime, SiteJournal)>>,
}

/// How a template's shell-local step behaves.
#[derive(Clone, Copy)]
pub struct Step {
    pub sleep: f64,
    pub exit: i32,
}

impl Site {
    pub fn new(thread_count: usize, extra: &str) -> Site {
        Site::on(&BrokerAddr::shared(), thread_count, extra)
    }

    pub fn on(broker: &BrokerAddr, thread_count: usize, extra: &str) -> Site {
        Site::build(
            broker,
            Arc::new(TestQueue::on(broker, "r2p")),
            None,
            thread_count,
            extra,
        )
    }

    /// Another daemon of `first`'s site: a temp dir, STATE_DIR, LOG_DIR,
    /// BUILD_FILE_DIR and config.ini of its own, on `first`'s broker and
    /// queue, with its template map, source images, RC file, templates and
    /// `out` (so the runs of every daemon land in one file). `extra` holds
    /// this daemon's own keys (e.g. `HOST_NAME`).
    pub fn joining(first: &Site, thread_count: usize, extra: &str) -> Site {
        Site::build(
            &first.queue.broker,
            first.queue.clone(),
            Some(first),
            thread_count,
            extra,
        )
    }

    fn build(
        broker: &BrokerAddr,
        queue: Arc<TestQueue>,
        first: Option<&Site>,
        thread_count: usize,
        extra: &str,
    ) -> Site {
        let dir = tempfile::Builder::new().prefix("r2p-test-").tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let site = Site {
            config: d.join("config.ini"),
            state_dir: d.join("state"),
            log_dir: d.join("log"),
            build_dir: d.join("build"),
            out: first.map_or_else(|| d.join("out"), |f| f.out.clone()),
            templates: first.map_or_else(|| d.join("templates"), |f| f.templates.clone()),
            map: first.map_or_else(|| d.join("template-map.json"), |f| f.map.clone()),
            images: first.map_or_else(|| d.join("source-images.json"), |f| f.images.clone()),
            queue,
            dir,
            last_daemon: Mutex::new(None),
            state_db: state_db_of(extra),
            site_journal: Mutex::new(None),
        };
        let auth = first.map_or_else(|| d.join("auth.sh"), |f| f.dir.path().join("auth.sh"));
        if first.is_none() {
            for p in [&site.out, &site.templates] {
                std::fs::create_dir_all(p).unwrap();
            }
            std::fs::write(
                &auth,
                "# RC files hold logic: sourced by bash, never parsed\n\
                 if [ -z \"$NO_SUCH_VAR\" ]; then export OS_PROJECT_ID=project-1; fi\n\
                 export OS_USER_DOMAIN_NAME=Default\n\
                 export OS_AUTH_URL=http://127.0.0.1:1/v3\n",
            )
            .unwrap();
            site.write_images(json!({"sl7x-x86_64": "src-7x-uuid", "sl8x-x86_64": "src-8x-uuid"}));
            site.template("a.json", Step { sleep: 0.3, exit: 0 });
            site.write_map(json!({"DEFAULT": ["templates/a.json"]}));
        }
        // Each daemon's status server on a port of its own (the log names it).
        let status = if extra.contains("STATUS_LISTEN") {
            ""
        } else {
            "STATUS_LISTEN = 127.0.0.1:0\n"
        };
        let config = format!(
            "{global}RABBIT_RETRY_DELAY = 0.5\n\n[rabbit2packer]\nTHREAD_COUNT = {thread_count}\n\
             LOG_DIR = {log}\nBUILD_FILE_DIR = {build}\nPACKER_AUTH_FILE = {auth}\n\
             PACKER_TEMPLATE_MAP = {map}\nIMAGES_CONFIG = {images}\nPACKER_PATH = {PACKER}\n\
             STATE_DIR = {state}\nSTOP_TIMEOUT = 15\n{status}{extra}\n",
            global = broker.global_section(&site.queue.name),
            log = site.log_dir.display(),
            build = site.build_dir.display(),
            auth = auth.display(),
            map = site.map.display(),
            images = site.images.display(),
            state = site.state_dir.display(),
        );
        std::fs::write(&site.config, config).unwrap();
        site
    }

    /// Points RABBIT_PORT at a port nothing listens on (the broker "down");
    /// returns that port.
    pub fn use_closed_broker_port(&self) -> u16 {
        let closed = packuilon_testsupport::free_port();
        let text = std::fs::read_to_string(&self.config).unwrap();
        let port_line = text.lines().find(|l| l.starts_with("RABBIT_PORT")).unwrap().to_string();
        std::fs::write(
            &self.config,
            text.replace(&port_line, &format!("RABBIT_PORT = {closed}")),
        )
        .unwrap();
        closed
    }

    pub fn write_map(&self, v: Value) {
        write_json(&self.map, &v);
    }

    pub fn write_images(&self, v: Value) {
        write_json(&self.images, &v);
    }

    /// A null-builder template whose shell-local step appends
    /// `start|<tname>|$NAME|$IMAGE|<pgid>|<epoch.ns>|OS_TENANT_ID|OS_DOMAIN_NAME` and later
    /// `end|<tname>|$NAME|<epoch.ns>` to out/runs, sleeping between; `$METADATA` reaches
    /// the manifest post-processor (out/<$NAME>.<tname>.manifest.json). When
    /// out/fail exists the step exits with `step.exit` (or 3).
    pub fn template(&self, tname: &str, step: Step) -> PathBuf {
        let runs = self.out.join("runs");
        let fail = self.out.join("fail");
        let t = json!({
            "variables": {"name": "$NAME", "image": "$IMAGE"},
            "builders": [{"type": "null", "communicator": "none"}],
            "provisioners": [{
                "type": "shell-local",
                "environment_vars": ["R_NAME={{user `name`}}", "R_IMAGE={{user `image`}}"],
                "inline": [
                    format!("echo \"start|{tname}|$R_NAME|$R_IMAGE|$(cut -d' ' -f5 /proc/$$/stat)|$(date +%s.%N)|$OS_TENANT_ID|$OS_DOMAIN_NAME\" >> {}", runs.display()),
                    format!("echo 'building, with a comma'; sleep {}", step.sleep),
                    format!("if [ -e {} ]; then echo 'failing on purpose'; exit {}; fi", fail.display(), if step.exit == 0 { 3 } else { step.exit }),
                    format!("echo \"end|{tname}|$R_NAME|$(date +%s.%N)\" >> {}", runs.display()),
                ]
            }],
            "post-processors": [{
                "type": "manifest",
                "output": format!("{}/{{{{user `name`}}}}.{tname}.manifest.json", self.out.display()),
                "custom_data": "__METADATA__"
            }]
        });
        let text = serde_json::to_string_pretty(&t)
            .unwrap()
            .replace("\"__METADATA__\"", "{ $METADATA }");
        let path = self.templates.join(tname);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A null-builder template for several daemons of one site: its
    /// shell-local step appends `start|KEY|ARCHETYPE|HOST|PGID|EPOCH` to
    /// out/builds (one file for every daemon of the site), sleeps `sleep`
    /// seconds, then appends `end|KEY|ARCHETYPE|HOST|PGID|EPOCH`. KEY is the
    /// image key, ARCHETYPE the profile's (tests number their requests with
    /// it), HOST the daemon's `R2P_TEST_HOST` environment variable, PGID
    /// packer's process group. Read with [`Site::build_runs`].
    pub fn timed_template(&self, tname: &str, sleep: f64) -> PathBuf {
        let builds = self.out.join("builds");
        let record = |what: &str| {
            format!(
                "echo \"{what}|$R_KEY|$R_PROFILE|$R2P_TEST_HOST|$(cut -d' ' -f5 /proc/$$/stat)|$(date +%s.%N)\" >> {}",
                builds.display()
            )
        };
        let t = json!({
            // `$METADATA` makes the profile's values user variables.
            "variables": {"name": "$NAME", "__METADATA__": ""},
            "builders": [{"type": "null", "communicator": "none"}],
            "provisioners": [{
                "type": "shell-local",
                "environment_vars": [
                    "R_KEY={{user `AQ_PERSONALITY`}}-{{user `AQ_OS`}}{{user `AQ_OSVERSION`}}",
                    "R_PROFILE={{user `AQ_ARCHETYPE`}}"
                ],
                "inline": [record("start"), format!("sleep {sleep}"), record("end")]
            }]
        });
        let text = serde_json::to_string_pretty(&t)
            .unwrap()
            .replace("\"__METADATA__\": \"\"", "$METADATA");
        let path = self.templates.join(tname);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The builds [`Site::timed_template`] recorded, in the order they started.
    pub fn build_runs(&self) -> Vec<BuildRun> {
        let text = std::fs::read_to_string(self.out.join("builds")).unwrap_or_default();
        let mut runs: Vec<BuildRun> = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split('|').collect();
            assert_eq!(f.len(), 6, "a line of out/builds: {line:?}");
            let time: f64 = f[5].parse().unwrap();
            match f[0] {
                "start" => runs.push(BuildRun {
                    key: f[1].into(),
                    profile: f[2].into(),
                    host: f[3].into(),
                    pgid: f[4].parse().unwrap(),
                    start: time,
                    end: None,
                }),
                "end" => {
                    let run = runs
                        .iter_mut()
                        .rev()
                        .find(|r| {
                            r.end.is_none()
                                && (r.key.as_str(), r.host.as_str(), r.pgid.to_string().as_str()) == (f[1], f[3], f[4])
                        })
                        .unwrap_or_else(|| panic!("an end without its start: {line:?} in\n{text}"));
                    run.end = Some(time);
                }
                other => panic!("unknown record {other:?} in out/builds"),
            }
        }
        runs
    }

    /// Waits until `f` holds for [`Site::build_runs`]; returns them.
    pub fn wait_build_runs(&self, what: &str, timeout: Duration, f: impl Fn(&[BuildRun]) -> bool) -> Vec<BuildRun> {
        let deadline = Instant::now() + timeout;
        loop {
            let runs = self.build_runs();
            if f(&runs) {
                return runs;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; builds: {runs:#?}\ndaemon said:\n{}",
                    self.daemon_said()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn start(&self) -> Daemon {
        self.start_with_env(&[])
    }

    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Daemon {
        self.start_via(&[], env)
    }

    /// Starts the daemon through a wrapper command (`setpriv ... --`).
    pub fn start_via(&self, wrapper: &[&str], env: &[(&str, &str)]) -> Daemon {
        let d = Daemon::start_via(wrapper, &self.config, env);
        *self.last_daemon.lock().unwrap() = Some(d.lines.clone());
        d
    }

    /// Messages ready in the test's queue (not those delivered and unacked).
    pub fn queue_len(&self) -> u32 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(self.queue.broker.message_count(&self.queue.name)).unwrap()
    }

    /// Messages in the queue, ready or delivered and not acked yet (AMQP
    /// counts only the ready ones): asks the shared node with rabbitmqctl.
    pub fn queue_total(&self) -> u32 {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "name", "messages", "--no-table-headers"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let (name, n) = l.split_once('\t')?;
                (name == self.queue.name).then(|| n.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("queue {} not on the shared node", self.queue.name))
    }

    fn daemon_said(&self) -> String {
        match &*self.last_daemon.lock().unwrap() {
            Some(lines) => lines.lock().unwrap().join("\n"),
            None => "(no daemon started)".into(),
        }
    }

    pub fn publish(&self, body: &Value, message_id: Option<&str>) {
        publish_raw(
            &self.queue.broker,
            &self.queue.name,
            serde_json::to_vec(body).unwrap(),
            message_id,
        );
    }

    pub fn publish_bytes(&self, body: &[u8], message_id: Option<&str>) {
        publish_raw(&self.queue.broker, &self.queue.name, body.to_vec(), message_id);
    }

    /// Every job of the journal: the site journal when the config names
    /// STATE_DB, else the SQLite journal in STATE_DIR.
    pub fn journal(&self) -> Vec<JobRecord> {
        self.try_journal().unwrap()
    }

    /// As [`Site::journal`], an error (PostgreSQL away) as text.
    pub fn try_journal(&self) -> Result<Vec<JobRecord>, String> {
        let Some((url, password_file)) = &self.state_db else {
            return Journal::open_read_only(&self.state_dir)
                .and_then(|j| j.all())
                .map_err(|e| e.to_string());
        };
        let mut guard = self.site_journal.lock().unwrap();
        if guard.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let j = rt
                .block_on(SiteJournal::connect(url, password_file.as_deref()))
                .map_err(|e| e.to_string())?;
            *guard = Some((rt, j));
        }
        let (rt, j) = guard.as_ref().unwrap();
        // The connection is made again when it was lost (PostgreSQL restarted).
        rt.block_on(j.all()).map_err(|e| e.to_string())
    }

    /// Waits until `f` holds for the journal's jobs; returns them.
    pub fn wait_jobs(&self, what: &str, timeout: Duration, f: impl Fn(&[JobRecord]) -> bool) -> Vec<JobRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let (jobs, problem) = match self.try_journal() {
                Ok(jobs) => (jobs, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            if f(&jobs) {
                return jobs;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; journal ({problem:?}): {jobs:#?}\ndaemon said:\n{}",
                    self.daemon_said()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lines of out/runs, split on `|`.
    pub fn runs(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.out.join("runs"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    pub fn starts(&self) -> Vec<Vec<String>> {
        self.runs().into_iter().filter(|r| r[0] == "start").collect()
    }

    pub fn wait_runs(&self, what: &str, timeout: Duration, f: impl Fn(&[Vec<String>]) -> bool) -> Vec<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let runs = self.runs();
            if f(&runs) {
                return runs;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; runs: {runs:?}\ndaemon said:\n{}",
                    self.daemon_said()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The custom_data of each build recorded by the manifest post-processor.
    pub fn manifest_metadata(&self, name: &str, tname: &str) -> Vec<Value> {
        let path = self.out.join(format!("{name}.{tname}.manifest.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: Value = serde_json::from_str(&text).unwrap();
        v["builds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["custom_data"].clone())
            .collect()
    }

    /// Runs `rabbit2packer ARGS --config <site>`; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_rabbit2packer"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn logs(&self, stem: &str) -> Vec<PathBuf> {
        rabbit2packer::build_log::logs_of(&self.log_dir, stem)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }
}

/// `STATE_DB` and `STATE_DB_PASSWORD_FILE` among a config's extra lines.
fn state_db_of(extra: &str) -> Option<(String, Option<PathBuf>)> {
    let key = |name: &str| {
        extra.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    key("STATE_DB").map(|url| (url, key("STATE_DB_PASSWORD_FILE").map(PathBuf::from)))
}

fn write_json(path: &Path, v: &Value) {
    // Replace atomically, as an operator's editor would (a reader never sees half a file).
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn publish_raw(broker: &BrokerAddr, queue: &str, body: Vec<u8>, message_id: Option<&str>) {
    publish_all(broker, queue, &[(body, message_id.map(str::to_string))]);
}

/// Publishes every message over one connection, then waits for all confirms.
pub fn publish_all(broker: &BrokerAddr, queue: &str, messages: &[(Vec<u8>, Option<String>)]) {
    publish_all_as(broker, queue, messages, "test-profile.json")
}

/// As [`publish_all`], with this `profile` header.
pub fn publish_all_as(broker: &BrokerAddr, queue: &str, messages: &[(Vec<u8>, Option<String>)], profile: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = broker.connect().await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        packuilon_common::rabbit::declare_queue(&ch, queue, Default::default(), "the test broker")
            .await
            .unwrap();
        let mut confirms = Vec::new();
        for (body, message_id) in messages {
            let mut headers = FieldTable::default();
            headers.insert("profile".into(), AMQPValue::LongString(profile.into()));
            let mut props = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
            if let Some(id) = message_id {
                props = props.with_message_id(id.as_str().into());
            }
            confirms.push(
                ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props)
                    .await
                    .unwrap(),
            );
        }
        for c in confirms {
            c.await.unwrap();
        }
        conn.close(200, "published".into()).await.ok();
    });
}

/// One publishing connection kept open (for measuring from the publish itself).
pub struct Publisher {
    rt: tokio::runtime::Runtime,
    conn: lapin::Connection,
    ch: lapin::Channel,
    queue: String,
}

impl Publisher {
    pub fn new(broker: &BrokerAddr, queue: &str) -> Publisher {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (conn, ch) = rt.block_on(async {
            let conn = broker.connect().await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            packuilon_common::rabbit::declare_queue(&ch, queue, Default::default(), "the test broker")
                .await
                .unwrap();
            (conn, ch)
        });
        Publisher {
            rt,
            conn,
            ch,
            queue: queue.to_string(),
        }
    }

    /// Publishes one persistent message and waits for the broker's confirm.
    pub fn publish(&self, body: &[u8], message_id: &str) {
        self.rt.block_on(async {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(message_id.into());
            self.ch
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        });
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.conn.close(200, "done".into()));
    }
}

/// One build recorded by [`Site::timed_template`]'s step.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRun {
    pub key: String,
    /// The profile's archetype.
    pub profile: String,
    /// The daemon's `R2P_TEST_HOST`.
    pub host: String,
    /// Packer's process group.
    pub pgid: i32,
    /// Seconds since the epoch.
    pub start: f64,
    /// None while it runs (or when it was killed).
    pub end: Option<f64>,
}

/// The daemon binary, its stderr collected line by line.
pub struct Daemon {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Set when stderr reached its end (every line collected).
    eof: Arc<std::sync::atomic::AtomicBool>,
}

impl Daemon {
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_via(&[], config, env)
    }

    /// Runs `WRAPPER... rabbit2packer --config ...` (the wrapper execs it).
    pub fn start_via(wrapper: &[&str], config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_rabbit2packer"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_rabbit2packer")),
        };
        cmd.arg("--config")
            .arg(config)
            .arg("--log")
            .arg("stderr")
            .env("PACKUILON_LOG", "info")
            .env("RABBIT2PACKER_ROTATION_RETRY_DELAYS", "0.1,0.2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        let eof = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = eof.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("R2P_TEST_ECHO").is_some() {
                    eprintln!("daemon: {line}");
                }
                sink.lock().unwrap().push(line);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Daemon { child, lines, eof }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for log line {needle:?}; daemon said:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the daemon to exit (and its last log lines to be read);
    /// returns its exit code (or 128 + signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                let read_all = Instant::now() + Duration::from_secs(5);
                while !self.eof.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < read_all {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            }
            if Instant::now() > deadline {
                panic!("daemon did not exit; it said:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The status server's address, from the daemon's `Status page on ADDR, ...` line.
    pub fn status_addr(&self) -> std::net::SocketAddr {
        let line = self.wait_log("Status page on ", T);
        let rest = &line[line.find("Status page on ").unwrap() + "Status page on ".len()..];
        rest.split(',').next().unwrap().trim().parse().unwrap()
    }

    /// SIGTERM and wait for a clean exit (0).
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let code = self.wait_exit(T);
        assert_eq!(code, 0, "daemon exit code; it said:\n{}", self.output());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn succeeded(jobs: &[JobRecord]) -> usize {
    jobs.iter().filter(|j| j.state == JobState::Succeeded).count()
}

pub fn in_state(jobs: &[JobRecord], s: JobState) -> Vec<&JobRecord> {
    jobs.iter().filter(|j| j.state == s).collect()
}

/// Live processes in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    !rabbit2packer::runner::group_members(pgid).is_empty()
}

/// Live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s[s.rfind(')').unwrap_or(0)..].starts_with(") Z"))
                .unwrap_or(false);
            alive
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
                    .unwrap_or(false)
        })
        .collect()
}

pub fn wait_for(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The status code of a request sent as typed (no client normalises the path).
pub fn raw_status(addr: std::net::SocketAddr, target: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text)
}

/// The bound of every wait: generous, since it only matters when a test fails
/// (a busy CI machine may be slow), and a passing test never waits for it.
pub const T: Duration = Duration::from_secs(120);

/// A tmpfs of a given size mounted on a directory (created), for a disk
/// that must fill; unmounted when dropped, also when the test panics.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs on {}", dir.display());
        Tmpfs { dir: dir.to_path_buf() }
    }

    /// Writes a file until the file system is full; returns its path
    /// (remove it to give the space back).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = [0u8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a daemon killed a moment ago may still hold a file there.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Peak resident memory of a process (VmHWM), in bytes.
pub fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}
