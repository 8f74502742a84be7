//! RabbitMQ for tests: the shared node on 127.0.0.1:5672 (started by
//! `make test`; override with `PACKUILON_TEST_AMQP_PORT`), and private nodes
//! that a test may stop, kill and restart without disturbing the others.

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
                tokio::time::timeout(Duration::from_secs(5), broker.delete_queue(&name))
                    .await
                    .ok()
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
}

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

impl PrivateBroker {
    /// Starts a node on a free port and waits until it accepts AMQP.
    pub fn start() -> Result<PrivateBroker> {
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
        };
        b.launch()?;
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
        let deadline = Instant::now() + Duration::from_secs(90);
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
        self.ctl(&["shutdown"])?;
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

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.ctl(&["shutdown"]);
        if let Ok(pid) = self.pid() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // epmd may keep the name registered; it forgets it when the VM is gone.
    }
}
