//! The daemon's life: validate everything once at start-up (exit 2 with one
//! error naming file and key), recover the journal (kill packer groups a
//! crashed run left, run again what was interrupted, waiting or running),
//! start THREAD_COUNT workers, tell systemd READY=1, then start the consumer.
//! READY=1 does not wait for the broker: with RabbitMQ down the journaled
//! jobs build while the consumer retries (systemd would otherwise kill us at
//! TimeoutStartSec, interrupting them). SIGHUP re-reads the catalog.
//! SIGTERM/SIGINT: stop consuming, SIGINT to every packer group (packer's
//! clean cancel, see [`crate::runner`]), wait up to STOP_TIMEOUT, record
//! unfinished jobs as interrupted (they run at the next start), exit 0.
//! The same stop, with exit 1, when the consumer finds that the journal it
//! writes is no longer the file on disk (see `Journal::check_on_disk`).
//! The status server ([`crate::status`]) is bound at start (a taken address
//! is a configuration error naming STATUS_LISTEN) and serves from READY=1 on.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use packuilon_common::config::{AlertsConfig, ConfigError, GlobalConfig, IniFile, Rabbit2PackerConfig};
use packuilon_common::rcfile::RcFileError;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::alerts::{AlertSettingError, Alerts};
use crate::catalog::{Catalog, LiveCatalog, LoadError};
use crate::consumer::{Fatal, JournalLost};
use crate::control::{Cancels, Control};
use crate::job::{self, Context};
use crate::journal::{JobRef, JobState, Journal, JournalError};
use crate::runner::{self, Spawner};
use crate::scheduler::{Jobs, Scheduler};
use crate::site::Site;

/// Why the daemon could not start or run. Its text is the line logged
/// before the daemon exits; [`DaemonError::exit_code`] is its exit status.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// config.ini: a missing file, section or key, or a bad value (exit 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key whose value the daemon cannot use (exit 2).
    #[error("{}: [rabbit2packer] {key}: {problem}", file.display())]
    Setting {
        /// config.ini.
        file: PathBuf,
        /// The key in `[rabbit2packer]`.
        key: &'static str,
        problem: Box<SettingProblem>,
    },
    /// An alert key of `[global]` the mailer cannot use (exit 2).
    #[error("{}: [global] {}: {}", file.display(), .source.key, .source.problem)]
    Alerts { file: PathBuf, source: AlertSettingError },
    /// STATE_DIR/control.sock could not be created (exit 1).
    #[error("{}: cannot create the control socket: {source}", socket.display())]
    Control { socket: PathBuf, source: std::io::Error },
    /// The template map, the source images or a template (exit 2).
    #[error(transparent)]
    Catalog(#[from] LoadError),
    /// STATE_DIR could not be opened to lock it (exit 1).
    #[error("{}: {source}", dir.display())]
    StateDir { dir: PathBuf, source: std::io::Error },
    /// The journal could not be opened or recovered (exit 1).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The thread that spawns packer could not start (exit 1).
    #[error("cannot start the packer-spawner thread: {0}")]
    Spawner(std::io::Error),
    /// A signal handler could not be installed (exit 1).
    #[error("{0}")]
    Signals(std::io::Error),
    /// The journal file was deleted or replaced under the daemon: the
    /// message being journaled went back to the queue (exit 1).
    #[error("{0}; message returned to the queue; no more messages are acked")]
    JournalLost(JournalError),
    /// QUEUE or `<QUEUE>.rejected` exists with another type than
    /// QUEUE_TYPE (exit 2, as other configuration errors).
    #[error("{}: {source}", file.display())]
    QueueType {
        file: PathBuf,
        source: Box<packuilon_common::rabbit::RabbitError>,
    },
    /// The consumer ended on its own (exit 1).
    #[error("the consumer ended")]
    ConsumerEnded,
    /// The consumer's task panicked (exit 1).
    #[error("the consumer failed: {0}")]
    ConsumerFailed(tokio::task::JoinError),
    /// STATE_DB: the site journal refused this daemon (exit 2 for a
    /// configuration or schema error, else 1).
    #[error("{}: [rabbit2packer] STATE_DB: {source}", file.display())]
    SiteJournal {
        file: PathBuf,
        source: crate::site_journal::SiteJournalError,
    },
}

/// What is wrong with a key's value (see [`DaemonError::Setting`]).
#[derive(Debug, thiserror::Error)]
pub enum SettingProblem {
    /// The directory could not be created.
    #[error("{}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: std::io::Error },
    /// No file can be created in the directory.
    #[error("{} is not writable: {source}", dir.display())]
    NotWritable { dir: PathBuf, source: std::io::Error },
    /// PACKER_PATH names no executable.
    #[error("{} is not an executable file (nor found in PATH)", .0.display())]
    NotExecutable(PathBuf),
    /// PACKER_AUTH_FILE could not be sourced.
    #[error(transparent)]
    RcFile(#[from] RcFileError),
    /// STATUS_LISTEN cannot be bound (taken by another daemon on this host).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// Another daemon holds STATE_DIR's lock.
    #[error("{} is in use by another rabbit2packer ({})", dir.display(), holder.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}")))]
    InUse { dir: PathBuf, holder: Option<u32> },
    /// The journal in STATE_DIR cannot be written: a restart will not fix it.
    #[error(transparent)]
    Journal(JournalError),
}

impl DaemonError {
    /// 2 for a configuration error (systemd does not restart on it), else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Config(_)
            | DaemonError::Setting { .. }
            | DaemonError::Catalog(_)
            | DaemonError::Alerts { .. }
            | DaemonError::QueueType { .. } => packuilon_common::EXIT_CONFIG,
            DaemonError::SiteJournal { source, .. } if source.is_config() => packuilon_common::EXIT_CONFIG,
            _ => packuilon_common::EXIT_FAILED,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// config.ini, named in every configuration error.
    pub config_file: PathBuf,
    /// `[global]`: the queue and the broker.
    pub global: GlobalConfig,
    /// `[rabbit2packer]`.
    pub r2p: Rabbit2PackerConfig,
    /// Where alerts go (`[global]` ADMIN_MAIL ..., STATUS_URL).
    pub alerts: AlertsConfig,
}

impl Settings {
    fn setting_error(&self, key: &'static str, problem: SettingProblem) -> DaemonError {
        DaemonError::Setting {
            file: self.config_file.clone(),
            key,
            problem: Box::new(problem),
        }
    }
}

/// Reads config.ini (`[global]`, `[rabbit2packer]`); warnings are logged.
pub fn load_settings(config_file: &Path) -> Result<Settings, DaemonError> {
    let ini = IniFile::load(config_file)?;
    let mut warnings = Vec::new();
    let global = ini.global(&mut warnings)?;
    let r2p = ini.rabbit2packer(&mut warnings)?;
    let alerts = ini.alerts()?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(Settings {
        config_file: config_file.to_path_buf(),
        global,
        r2p,
        alerts,
    })
}

/// Everything start-up checks beyond the keys themselves: directories
/// (created when missing), the packer binary, the RC file, the catalog.
pub(crate) fn validate(s: &Settings) -> Result<Catalog, DaemonError> {
    let err = |key: &'static str, problem: SettingProblem| s.setting_error(key, problem);
    for (key, dir) in [
        ("STATE_DIR", &s.r2p.state_dir),
        ("LOG_DIR", &s.r2p.log_dir),
        ("BUILD_FILE_DIR", &s.r2p.build_file_dir),
    ] {
        let dir_error = |source| SettingProblem::CreateDir {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(key, dir_error(e)))?;
        let not_writable = |source| SettingProblem::NotWritable {
            dir: dir.clone(),
            source,
        };
        tempfile::tempfile_in(dir).map_err(|e| err(key, not_writable(e)))?;
    }
    find_program(&s.r2p.packer_path)
        .ok_or_else(|| err("PACKER_PATH", SettingProblem::NotExecutable(s.r2p.packer_path.clone())))?;
    packuilon_common::rcfile::source(&s.r2p.packer_auth_file).map_err(|e| err("PACKER_AUTH_FILE", e.into()))?;
    if let Some(site) = &s.r2p.site {
        crate::site_journal::SiteJournal::check_url(&site.url, site.password_file.as_deref()).map_err(|source| {
            DaemonError::SiteJournal {
                file: s.config_file.clone(),
                source,
            }
        })?;
    }
    Ok(Catalog::load(&s.r2p.packer_template_map, &s.r2p.images_config)?)
}

/// Locks STATE_DIR itself (flock on the directory; released by the kernel
/// when the process ends, however it ends). A lock file could be deleted
/// under a running daemon (a clean-up script), letting a second one in on
/// the same journal to kill the first one's builds as "left over"; the
/// directory cannot go while it holds the journal.
fn lock_state_dir(s: &Settings) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    let dir = &s.r2p.state_dir;
    let file = std::fs::File::open(dir).map_err(|source| DaemonError::StateDir {
        dir: dir.clone(),
        source,
    })?;
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = lock_holder(&file);
        return Err(s.setting_error(
            "STATE_DIR",
            SettingProblem::InUse {
                dir: dir.clone(),
                holder,
            },
        ));
    }
    Ok(file)
}

/// The process holding a flock on `file`, from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF`).
fn lock_holder(file: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
    let want = format!("{major:02x}:{minor:02x}:{}", m.ino());
    std::fs::read_to_string("/proc/locks").ok()?.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed with "->"; only the holder counts.
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want).then(|| f[4].parse().ok())?
    })
}

fn find_program(p: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |c: &Path| {
        std::fs::metadata(c)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if p.components().count() > 1 {
        return executable(p).then(|| p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|c| executable(c))
}

/// Pauses between rotation attempts: 5 s, 30 s, 2 min (four attempts).
/// `RABBIT2PACKER_ROTATION_RETRY_DELAYS` (seconds, comma-separated) overrides
/// them, so tests need not wait minutes.
fn rotation_backoff() -> Vec<Duration> {
    retry_delays("RABBIT2PACKER_ROTATION_RETRY_DELAYS", &[5, 30, 120])
}

/// Pauses between retries: `default` (seconds), or the comma-separated
/// durations in the environment variable `var` (for tests).
pub(crate) fn retry_delays(var: &str, default: &[u64]) -> Vec<Duration> {
    std::env::var(var)
        .ok()
        .and_then(|v| {
            v.split(',')
                .map(|s| packuilon_common::config::parse_duration(s.trim()))
                .collect::<Option<Vec<_>>>()
        })
        .unwrap_or_else(|| default.iter().map(|s| Duration::from_secs(*s)).collect())
}

/// systemd's STATUS= line.
pub(crate) fn notify_status(line: &str) {
    notify(&[sd_notify::NotifyState::Status(line)]);
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Half of systemd's watchdog interval (WATCHDOG_USEC, for this process
/// when WATCHDOG_PID says so or is unset, as sd_watchdog_enabled(3)).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|u| *u > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// Runs the daemon until SIGTERM/SIGINT: start-up checks, `recover`,
/// `Running::start` (workers, then the consumer), `Running::shut_down`.
pub async fn run(config_file: &Path) -> Result<(), DaemonError> {
    let settings = load_settings(config_file)?;
    let catalog = validate(&settings)?;
    tracing::info!("Starting");
    // Held until exit: a second daemon on this STATE_DIR would build images twice at once.
    let _lock = lock_state_dir(&settings)?;
    let listener = match settings.r2p.status.listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|source| settings.setting_error("STATUS_LISTEN", SettingProblem::Listen { addr, source }))?,
        ),
        None => None,
    };
    let journal = Arc::new(open_journal(&settings)?);
    let recovered = recover(&journal, &settings.r2p).await?;
    let jobs = match &settings.r2p.site {
        None => {
            let scheduler = Arc::new(Scheduler::new(journal.clone()));
            scheduler.restore(recovered);
            Jobs::Local(scheduler)
        }
        Some(site) => {
            // The site journal runs them again (`release` below), here or elsewhere.
            for job in recovered {
                if let Err(e) = journal.cancel_waiting(job.id, "given back to the site journal") {
                    tracing::warn!("{e}");
                }
            }
            let site = Site::connect(site).await.map_err(|source| DaemonError::SiteJournal {
                file: settings.config_file.clone(),
                source,
            })?;
            // Where this daemon's page is: a running job's live log is there.
            let url = listener
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map(|a| crate::status::public_url(&settings.r2p.status, a));
            site.join(url).await;
            Jobs::Site(Arc::new(site))
        }
    };
    let metrics = Arc::new(crate::metrics::Metrics::new());
    load_last_successes(&journal, &jobs, &metrics).await;
    let mut running = Running::start(&settings, journal, catalog, jobs, metrics, listener)?;
    let why = running.until_stopped().await;
    running.shut_down(why).await
}

/// The journal in STATE_DIR; on the site journal (STATE_DB), this
/// daemon's own in STATE_DIR/site (see [`crate::site`]).
fn open_journal(settings: &Settings) -> Result<Journal, DaemonError> {
    let dir = journal_dir(&settings.r2p);
    if let Err(source) = std::fs::create_dir_all(&dir) {
        return Err(settings.setting_error("STATE_DIR", SettingProblem::CreateDir { dir, source }));
    }
    Journal::open(&dir).map_err(|e| match e {
        // Like an unwritable STATE_DIR: a restart will not fix it.
        JournalError::NotWritable { .. } => settings.setting_error("STATE_DIR", SettingProblem::Journal(e)),
        e => DaemonError::Journal(e),
    })
}

/// Where this daemon's SQLite journal is.
pub(crate) fn journal_dir(cfg: &Rabbit2PackerConfig) -> PathBuf {
    match cfg.site {
        None => cfg.state_dir.clone(),
        Some(_) => cfg.state_dir.join(crate::site::WORK_DIR),
    }
}

/// `packuilon_last_success_timestamp_seconds` survives a restart: each
/// image's newest success, from the journal.
/// On the site journal, the site's (whichever daemon built them).
async fn load_last_successes(journal: &Journal, jobs: &Jobs, metrics: &crate::metrics::Metrics) {
    let images = match jobs {
        Jobs::Site(site) => site.journal.images().await.map_err(|e| e.to_string()),
        Jobs::Local(_) => journal.images().map_err(|e| e.to_string()),
    };
    match images {
        Ok(images) => {
            for im in images {
                if let Some(t) = im.last_success_at.as_deref().and_then(crate::metrics::unix_time) {
                    metrics.image_succeeded(&im.image_key, t);
                }
            }
        }
        Err(e) => tracing::warn!("metrics: cannot read the last successes from the journal: {e}"),
    }
}

/// What a crashed or stopped run left: packer groups still alive are
/// stopped, unfinished build logs say why they end there, and the jobs to
/// run again (interrupted, waiting or running) are returned.
async fn recover(journal: &Journal, cfg: &Rabbit2PackerConfig) -> Result<Vec<JobRef>, DaemonError> {
    let recovery = journal.recover()?;
    for g in &recovery.groups {
        let n = runner::kill_leftover_group(g.pgid, &g.boot_id, cfg.stop_timeout).await;
        if n > 0 {
            tracing::warn!(
                "packer (or TEST_COMMAND) process group {} (build {}) outlived the previous rabbit2packer: {n} process(es) stopped",
                g.pgid,
                g.build_id
            );
        }
    }
    for log in &recovery.unfinished_logs {
        // No trailer: the monitoring sees an unfinished build; say why in the log itself.
        let note = "rabbit2packer: rabbit2packer stopped during this build (it did not exit cleanly); the job is built again\n";
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, note.as_bytes()));
        if let Err(e) = appended {
            tracing::warn!("cannot append to build log {}: {e}", log.display());
        }
    }
    for id in &recovery.rebuilt {
        match cfg.site {
            None => tracing::warn!("Job {id} was running when rabbit2packer stopped: it will be built again"),
            Some(_) => tracing::warn!(
                "Job {id} was running when rabbit2packer stopped: the site journal runs it again, \
                 here or on another daemon, unless another daemon has taken it over"
            ),
        }
    }
    if !recovery.jobs.is_empty() && cfg.site.is_none() {
        tracing::info!("{} job(s) from the journal will run", recovery.jobs.len());
    }
    Ok(recovery.jobs)
}

/// Why the daemon stops: a signal, or an error it cannot go on with.
enum Stop {
    Signal(&'static str),
    Fatal(DaemonError),
}

/// The running daemon: its workers, its consumer and what stops them.
struct Running {
    /// config.ini, named in a QUEUE_TYPE error.
    config_file: PathBuf,
    cfg: Rabbit2PackerConfig,
    ctx: Arc<Context>,
    workers: Workers,
    consumer: Option<tokio::task::JoinHandle<Result<(), Fatal>>>,
    stop_consuming: CancellationToken,
    signals: Signals,
    jobs: Jobs,
    /// The site journal's lease keeper and listener (STATE_DB), stopped last.
    stop_site: CancellationToken,
    /// What systemd was last told (running, waiting).
    told: (usize, usize),
    /// Half of systemd's WatchdogSec, when it watches us.
    watchdog: Option<Duration>,
    /// The status server, and what stops it.
    server: Option<tokio::task::JoinHandle<()>>,
    stop_server: CancellationToken,
    /// REBUILD_OUTDATED: IMAGES_CONFIG as last seen, checked every few seconds.
    outdated: Option<OutdatedWatch>,
}

/// How often REBUILD_OUTDATED looks at IMAGES_CONFIG (one stat when unchanged).
const OUTDATED_CHECK: Duration = Duration::from_secs(5);

/// REBUILD_OUTDATED: queues rebuilds of outdated images at start and
/// whenever IMAGES_CONFIG's source images change.
struct OutdatedWatch {
    control: Control,
    catalog: Arc<LiveCatalog>,
    /// The source images the last check saw (`None`: none yet).
    seen: Option<BTreeMap<String, String>>,
}

impl OutdatedWatch {
    async fn check(&mut self) {
        let catalog = self.catalog.refresh();
        let now = catalog.source_images().clone();
        if self.seen.as_ref() == Some(&now) {
            return;
        }
        let first = self.seen.is_none();
        self.seen = Some(now);
        let by = if first {
            "REBUILD_OUTDATED (at start)"
        } else {
            "REBUILD_OUTDATED (IMAGES_CONFIG changed)"
        };
        match crate::control::rebuild_outdated(&self.control, by).await {
            Ok(reply) if reply.job.is_some() => tracing::info!("{by}: {}", reply.message),
            Ok(_) => {}
            Err(e) => tracing::error!("{by}: {e}"),
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// THREAD_COUNT workers (`Thread-N`), each restarted should its task end.
struct Workers {
    set: tokio::task::JoinSet<()>,
    names: HashMap<tokio::task::Id, String>,
    ctx: Arc<Context>,
    jobs: Jobs,
    /// Fires when the daemon stops: workers take no new job.
    stop: CancellationToken,
}

impl Workers {
    fn start(&mut self, thread: String) {
        tracing::info!("Starting {thread}");
        let handle = self.set.spawn(worker(
            thread.clone(),
            self.ctx.clone(),
            self.jobs.clone(),
            self.stop.clone(),
        ));
        self.names.insert(handle.id(), thread);
    }
}

impl Running {
    /// Starts the workers on the recovered jobs, tells systemd READY=1, then
    /// starts the consumer.
    fn start(
        settings: &Settings,
        journal: Arc<Journal>,
        catalog: Catalog,
        jobs: Jobs,
        metrics: Arc<crate::metrics::Metrics>,
        listener: Option<std::net::TcpListener>,
    ) -> Result<Running, DaemonError> {
        let cfg = settings.r2p.clone();
        let site = match &jobs {
            Jobs::Site(site) => Some(site.clone()),
            Jobs::Local(_) => None,
        };
        let alerts = Alerts::start(&settings.alerts, journal.clone(), site).map_err(|source| DaemonError::Alerts {
            file: settings.config_file.clone(),
            source,
        })?;
        let cancels = Arc::new(Cancels::default());
        let socket = cfg.state_dir.join(crate::control::SOCKET_NAME);
        let control_socket =
            crate::control::bind(&cfg.state_dir).map_err(|source| DaemonError::Control { socket, source })?;
        let control = Control {
            journal: journal.clone(),
            jobs: jobs.clone(),
            cancels: cancels.clone(),
            images_file: cfg.images_config.clone(),
        };
        let ctx = Arc::new(Context {
            config: cfg.clone(),
            cancels,
            alerts,
            journal,
            catalog: Arc::new(LiveCatalog::new(catalog)),
            spawner: Spawner::start().map_err(DaemonError::Spawner)?,
            stop: CancellationToken::new(),
            boot_id: runner::boot_id(),
            rotation_backoff: rotation_backoff(),
            auth_env: Default::default(),
            metrics: metrics.clone(),
            site: match &jobs {
                Jobs::Site(site) => Some(site.clone()),
                Jobs::Local(_) => None,
            },
        });
        let mut workers = Workers {
            set: tokio::task::JoinSet::new(),
            names: HashMap::new(),
            ctx: ctx.clone(),
            jobs: jobs.clone(),
            stop: CancellationToken::new(),
        };
        let stop_site = CancellationToken::new();
        if let Jobs::Site(site) = &jobs {
            tokio::spawn(site.clone().keep_leases(ctx.cancels.clone(), stop_site.clone()));
            tokio::spawn(site.clone().listen(stop_site.clone()));
        }
        for n in 1..=cfg.thread_count {
            workers.start(format!("Thread-{n}"));
        }
        let install = |kind| signal(kind).map_err(DaemonError::Signals);
        let signals = Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        };

        let stop_server = CancellationToken::new();
        let server = match listener {
            Some(l) => Some(start_server(
                settings,
                &ctx.journal,
                &jobs,
                &metrics,
                l,
                stop_server.clone(),
            )?),
            None => None,
        };

        // Journal open, recovery done, workers started: we are doing our job
        // whether or not the broker answers.
        notify(&[sd_notify::NotifyState::Ready]);
        tracing::info!(
            "Ready: {} worker(s); taking requests from queue {} at {}",
            cfg.thread_count,
            settings.global.queue,
            packuilon_common::rabbit::endpoint(&settings.global.rabbit)
        );
        let stop_consuming = CancellationToken::new();
        let outdated = cfg.rebuild_outdated.then(|| OutdatedWatch {
            control: control.clone(),
            catalog: ctx.catalog.clone(),
            seen: None,
        });
        tokio::spawn(crate::control::serve(control_socket, control, stop_consuming.clone()));
        let consumer = {
            let global = settings.global.clone();
            let state_dir = cfg.state_dir.clone();
            let stop = stop_consuming.clone();
            let jobs = jobs.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move { crate::consumer::run(&global, &state_dir, jobs, stop, metrics).await })
        };
        let watchdog = watchdog_interval();
        if let Some(every) = watchdog {
            tracing::info!("systemd watchdog: pinging every {every:?}");
        }
        Ok(Running {
            config_file: settings.config_file.clone(),
            cfg,
            ctx,
            workers,
            consumer: Some(consumer),
            stop_consuming,
            signals,
            jobs,
            stop_site,
            told: (0, 0),
            watchdog,
            server,
            stop_server,
            outdated,
        })
    }

    /// Serves SIGHUP and restarts lost workers until a stop signal, or
    /// until the consumer ends.
    async fn until_stopped(&mut self) -> Stop {
        let mut watchdog = self.watchdog.map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut outdated_check = tokio::time::interval(OUTDATED_CHECK);
        outdated_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = outdated_check.tick(), if self.outdated.is_some() => {
                    if let Some(w) = self.outdated.as_mut() {
                        w.check().await;
                    }
                }
                _ = self.jobs.changed().notified() => {
                    let now = self.jobs.counts();
                    if now != self.told {
                        self.told = now;
                        let line = format!("{} building, {} waiting", now.0, now.1);
                        notify(&[sd_notify::NotifyState::Status(&line)]);
                    }
                }
                // Pinged from this loop, which also restarts lost workers:
                // a loop that hangs, or workers that cannot be kept alive,
                // stop the pings and systemd restarts the daemon.
                _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                    if self.workers.set.len() == self.cfg.thread_count {
                        notify(&[sd_notify::NotifyState::Watchdog]);
                    } else {
                        tracing::warn!(
                            "watchdog: {} of {} workers alive; not pinging systemd",
                            self.workers.set.len(),
                            self.cfg.thread_count
                        );
                    }
                }
                _ = self.signals.term.recv() => return Stop::Signal("SIGTERM"),
                _ = self.signals.int.recv() => return Stop::Signal("SIGINT"),
                _ = self.signals.hup.recv() => {
                    tracing::info!("SIGHUP: checking the template map, source images and templates");
                    self.ctx.catalog.reload();
                }
                // The consumer ends on its own only when it must not go on (the
                // journal file was deleted or replaced): stop, and exit non-zero
                // so that systemd starts a daemon on the journal on disk.
                ended = async { self.consumer.as_mut().expect("guarded").await }, if self.consumer.is_some() => {
                    self.consumer = None;
                    let why = match ended {
                        Ok(Ok(())) => DaemonError::ConsumerEnded,
                        Ok(Err(Fatal::Journal(JournalLost(e)))) => DaemonError::JournalLost(e),
                        Ok(Err(Fatal::QueueType(source))) => DaemonError::QueueType {
                            file: self.config_file.clone(),
                            source: Box::new(source),
                        },
                        Err(e) => DaemonError::ConsumerFailed(e),
                    };
                    tracing::error!("{why}; stopping");
                    return Stop::Fatal(why);
                }
                // Jobs run in tasks of their own, so this should never happen; if it
                // does, the worker is not lost silently.
                Some(ended) = self.workers.set.join_next_with_id() => {
                    let (id, why) = match ended {
                        Ok((id, ())) => (id, "ended".to_string()),
                        Err(e) => (e.id(), format!("failed: {e}")),
                    };
                    let thread = self.workers.names.remove(&id).unwrap_or_else(|| "a worker".into());
                    tracing::error!("{thread} {why}; starting it again");
                    self.workers.start(thread);
                }
            }
        }
    }

    /// Stops consuming, interrupts the builds (SIGINT to every packer
    /// group), waits up to STOP_TIMEOUT, records unfinished jobs as
    /// interrupted. A fatal stop is returned as the daemon's error.
    async fn shut_down(mut self, stop: Stop) -> Result<(), DaemonError> {
        let why = match &stop {
            Stop::Fatal(_) => "Cannot go on".to_string(),
            Stop::Signal(name) => format!("{name} received"),
        };
        tracing::info!(
            "{why}: stopping (packer builds are interrupted; waiting up to {:?})",
            self.cfg.stop_timeout
        );
        notify(&[sd_notify::NotifyState::Stopping]);
        self.stop_consuming.cancel();
        self.workers.stop.cancel();
        self.ctx.stop.cancel();
        if let Some(consumer) = self.consumer.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
        }
        // Each runner waits STOP_TIMEOUT for packer and then kills its group.
        let all_done = async { while self.workers.set.join_next().await.is_some() {} };
        if tokio::time::timeout(self.cfg.stop_timeout + Duration::from_secs(10), all_done)
            .await
            .is_err()
        {
            tracing::error!("builds still running after STOP_TIMEOUT; marking them interrupted");
        }
        // Last, so the page shows the stop; long polls are not waited for.
        self.stop_server.cancel();
        if let Some(mut server) = self.server.take() {
            if tokio::time::timeout(Duration::from_secs(2), &mut server).await.is_err() {
                server.abort();
            }
        }
        match self.ctx.journal.interrupt_running() {
            Ok(0) => {}
            Ok(n) => tracing::warn!("{n} job(s) marked interrupted"),
            Err(e) => tracing::error!("{e}"),
        }
        // Leases were renewed until the builds ended: now another daemon may run them.
        if let Jobs::Site(site) = &self.jobs {
            site.release(&format!("{} stopped", site.host)).await;
        }
        self.stop_site.cancel();
        if let Stop::Fatal(e) = stop {
            return Err(e);
        }
        tracing::info!("Exiting normally");
        Ok(())
    }
}

/// Starts the status server on its own read-only connection to the journal.
fn start_server(
    settings: &Settings,
    journal: &Journal,
    jobs: &Jobs,
    metrics: &Arc<crate::metrics::Metrics>,
    listener: std::net::TcpListener,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let reader = Arc::new(Journal::open_read_only(&journal_dir(&settings.r2p))?);
    let (site, changes) = match jobs {
        Jobs::Site(site) => (Some(site.clone()), site.subscribe()),
        Jobs::Local(_) => (None, journal.subscribe()),
    };
    let router = crate::status::router(
        reader,
        site,
        changes,
        metrics.clone(),
        &settings.r2p.log_dir,
        &settings.r2p.images_config,
    );
    let addr = listener.local_addr().map_err(|source| {
        let addr = settings.r2p.status.listen.unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
        settings.setting_error("STATUS_LISTEN", SettingProblem::Listen { addr, source })
    })?;
    let url = crate::status::public_url(&settings.r2p.status, addr);
    tracing::info!("Status page on {addr}, reached as {url}");
    Ok(tokio::spawn(async move {
        if let Err(e) = crate::status::serve(listener, router, stop).await {
            tracing::error!("status server on {addr}: {e}");
        }
    }))
}

/// One worker (`Thread-N`): takes ready jobs until the daemon stops. A job
/// runs in a task of its own, so a panic fails that job alone.
async fn worker(thread: String, ctx: Arc<Context>, jobs: Jobs, stop: CancellationToken) {
    loop {
        let job = tokio::select! {
            // A stopping daemon takes no new job, even one that is ready.
            biased;
            _ = stop.cancelled() => return,
            j = jobs.next(&thread, &ctx.journal) => j,
        };
        tracing::info!("{thread} processing {}", job.image_key);
        // Registered before the journal says running: a `cancel` that sees
        // it running finds its token.
        let job_stop = ctx.cancels.start(job.id, &ctx.stop);
        if let Err(e) = ctx.journal.set_running(job.id, &thread) {
            tracing::error!("{thread}: {e}");
        }
        let handle = {
            let (ctx, thread, job) = (ctx.clone(), thread.clone(), job.clone());
            tokio::spawn(async move { job::execute(&ctx, &thread, &job, &job_stop).await })
        };
        let finished = match handle.await {
            Ok(f) => f,
            Err(e) => {
                let error = if e.is_panic() {
                    let p = e.into_panic();
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    job::JobError::Panicked(msg)
                } else {
                    job::JobError::Aborted(e)
                };
                tracing::error!("{thread}: job {} for {} failed: {error}", job.id, job.image_key);
                job::Finished {
                    state: JobState::Failed,
                    error: Some(error),
                }
            }
        };
        let mut error = finished.error.as_ref().map(ToString::to_string);
        let mut state = finished.state;
        if let Some(by) = ctx.cancels.finish(job.id) {
            if state == JobState::Interrupted {
                state = JobState::Cancelled;
                error = Some(by);
            } else {
                // The cancel came once packer had ended (during the
                // rotation): there was nothing left to interrupt.
                tracing::warn!(
                    "{thread}: job {} for {} was {by} after its builds had ended; it finished as {}",
                    job.id,
                    job.image_key,
                    state.as_str()
                );
            }
        }
        if let Err(e) = ctx.journal.finish(job.id, state, error.as_deref()) {
            tracing::error!("{thread}: {e}");
        }
        if state == JobState::Succeeded {
            let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
            ctx.metrics.image_succeeded(&job.image_key, now);
        }
        match state {
            JobState::Succeeded => tracing::info!("{thread}: job {} for {} succeeded", job.id, job.image_key),
            JobState::Interrupted => tracing::warn!(
                "{thread}: job {} for {} interrupted; it runs again at the next start",
                job.id,
                job.image_key
            ),
            JobState::Cancelled => tracing::warn!(
                "{thread}: job {} for {} {}",
                job.id,
                job.image_key,
                error.as_deref().unwrap_or("cancelled")
            ),
            _ => tracing::error!(
                "{thread}: job {} for {} failed: {}",
                job.id,
                job.image_key,
                error.as_deref().unwrap_or("")
            ),
        }
        // Records the image's health (an alert is sent by another task); the
        // image's next job may run.
        jobs.done(&job, state, error.as_deref(), &ctx).await;
    }
}
