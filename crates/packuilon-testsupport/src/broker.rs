//! RabbitMQ for tests: the shared node on 127.0.0.1:5672 (started by
//! `make test`; override with `PACKUILON_TEST_AMQP_PORT`), private nodes
//! that a test may stop, kill and restart without disturbing the others,
//! and private three-node clusters ([`PrivateCluster`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

/// Host and port of a broker, guest/guest on vhost `/`.
#[derive(Debug, Clone)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    /// The shared node every test may use (with its own queue names).
    pub fn shared() -> BrokerAddr {
        let port = std::env::var("PACKUILON_TEST_AMQP_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(5672);
        BrokerAddr {
            host: "127.0.0.1".into(),
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}:{}/%2f", self.host, self.port)
    }

    /// The `[global]` section of a config.ini pointing at this broker.
    pub fn global_section(&self, queue: &str) -> String {
        format!(
            "[global]\nQUEUE = {queue}\nRABBIT_HOST = {}\nRABBIT_PORT = {}\nRABBIT_USER = guest\nRABBIT_PW = guest\n",
            self.host, self.port
        )
    }

    pub async fn connect(&self) -> Result<Connection> {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to test broker {}", self.url()))
    }

    /// Takes every message now in `queue` (acking each) and returns the bodies
    /// with their properties.
    pub async fn drain(&self, queue: &str) -> Result<Vec<lapin::message::BasicGetMessage>> {
        let conn = self.connect().await?;
        let ch = conn.create_channel().await?;
        let mut out = Vec::new();
        while let Some(msg) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await? {
            out.push(msg);
        }
        conn.close(200, "drained".into()).await.ok();
        Ok(out)
    }

    /// Message count of `queue` (declares nothing; errors if it is absent).
    pub async fn message_count(&self, queue: &str) -> Result<u32> {
        let conn = self.connect().await?;
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await?;
        conn.close(200, "counted".into()).await.ok();
        Ok(q.message_count())
    }

    /// Deletes `queue` (tests clean up what they declare).
    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        let conn = self.connect().await?;
        let ch = conn.create_channel().await?;
        ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
        conn.close(200, "deleted".into()).await.ok();
        Ok(())
    }
}

/// A queue name for one test, deleted from the shared broker when dropped.
pub struct TestQueue {
    pub name: String,
    pub broker: BrokerAddr,
}

impl TestQueue {
    pub fn new(prefix: &str) -> TestQueue {
        TestQueue {
            name: crate::unique_name(prefix),
            broker: BrokerAddr::shared(),
        }
    }

    pub fn on(broker: &BrokerAddr, prefix: &str) -> TestQueue {
        TestQueue {
            name: crate::unique_name(prefix),
            broker: broker.clone(),
        }
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let broker = self.broker.clone();
        let name = self.name.clone();
        // Drop may run inside a runtime: clean up from a thread of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                // rabbit2packer declares `<QUEUE>.rejected` beside the queue.
                for queue in [name.clone(), format!("{name}.rejected")] {
                    let _ = tokio::time::timeout(Duration::from_secs(5), broker.delete_queue(&queue)).await;
                }
                Some(())
            })
        })
        .join();
    }
}

/// A RabbitMQ node of one test's own, with all state under a temp dir, so
/// the test may stop, kill and restart it. Shut down and removed on drop.
pub struct PrivateBroker {
    pub addr: BrokerAddr,
    pub node: String,
    dir: tempfile::TempDir,
    /// Shut down by [`PrivateBroker::shutdown`] (and not launched since).
    down: std::sync::atomic::AtomicBool,
}

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

impl PrivateBroker {
    /// Starts a node on a free port and waits until it accepts AMQP.
    pub fn start() -> Result<PrivateBroker> {
        let b = PrivateBroker::prepare()?;
        b.launch()?;
        Ok(b)
    }

    /// A node's directory, port and name, not started yet.
    fn prepare() -> Result<PrivateBroker> {
        let dir = tempfile::Builder::new().prefix("packuilon-rabbit-").tempdir()?;
        let port = loop {
            let p = crate::free_port();
            // The distribution port is PORT+20000: it must fit and be free too.
            if p < 45000 && std::net::TcpListener::bind(("127.0.0.1", p + 20000)).is_ok() {
                break p;
            }
        };
        let node = format!("{}@localhost", crate::unique_name("pkt").replace('-', "_"));
        std::fs::write(dir.path().join("rabbitmq.conf"), "loopback_users = none\n")?;
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "")?;
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n")?;
        let b = PrivateBroker {
            addr: BrokerAddr {
                host: "127.0.0.1".into(),
                port,
            },
            node,
            dir,
            down: std::sync::atomic::AtomicBool::new(false),
        };
        Ok(b)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn env(&self, cmd: &mut Command) {
        let d = self.dir.path();
        cmd.env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.addr.port.to_string())
            .env("RABBITMQ_DIST_PORT", (self.addr.port + 20000).to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("rabbit.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"));
    }

    fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = Command::new(CTL);
        self.env(&mut cmd);
        cmd.arg("-n").arg(&self.node).args(args).stdin(Stdio::null());
        cmd.output().with_context(|| format!("running rabbitmqctl {args:?}"))
    }

    /// `rabbitmqctl ARGS` on this node; its stdout, or an error with what it said.
    pub fn rabbitmqctl(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl -n {} {args:?}: {}{}",
                self.node,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The type of each queue on the node (`rabbitmqctl list_queues name type`):
    /// `classic` or `quorum`; no management plugin needed.
    pub fn queue_types(&self) -> Result<Vec<(String, String)>> {
        let out = self.rabbitmqctl(&["list_queues", "--quiet", "--no-table-headers", "name", "type"])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (name, kind) = l.trim().split_once('\t')?;
                Some((name.to_string(), kind.trim().to_string()))
            })
            .collect())
    }

    /// Starts the node (first start or after a stop or kill) and waits for it.
    pub fn launch(&self) -> Result<()> {
        let mut cmd = Command::new(SERVER);
        self.env(&mut cmd);
        let status = cmd
            .arg("-detached")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("rabbitmq-server -detached failed: {status}");
        }
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(90);
        // The AMQP listener opens near the end of the boot. Waiting for it
        // costs nothing, where each rabbitmqctl run costs a second or two of
        // CPU that the booting node (or its cluster peers) would miss.
        while std::net::TcpStream::connect(("127.0.0.1", self.addr.port)).is_err() && Instant::now() < deadline {
            if let Ok(pid) = self.pid() {
                if unsafe { libc::kill(pid, 0) } != 0 {
                    break; // the VM died: await_startup says why
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        loop {
            // await_startup fails at once until the node has registered.
            let out = self.ctl(&["await_startup", "--timeout", "60"])?;
            if out.status.success() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "private RabbitMQ {} did not start: {}",
                    self.node,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Stops the whole node and waits until the VM has exited.
    pub fn shutdown(&self) -> Result<()> {
        self.rabbitmqctl(&["shutdown"])?;
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// SIGTERM to the node's VM, as `systemctl stop` sends it: a clean
    /// shutdown that starts at once (rabbitmqctl takes a second or two to
    /// start); waits until the VM has exited.
    pub fn terminate(&self) -> Result<()> {
        let pid = self.pid()?;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while unsafe { libc::kill(pid, 0) } == 0 {
            if Instant::now() > deadline {
                bail!("RabbitMQ node {} still runs 60 s after SIGTERM", self.node);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Stops the RabbitMQ application, keeping the VM (fast restart).
    pub fn stop_app(&self) -> Result<()> {
        let out = self.ctl(&["stop_app"])?;
        if !out.status.success() {
            bail!("stop_app: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub fn start_app(&self) -> Result<()> {
        let out = self.ctl(&["start_app"])?;
        if !out.status.success() {
            bail!("start_app: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// `kill -9` of the node's VM, as a crash would.
    pub fn kill9(&self) -> Result<()> {
        let pid = self.pid()?;
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn pid(&self) -> Result<i32> {
        let text = std::fs::read_to_string(self.pid_file())?;
        Ok(text.trim().parse()?)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("rabbit.pid")
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Its state goes with its directories: no need for a clean shutdown
        // (three in a row take ten seconds).
        for n in &self.nodes {
            let _ = n.kill9();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let dead = self.pid().is_ok_and(|pid| unsafe { libc::kill(pid, 0) } != 0);
        if dead || self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return; // stopped or killed already: rabbitmqctl would only wait for it
        }
        let _ = self.ctl(&["shutdown"]);
        if let Ok(pid) = self.pid() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // epmd may keep the name registered; it forgets it when the VM is gone.
    }
}

/// Three private RabbitMQ nodes joined into one cluster (their own names,
/// ports, directories; one Erlang cookie), for tests of quorum queues and
/// of clients that go from node to node. Any node may be stopped and
/// started again; all are shut down and removed on drop.
pub struct PrivateCluster {
    pub nodes: Vec<PrivateBroker>,
}

impl PrivateCluster {
    /// Starts three nodes at once, then joins the second and third to the
    /// first (`rabbitmqctl join_cluster`).
    pub fn start() -> Result<PrivateCluster> {
        let mut nodes = Vec::new();
        let cookie = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        for _ in 0..3 {
            let n = PrivateBroker::prepare()?;
            // Nodes of one cluster (and the CLI talking to them) share a cookie.
            let path = n.dir().join(".erlang.cookie");
            std::fs::write(&path, &cookie)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
            nodes.push(n);
        }
        let cluster = PrivateCluster { nodes };
        std::thread::scope(|s| {
            let started: Vec<_> = cluster.nodes.iter().map(|n| s.spawn(|| n.launch())).collect();
            started
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a node's start panicked")))
                })
                .collect::<Result<Vec<()>>>()
        })?;
        let seed = cluster.nodes[0].node.clone();
        for n in &cluster.nodes[1..] {
            n.rabbitmqctl(&["stop_app"])?;
            n.rabbitmqctl(&["join_cluster", &seed])?;
            n.rabbitmqctl(&["start_app"])?;
        }
        // start_app returns once the node runs again: one look at the cluster suffices.
        let status = cluster.nodes[0].rabbitmqctl(&["cluster_status", "--formatter", "json"])?;
        let running: Vec<String> = serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| serde_json::from_value(v["running_nodes"].clone()).ok())
            .unwrap_or_default();
        if !cluster.nodes.iter().all(|n| running.contains(&n.node)) {
            bail!("the private cluster did not form: {status}");
        }
        Ok(cluster)
    }

    /// The nodes' addresses, as a RABBIT_HOST value (`127.0.0.1:P1,127.0.0.1:P2,...`).
    pub fn rabbit_host(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}:{}", n.addr.host, n.addr.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Stops node `i` cleanly (SIGTERM, as systemd would) and waits until
    /// its VM has exited; the cluster goes on with the others.
    pub fn stop(&self, i: usize) -> Result<()> {
        self.nodes[i].terminate()
    }

    /// Starts node `i` again; it rejoins the cluster.
    pub fn start_node(&self, i: usize) -> Result<()> {
        self.nodes[i].launch()
    }
}
