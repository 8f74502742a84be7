//! PostgreSQL for tests: a private cluster of Debian's `postgresql`
//! (`initdb`, `pg_ctl` from `/usr/lib/postgresql/<version>/bin`) in a temp
//! dir, on a free loopback port, its Unix socket inside the temp dir. Never
//! Debian's own cluster: each test file starts one of its own (about a
//! second), and each test takes a database of its own in it
//! ([`PrivatePostgres::database`]). A test may stop and start the cluster
//! (same port, same data). Stopped and removed on drop.
//!
//! Connections over TCP need a password (scram-sha-256), as a daemon on
//! another host would; the role `packuilon` owns every database made here.
//! `initdb` refuses to run as root: as root the binaries run as the
//! `postgres` system user (created by Debian's package) through `runuser`,
//! and the temp dir is handed to that user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// The role every database here belongs to (a password login, no superuser).
pub const USER: &str = "packuilon";

/// A private PostgreSQL cluster, stopped and removed on drop.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    /// Run the binaries as `postgres` (we are root).
    as_postgres: bool,
    tls: Option<crate::tls::Certs>,
    /// fsync on, as a site's database runs (tests run with it off).
    durable: bool,
}

impl std::fmt::Debug for PrivatePostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivatePostgres")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish()
    }
}

/// `/usr/lib/postgresql/<newest version>/bin`, or an error naming the package.
pub fn bin_dir() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "{} is missing: install Debian's postgresql package (scripts/install-packages.sh postgresql)",
                root.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no initdb under {}/<version>/bin: install Debian's postgresql package",
            root.display()
        ),
    }
}

impl PrivatePostgres {
    /// A new cluster on a free loopback port, started and ready.
    pub fn start() -> Result<PrivatePostgres> {
        PrivatePostgres::init(false, false)
    }

    /// As [`PrivatePostgres::start`], with `fsync` on (the server's
    /// default): each commit reaches the disk, as on a site's database.
    /// For benchmarks; tests run with it off.
    pub fn start_durable() -> Result<PrivatePostgres> {
        PrivatePostgres::init(false, true)
    }

    /// As [`PrivatePostgres::start`], with TLS on (a throw-away CA from
    /// [`crate::tls::make_certs`]; [`PrivatePostgres::ca`] names its certificate).
    pub fn start_tls() -> Result<PrivatePostgres> {
        PrivatePostgres::init(true, false)
    }

    /// The cluster of this test process, started by the first test that
    /// asks; stopped and removed when the process exits. Tests take a
    /// database each in it; a test that stops PostgreSQL starts its own.
    pub fn shared() -> Result<&'static PrivatePostgres> {
        static SHARED: std::sync::Mutex<Option<&'static PrivatePostgres>> = std::sync::Mutex::new(None);
        let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pg) = *guard {
            return Ok(pg);
        }
        let pg: &'static PrivatePostgres = Box::leak(Box::new(PrivatePostgres::start()?));
        *SHARED_AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()) = Some(pg);
        // SAFETY: registers a plain function.
        unsafe { libc::atexit(stop_shared_at_exit) };
        *guard = Some(pg);
        Ok(pg)
    }

    fn init(tls: bool, durable: bool) -> Result<PrivatePostgres> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("packuilon-pg-")
            .tempdir()
            .context("temp dir for PostgreSQL")?;
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let password = uuid::Uuid::new_v4().simple().to_string();
        let mut pg = PrivatePostgres {
            bin,
            dir,
            port: crate::free_port(),
            password,
            as_postgres,
            tls: None,
            durable,
        };
        if tls {
            let certs = crate::tls::make_certs(pg.dir.path());
            // PostgreSQL refuses a key others may read.
            std::fs::set_permissions(&certs.server_key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            pg.tls = Some(certs);
        }
        if as_postgres {
            pg.give_to_postgres(pg.dir.path())?;
        }
        let pwfile = pg.dir.path().join("superuser.pw");
        std::fs::write(&pwfile, uuid::Uuid::new_v4().simple().to_string())?;
        if as_postgres {
            pg.give_to_postgres(&pwfile)?;
        }
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().display().to_string(),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                &format!("--pwfile={}", pwfile.display()),
            ],
        )?;
        pg.start_again()?;
        pg.psql(
            "postgres",
            &format!("CREATE ROLE {USER} LOGIN PASSWORD '{}'", pg.password),
        )?;
        Ok(pg)
    }

    fn give_to_postgres(&self, path: &Path) -> Result<()> {
        let (uid, gid) = postgres_ids()?;
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
            bail!("chown postgres {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The cluster's directory (data, log, socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of [`USER`].
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The CA certificate a client must trust (TLS clusters only).
    pub fn ca(&self) -> Option<&Path> {
        self.tls.as_ref().map(|c| c.ca.as_path())
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // The server must not inherit the test's stdout (cargo waits for it).
        cmd.stdin(Stdio::null()).current_dir(self.dir.path());
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Runs SQL as the superuser over the Unix socket; returns what psql printed.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = self.run(
            "psql",
            &[
                "-h",
                &self.dir.path().display().to_string(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new empty database owned by [`USER`], named after `prefix`; its URL
    /// with the password in it.
    pub fn database(&self, prefix: &str) -> Result<String> {
        let name = crate::unique_name(prefix).replace('-', "_").to_lowercase();
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {USER}"))?;
        Ok(self.url(&name))
    }

    /// `postgresql://packuilon:PASSWORD@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{USER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// [`PrivatePostgres::url`] without the password (give it from a file).
    pub fn url_without_password(&self, database: &str) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the cluster (after [`PrivatePostgres::stop`]): same port, same data.
    pub fn start_again(&self) -> Result<()> {
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={}",
            self.port,
            self.dir.path().display()
        );
        if !self.durable {
            opts.push_str(" -c fsync=off");
        }
        if let Some(c) = &self.tls {
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                c.server_cert.display(),
                c.server_key.display()
            ));
            for f in [&c.server_cert, &c.server_key, &c.ca] {
                if self.as_postgres {
                    self.give_to_postgres(f)?;
                }
            }
        }
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.path().join("log").display().to_string(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        )
        .map(drop)
    }

    /// Stops the cluster: `fast` (clients are disconnected, a checkpoint is
    /// written) or, with `crash`, `immediate` (as a power cut would, for the
    /// server; committed data survives).
    pub fn stop(&self, crash: bool) -> Result<()> {
        let mode = if crash { "immediate" } else { "fast" };
        self.run(
            "pg_ctl",
            &["-D", &self.data().display().to_string(), "-m", mode, "-w", "stop"],
        )
        .map(drop)
    }

    /// The server's log (to show when a test fails).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.stop(true);
        }
    }
}

static SHARED_AT_EXIT: std::sync::Mutex<Option<&'static PrivatePostgres>> = std::sync::Mutex::new(None);

/// Statics are never dropped: the shared cluster is stopped (and its
/// directory removed) here, at the test process's exit.
extern "C" fn stop_shared_at_exit() {
    let pg = SHARED_AT_EXIT.lock().ok().and_then(|mut g| g.take());
    if let Some(pg) = pg {
        let _ = pg.stop(true);
        let _ = std::fs::remove_dir_all(pg.dir());
    }
}

/// The uid and gid of the `postgres` system user.
fn postgres_ids() -> Result<(libc::uid_t, libc::gid_t)> {
    let name = std::ffi::CString::new("postgres").unwrap();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: the buffers outlive the call; `res` points into them.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut res) };
    if rc != 0 || res.is_null() {
        bail!("no `postgres` user: install Debian's postgresql package (it creates the user)");
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}
