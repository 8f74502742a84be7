//! Keystone + Glance for tests: the deployment `make test` started (its RC
//! file in `PACKUILON_TEST_OPENRC`), or one started here with
//! `scripts/openstack-up.sh` into a temp dir on free ports. A test that needs
//! to stop and restart Glance asks for a [`OpenStack::private`] deployment of
//! its own, so it never disturbs the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Environment variable naming the RC file of the test run's deployment.
pub const OPENRC_ENV: &str = "PACKUILON_TEST_OPENRC";

/// A running Keystone + Glance and the admin RC file for it.
#[derive(Debug)]
pub struct OpenStack {
    /// `admin-openrc.sh` (OS_AUTH_URL, admin user, project, domains, region).
    pub openrc: PathBuf,
    /// The state dir, when this process started the deployment (and stops it on drop).
    state: Option<tempfile::TempDir>,
}

fn repo_root() -> PathBuf {
    // crates/packuilon-testsupport -> the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl OpenStack {
    /// The deployment for this test run: `PACKUILON_TEST_OPENRC`'s when set,
    /// otherwise one started now by the first test that asks and shared by
    /// every test of this process; it is stopped when the process exits.
    pub fn shared() -> Result<Arc<OpenStack>> {
        static SHARED: Mutex<Option<Arc<OpenStack>>> = Mutex::new(None);
        if let Some(rc) = std::env::var_os(OPENRC_ENV).filter(|v| !v.is_empty()) {
            let openrc = PathBuf::from(rc);
            if !openrc.exists() {
                bail!("{OPENRC_ENV}={}: no such file", openrc.display());
            }
            return Ok(Arc::new(OpenStack { openrc, state: None }));
        }
        let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(os) = guard.as_ref() {
            return Ok(os.clone());
        }
        let os = Arc::new(OpenStack::private()?);
        // Statics are never dropped: stop it (and remove its state) at exit.
        *STOP_AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()) = os.state_dir().map(Path::to_path_buf);
        unsafe { libc::atexit(stop_shared_at_exit) };
        *guard = Some(os.clone());
        Ok(os)
    }

    /// A deployment of this test's own (about 12 s to start), stopped on drop.
    pub fn private() -> Result<OpenStack> {
        let state = tempfile::Builder::new()
            .prefix("packuilon-openstack-")
            .tempdir()
            .context("temp dir for the OpenStack state")?;
        let (kp, gp) = loop {
            let (a, b) = (crate::free_port(), crate::free_port());
            if a != b {
                break (a, b);
            }
        };
        let os = OpenStack {
            openrc: state.path().join("admin-openrc.sh"),
            state: Some(state),
        };
        let out = Command::new(repo_root().join("scripts/openstack-up.sh"))
            .arg(os.state_dir().unwrap())
            .arg(kp.to_string())
            .arg(gp.to_string())
            .output()
            .context("running scripts/openstack-up.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/openstack-up.sh failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(os)
    }

    /// The state dir of a deployment this process started.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state.as_ref().map(|s| s.path())
    }

    /// The RC file's exports (sourced with bash).
    pub fn env(&self) -> Result<BTreeMap<String, String>> {
        let out = Command::new("bash")
            .args([
                "--noprofile",
                "--norc",
                "-c",
                r#". "$1" >/dev/null && env -0"#,
                "openrc",
            ])
            .arg(&self.openrc)
            .env_clear()
            .output()
            .context("sourcing the OpenStack RC file")?;
        if !out.status.success() {
            bail!(
                "sourcing {} failed: {}",
                self.openrc.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split('\0')
            .filter_map(|r| r.split_once('='))
            .filter(|(k, _)| k.starts_with("OS_"))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    fn private_dir(&self, what: &str) -> Result<&Path> {
        self.state_dir()
            .with_context(|| format!("{what}: only a private deployment (OpenStack::private) may be stopped"))
    }

    /// Stops glance-api (TERM to its process group, KILL after 10 s); Keystone keeps running.
    pub fn stop_glance(&self) -> Result<()> {
        let dir = self.private_dir("stop_glance")?;
        let pid_file = dir.join("glance-api.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{}: not a pid", pid_file.display()))?;
        // openstack-up.sh starts glance-api with setsid: the pid is its process group.
        unsafe { libc::kill(-pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while group_alive(pid) {
            if Instant::now() > deadline {
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&pid_file);
        Ok(())
    }

    /// Starts what is not running (glance-api after [`stop_glance`](Self::stop_glance)) and waits until it answers.
    pub fn start_glance(&self) -> Result<()> {
        let dir = self.private_dir("start_glance")?;
        let out = Command::new(repo_root().join("scripts/openstack-up.sh"))
            .arg(dir)
            .output()
            .context("running scripts/openstack-up.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/openstack-up.sh (restart) failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// State dir of the deployment [`OpenStack::shared`] started in this process.
static STOP_AT_EXIT: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn stop_shared_at_exit() {
    let dir = STOP_AT_EXIT.lock().ok().and_then(|mut d| d.take());
    if let Some(dir) = dir {
        let _ = Command::new(repo_root().join("scripts/openstack-down.sh"))
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Some process of group `pgid` is still there.
fn group_alive(pgid: i32) -> bool {
    unsafe { libc::kill(-pgid, 0) == 0 }
}

impl Drop for OpenStack {
    fn drop(&mut self) {
        if let Some(dir) = self.state_dir() {
            let _ = Command::new(repo_root().join("scripts/openstack-down.sh"))
                .arg(dir)
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}
