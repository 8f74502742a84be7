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
//! writes is no longer the file on disk (see [`crate::journal::Journal::check_on_disk`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use packuilon_common::config::{GlobalConfig, IniFile, Rabbit2PackerConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, LiveCatalog};
use crate::job::{self, Context};
use crate::journal::{JobState, Journal};
use crate::runner::{self, Spawner};
use crate::scheduler::Scheduler;

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration: exit 2.
    #[error("{0}")]
    Config(String),
    /// Anything else: exit 1.
    #[error("{0}")]
    Runtime(String),
}

impl DaemonError {
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Config(_) => packuilon_common::EXIT_CONFIG,
            DaemonError::Runtime(_) => packuilon_common::EXIT_FAILED,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_file: PathBuf,
    pub global: GlobalConfig,
    pub r2p: Rabbit2PackerConfig,
}

/// Reads config.ini (`[global]`, `[rabbit2packer]`); warnings are logged.
pub fn load_settings(config_file: &Path) -> Result<Settings, DaemonError> {
    let ini = IniFile::load(config_file).map_err(|e| DaemonError::Config(e.to_string()))?;
    let mut warnings = Vec::new();
    let global = ini
        .global(&mut warnings)
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    let r2p = ini
        .rabbit2packer(&mut warnings)
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(Settings {
        config_file: config_file.to_path_buf(),
        global,
        r2p,
    })
}

/// Everything start-up checks beyond the keys themselves: directories
/// (created when missing), the packer binary, the RC file, the catalog.
pub fn validate(s: &Settings) -> Result<Catalog, DaemonError> {
    let file = s.config_file.display();
    let err = |key: &str, problem: String| DaemonError::Config(format!("{file}: [rabbit2packer] {key}: {problem}"));
    for (key, dir) in [
        ("STATE_DIR", &s.r2p.state_dir),
        ("LOG_DIR", &s.r2p.log_dir),
        ("BUILD_FILE_DIR", &s.r2p.build_file_dir),
    ] {
        std::fs::create_dir_all(dir).map_err(|e| err(key, format!("{}: {e}", dir.display())))?;
        let probe = tempfile::tempfile_in(dir);
        probe.map_err(|e| err(key, format!("{} is not writable: {e}", dir.display())))?;
    }
    find_program(&s.r2p.packer_path).ok_or_else(|| {
        err(
            "PACKER_PATH",
            format!(
                "{} is not an executable file (nor found in PATH)",
                s.r2p.packer_path.display()
            ),
        )
    })?;
    packuilon_common::rcfile::source(&s.r2p.packer_auth_file).map_err(|e| err("PACKER_AUTH_FILE", e.to_string()))?;
    Catalog::load(&s.r2p.packer_template_map, &s.r2p.images_config).map_err(|e| DaemonError::Config(e.to_string()))
}

/// Locks STATE_DIR itself (flock on the directory; released by the kernel
/// when the process ends, however it ends). A lock file could be deleted
/// under a running daemon (a clean-up script), letting a second one in on
/// the same journal to kill the first one's builds as "left over"; the
/// directory cannot go while it holds the journal.
fn lock_state_dir(s: &Settings) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    let dir = &s.r2p.state_dir;
    let file = std::fs::File::open(dir).map_err(|e| DaemonError::Runtime(format!("{}: {e}", dir.display())))?;
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = lock_holder(&file).map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"));
        return Err(DaemonError::Config(format!(
            "{}: [rabbit2packer] STATE_DIR: {} is in use by another rabbit2packer ({holder})",
            s.config_file.display(),
            dir.display(),
        )));
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
    std::env::var("RABBIT2PACKER_ROTATION_RETRY_DELAYS")
        .ok()
        .and_then(|v| {
            v.split(',')
                .map(|s| packuilon_common::config::parse_duration(s.trim()))
                .collect::<Option<Vec<_>>>()
        })
        .unwrap_or_else(|| {
            vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120),
            ]
        })
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(config_file: &Path) -> Result<(), DaemonError> {
    let settings = load_settings(config_file)?;
    let catalog = validate(&settings)?;
    tracing::info!("Starting");
    let cfg = settings.r2p.clone();
    // Held until exit: a second daemon on this STATE_DIR would build images twice at once.
    let _lock = lock_state_dir(&settings)?;

    let journal = Arc::new(Journal::open(&cfg.state_dir).map_err(|e| match e {
        // Like an unwritable STATE_DIR: a restart will not fix it.
        crate::journal::JournalError::NotWritable { .. } => DaemonError::Config(format!(
            "{}: [rabbit2packer] STATE_DIR: {e}",
            settings.config_file.display()
        )),
        e => DaemonError::Runtime(e.to_string()),
    })?);
    let recovery = journal.recover().map_err(|e| DaemonError::Runtime(e.to_string()))?;
    for g in &recovery.groups {
        let n = runner::kill_leftover_group(g.pgid, &g.boot_id, cfg.stop_timeout).await;
        if n > 0 {
            tracing::warn!(
                "packer process group {} (build {}) outlived the previous rabbit2packer: {n} process(es) stopped",
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
        tracing::warn!("Job {id} was running when rabbit2packer stopped: it will be built again");
    }
    if !recovery.jobs.is_empty() {
        tracing::info!("{} job(s) from the journal will run", recovery.jobs.len());
    }

    let scheduler = Arc::new(Scheduler::new(journal.clone()));
    scheduler.restore(recovery.jobs);

    let stop_builds = CancellationToken::new();
    let ctx = Arc::new(Context {
        config: cfg.clone(),
        journal: journal.clone(),
        catalog: Arc::new(LiveCatalog::new(catalog)),
        spawner: Spawner::start()
            .map_err(|e| DaemonError::Runtime(format!("cannot start the packer-spawner thread: {e}")))?,
        stop: stop_builds.clone(),
        boot_id: runner::boot_id(),
        rotation_backoff: rotation_backoff(),
        auth_env: Default::default(),
    });

    let stop_workers = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    let mut names = std::collections::HashMap::new();
    let start_worker = |workers: &mut tokio::task::JoinSet<()>,
                        names: &mut std::collections::HashMap<tokio::task::Id, String>,
                        thread: String| {
        tracing::info!("Starting {thread}");
        let handle = workers.spawn(worker(
            thread.clone(),
            ctx.clone(),
            scheduler.clone(),
            stop_workers.clone(),
        ));
        names.insert(handle.id(), thread);
    };
    for n in 1..=cfg.thread_count {
        start_worker(&mut workers, &mut names, format!("Thread-{n}"));
    }

    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| DaemonError::Runtime(e.to_string()))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| DaemonError::Runtime(e.to_string()))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Runtime(e.to_string()))?;

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
    let mut consumer = {
        let global = settings.global.clone();
        let state_dir = cfg.state_dir.clone();
        let scheduler = scheduler.clone();
        let stop = stop_consuming.clone();
        tokio::spawn(async move { crate::consumer::run(&global, &state_dir, scheduler, stop).await })
    };
    let mut consumer_ended = false;

    let (signal_name, fatal) = loop {
        tokio::select! {
            _ = sigterm.recv() => break ("SIGTERM", None),
            _ = sigint.recv() => break ("SIGINT", None),
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: checking the template map, source images and templates");
                ctx.catalog.reload();
            }
            // The consumer ends on its own only when it must not go on (the
            // journal file was deleted or replaced): stop, and exit non-zero
            // so that systemd starts a daemon on the journal on disk.
            ended = &mut consumer, if !consumer_ended => {
                consumer_ended = true;
                let why = match ended {
                    Ok(Ok(())) => "the consumer ended".to_string(),
                    Ok(Err(e)) => e,
                    Err(e) => format!("the consumer failed: {e}"),
                };
                tracing::error!("{why}; stopping");
                break ("", Some(why));
            }
            // Jobs run in tasks of their own, so this should never happen; if it
            // does, the worker is not lost silently.
            Some(ended) = workers.join_next_with_id() => {
                let (id, why) = match ended {
                    Ok((id, ())) => (id, "ended".to_string()),
                    Err(e) => (e.id(), format!("failed: {e}")),
                };
                let thread = names.remove(&id).unwrap_or_else(|| "a worker".into());
                tracing::error!("{thread} {why}; starting it again");
                start_worker(&mut workers, &mut names, thread);
            }
        }
    };
    let why = match fatal {
        Some(_) => "Cannot go on".to_string(),
        None => format!("{signal_name} received"),
    };
    tracing::info!(
        "{why}: stopping (packer builds are interrupted; waiting up to {:?})",
        cfg.stop_timeout
    );
    notify(&[sd_notify::NotifyState::Stopping]);
    stop_consuming.cancel();
    stop_workers.cancel();
    stop_builds.cancel();
    if !consumer_ended {
        let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
    }
    // Each runner waits STOP_TIMEOUT for packer and then kills its group.
    let all_done = async { while workers.join_next().await.is_some() {} };
    if tokio::time::timeout(cfg.stop_timeout + Duration::from_secs(10), all_done)
        .await
        .is_err()
    {
        tracing::error!("builds still running after STOP_TIMEOUT; marking them interrupted");
    }
    match journal.interrupt_running() {
        Ok(0) => {}
        Ok(n) => tracing::warn!("{n} job(s) marked interrupted"),
        Err(e) => tracing::error!("{e}"),
    }
    if let Some(why) = fatal {
        return Err(DaemonError::Runtime(why));
    }
    tracing::info!("Exiting normally");
    Ok(())
}

/// One worker (`Thread-N`): takes ready jobs until the daemon stops. A job
/// runs in a task of its own, so a panic fails that job alone.
async fn worker(thread: String, ctx: Arc<Context>, scheduler: Arc<Scheduler>, stop: CancellationToken) {
    loop {
        let job = tokio::select! {
            // A stopping daemon takes no new job, even one that is ready.
            biased;
            _ = stop.cancelled() => return,
            j = scheduler.next() => j,
        };
        tracing::info!("{thread} processing {}", job.image_key);
        if let Err(e) = ctx.journal.set_running(job.id, &thread) {
            tracing::error!("{thread}: {e}");
        }
        let handle = {
            let (ctx, thread, job) = (ctx.clone(), thread.clone(), job.clone());
            tokio::spawn(async move { job::execute(&ctx, &thread, &job).await })
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
        let error = finished.error.as_ref().map(ToString::to_string);
        if let Err(e) = ctx.journal.finish(job.id, finished.state, error.as_deref()) {
            tracing::error!("{thread}: {e}");
        }
        match finished.state {
            JobState::Succeeded => tracing::info!("{thread}: job {} for {} succeeded", job.id, job.image_key),
            JobState::Interrupted => tracing::warn!(
                "{thread}: job {} for {} interrupted; it runs again at the next start",
                job.id,
                job.image_key
            ),
            _ => tracing::error!(
                "{thread}: job {} for {} failed: {}",
                job.id,
                job.image_key,
                error.as_deref().unwrap_or("")
            ),
        }
        scheduler.done(&job.image_key);
    }
}
