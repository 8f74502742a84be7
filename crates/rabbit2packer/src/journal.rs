//! The job journal: every request and every build, in SQLite under STATE_DIR.
//!
//! It is what makes the daemon lossless. A delivery is acked only after its
//! job is committed here (WAL, `synchronous=FULL`: committed means on disk),
//! so RabbitMQ's consumer timeout never meets a multi-hour build and a
//! restart finds every request it ever accepted. Each state change of a job
//! and of each template build is written as it happens (the pueue way), so
//! `status` and `history` — other processes reading the same file — always
//! see the truth, and a restart after `kill -9` knows what was running and
//! which packer process groups may still be alive.
//!
//! Committed must also mean: in the file a restart will open. Before a
//! delivery is acked, `Journal::check_on_disk` makes sure the files SQLite
//! writes are still the ones at their paths (not deleted nor replaced).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

/// The journal's file name inside STATE_DIR.
pub(crate) const FILE_NAME: &str = "rabbit2packer.sqlite";

/// A journal operation that failed; every variant names the journal's file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// SQLite failed.
    #[error("job journal {file}: {source}")]
    Sql { file: String, source: rusqlite::Error },
    /// Anything else: the file cannot be opened, or holds no journal.
    #[error("job journal {file}: {problem}")]
    Other { file: String, problem: String },
    /// The file cannot be written (mode, owner, read-only mount): a
    /// configuration error, which no restart fixes.
    #[error("job journal {file}: {problem}")]
    NotWritable { file: String, problem: String },
    /// The file the daemon writes is no longer the one at its path (deleted
    /// or replaced): what it commits would be lost at the next start.
    #[error("job journal {file}: {problem}")]
    Replaced { file: String, problem: String },
}

impl JournalError {
    /// Writing on is pointless: the daemon must stop (and be restarted).
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self, JournalError::Replaced { .. } | JournalError::NotWritable { .. })
    }
}

/// What the journal's operations return.
pub type Result<T, E = JournalError> = std::result::Result<T, E>;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Journaled, not started (at most one per image).
    Waiting,
    /// A worker builds it.
    Running,
    /// Every template built.
    Succeeded,
    /// A template (or the job itself) failed.
    Failed,
    /// A newer request for the image replaced it before it started.
    Superseded,
    /// The daemon stopped during it; it runs again at the next start.
    Interrupted,
    /// `rabbit2packer cancel` stopped it (waiting, or running: packer was
    /// interrupted and cleaned up); it does not run again.
    Cancelled,
}

impl JobState {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Superseded => "superseded",
            JobState::Interrupted => "interrupted",
            JobState::Cancelled => "cancelled",
        }
    }

    /// A state's name as the journal and the API write it.
    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "waiting" => JobState::Waiting,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "superseded" => JobState::Superseded,
            "interrupted" => JobState::Interrupted,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }
}

/// A request as it arrives, before it has an id.
#[derive(Debug, Clone)]
pub(crate) struct NewJob {
    pub(crate) message_id: Option<String>,
    /// sha256 of the body, hex: the identity of messages without an id.
    pub(crate) body_sha256: String,
    pub(crate) profile: Option<String>,
    pub(crate) image_key: String,
    pub(crate) body: Vec<u8>,
}

/// What the scheduler needs to run a job.
#[derive(Debug, Clone)]
pub(crate) struct JobRef {
    pub(crate) id: i64,
    pub(crate) image_key: String,
    pub(crate) body: std::sync::Arc<Vec<u8>>,
}

/// One template build of a job, as recorded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildRecord {
    /// The template's name (its file name without `.json`).
    pub template: String,
    /// RFC 3339 times.
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Packer's exit code (127: it could not be started).
    pub exit_code: Option<i64>,
    /// The build log.
    pub log_path: Option<String>,
    /// The artifact packer reported (the new image's ID).
    pub artifact_id: Option<String>,
    /// `skipped: ...`, `done: ...` or `failed after N attempt(s): ...`.
    pub rotation: Option<String>,
    /// Why the build failed, naming its log.
    pub error: Option<String>,
    /// The images it made (Glance IDs and live names).
    pub images: Vec<BuiltImage>,
    /// The source image it was built from (IMAGES_CONFIG's entry then).
    pub source_image: Option<String>,
    /// The test gate: `testing`, `passed`, or why the test failed (none without a gate).
    pub test: Option<String>,
    /// TEST_COMMAND's exit code.
    pub test_exit_code: Option<i64>,
    /// The host that ran it (the shared site journal only; the SQLite
    /// journal of one host leaves it out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// An image a build made: its Glance ID and the name it goes live under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BuiltImage {
    pub id: String,
    pub name: String,
}

/// The test state of a build whose image waits for (or is in) its test.
pub(crate) const TESTING: &str = "testing";
/// The test state of a build whose image passed.
pub(crate) const PASSED: &str = "passed";

/// A build of a job whose images were staged and not yet tested (a restart
/// runs the test again, not the build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StagedBuild {
    pub(crate) build_id: i64,
    pub(crate) log_path: PathBuf,
    pub(crate) images: Vec<BuiltImage>,
}

/// One job, as `status` and `history` show it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    /// The job's number in the journal.
    pub id: i64,
    /// `<personality>-<os><version>-<arch>`.
    pub image_key: String,
    /// The message's `profile` header.
    pub profile: Option<String>,
    /// The message's id, when it had one.
    pub message_id: Option<String>,
    pub state: JobState,
    /// `built, rotation failed` when the image was built but its rotation was not done.
    pub outcome: String,
    /// RFC 3339 times.
    pub received_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The newer job that replaced this waiting one.
    pub superseded_by: Option<i64>,
    /// How often the job was started (a restart runs it again).
    pub attempts: i64,
    /// The worker (`Thread-N`) that runs or ran it.
    pub worker: Option<String>,
    /// Why it failed or was interrupted.
    pub error: Option<String>,
    /// Its template builds, in order.
    pub builds: Vec<BuildRecord>,
    /// The host that runs or ran it (the shared site journal only; the
    /// SQLite journal of one host leaves it out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The status page of that host's daemon (its STATUS_URL), where a
    /// running job's live log is (the site journal only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_url: Option<String>,
}

/// Which jobs `Journal::jobs` returns (newest first).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<StateFilter>,
    pub image: Option<String>,
    /// Only jobs older than this id (the next page).
    pub before: Option<i64>,
    pub limit: usize,
}

/// The `state` filter of [`JobFilter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// Jobs in this state.
    Is(JobState),
    /// Jobs no longer running or waiting (what `history` shows).
    Finished,
}

impl StateFilter {
    /// A job state's name, or `finished`.
    pub fn parse(s: &str) -> Option<StateFilter> {
        match s {
            "finished" => Some(StateFilter::Finished),
            s => JobState::parse(s).map(StateFilter::Is),
        }
    }
}

/// What an image is doing, as the status page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Its last job succeeded (or it has none pending).
    Idle,
    /// A job waits for a worker (or for the next start, when interrupted).
    Waiting,
    /// A job is running.
    Building,
    /// Its last finished job failed.
    Failed,
    /// Its last job built the image, but the rotation failed.
    RotationFailed,
}

/// The outcome of a job whose image was built but not rotated.
pub const ROTATION_FAILED: &str = "built, rotation failed";

impl ImageState {
    /// What an image is doing: building when a job runs, else waiting when
    /// one waits, else what its last finished job says.
    pub(crate) fn of(running: bool, waiting: bool, last_finished: Option<&JobRecord>) -> ImageState {
        if running {
            ImageState::Building
        } else if waiting {
            ImageState::Waiting
        } else {
            match last_finished {
                Some(j) if j.state == JobState::Failed => ImageState::Failed,
                Some(j) if j.outcome == ROTATION_FAILED => ImageState::RotationFailed,
                _ => ImageState::Idle,
            }
        }
    }
}

/// One image key, as `/api/images` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub image_key: String,
    pub state: ImageState,
    /// RFC 3339 `finished_at` of its newest succeeded job.
    pub last_success_at: Option<String>,
    pub last_success_job: Option<i64>,
    /// RFC 3339 `finished_at` of its newest failed job.
    pub last_failure_at: Option<String>,
    pub last_failure_job: Option<i64>,
    /// The running job, else the waiting one, else the last finished one.
    pub job: Option<JobRecord>,
    /// Whether it is failing, since which job, and how many failures since
    /// (alerted about once; the page shows the count).
    pub failing: Option<ImageHealth>,
    /// Built from a source image IMAGES_CONFIG no longer names (filled in
    /// by the status server, which reads IMAGES_CONFIG).
    pub outdated: Option<crate::outdated::Outdated>,
}

/// A packer process group recorded as running when the daemon last stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeftoverGroup {
    pub(crate) build_id: i64,
    pub(crate) pgid: i32,
    pub(crate) boot_id: String,
}

/// What a restart finds in the journal.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    /// Jobs to run, oldest first, at most one per image key.
    pub(crate) jobs: Vec<JobRef>,
    /// Jobs that were running when the daemon died (rebuilt).
    pub(crate) rebuilt: Vec<i64>,
    /// Process groups of packer runs that never finished.
    pub(crate) groups: Vec<LeftoverGroup>,
    /// Build logs of template builds that never finished (no trailer).
    pub(crate) unfinished_logs: Vec<PathBuf>,
}

/// Outcome of recording a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inserted {
    New(i64),
    /// Already journaled as this job: ack it, build nothing.
    Duplicate(i64),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    message_id TEXT,
    body_sha256 TEXT NOT NULL,
    profile TEXT,
    image_key TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    superseded_by INTEGER,
    received_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_message_id ON jobs(message_id);
CREATE INDEX IF NOT EXISTS jobs_sha ON jobs(body_sha256);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_image ON jobs(image_key, id);
CREATE TABLE IF NOT EXISTS builds (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    template TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    exit_code INTEGER,
    log_path TEXT,
    build_file TEXT,
    artifact_id TEXT,
    rotation TEXT,
    error TEXT,
    pgid INTEGER,
    boot_id TEXT
);
CREATE INDEX IF NOT EXISTS builds_job ON builds(job_id);
-- Message bodies (jobs.body is empty for jobs journaled since this table).
-- The body is the last column, so that a zeroblob() placeholder is never
-- expanded in memory and the body is written straight from the delivery:
-- a message costs its size once, not again in SQLite.
CREATE TABLE IF NOT EXISTS bodies (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_pgid ON builds(pgid) WHERE pgid IS NOT NULL;
";

/// The journal's schema version (`PRAGMA user_version`). 0: journals from
/// before versioning (the tables of [`SCHEMA`]); 1 adds an index for the
/// status page; 2 the alert state of each image (`image_health`) and the
/// alerts' outbox; 3 what a build made and its test (the test gate,
/// provenance, outdated images). Each step below upgrades an existing
/// journal in place, once, in one transaction; an older rabbit2packer still
/// reads it.
pub const SCHEMA_VERSION: i64 = 3;
const MIGRATIONS: &[(i64, &str)] = &[
    // 1 (#12, the status page): an image's newest job in each state is one
    // index seek, so `/api/images` stays fast with 100,000 jobs.
    (
        1,
        "CREATE INDEX IF NOT EXISTS jobs_image_state ON jobs(image_key, state, id);",
    ),
    // 2 (#12, alerts): image health and the outbox.
    (
        2,
        "CREATE TABLE IF NOT EXISTS image_health (
            image_key TEXT PRIMARY KEY,
            -- 'build failing', 'rotation failing' or 'test failing' (a healthy image has no row)
            state TEXT NOT NULL,
            since_job INTEGER NOT NULL,
            since_at TEXT NOT NULL,
            -- failures after the first one (no alert is sent for these)
            further INTEGER NOT NULL DEFAULT 0,
            last_job INTEGER NOT NULL,
            updated_at TEXT NOT NULL
        );
        -- alerts to send (a health change), until sent or given up on: one
        -- not sent when the daemon stops is sent after the restart
        CREATE TABLE IF NOT EXISTS alert_outbox (
            id INTEGER PRIMARY KEY,
            image_key TEXT NOT NULL,
            job_id INTEGER NOT NULL,
            change TEXT NOT NULL,
            created_at TEXT NOT NULL
        );",
    ),
    // 3 (#14, safe promotion): the images a build made (JSON list of
    // {"id", "name"}), the source image it was built from, and its test:
    // NULL (no gate), 'testing' (staged, the test to run or running: a
    // restart resumes there), 'passed', or why it failed.
    (
        3,
        "ALTER TABLE builds ADD COLUMN images TEXT;
        ALTER TABLE builds ADD COLUMN source_image TEXT;
        ALTER TABLE builds ADD COLUMN test TEXT;
        ALTER TABLE builds ADD COLUMN test_exit_code INTEGER;",
    ),
];

/// The newest profile journaled for an image: its job, `profile` header and body.
pub(crate) type LastBody = (i64, Option<String>, Vec<u8>);

/// An image whose builds or rotations fail, as the alerts and the page see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ImageHealth {
    pub image_key: String,
    /// `build failing`, `rotation failing` or `test failing`.
    pub state: String,
    /// The job whose failure started it (the one alerted about).
    pub since_job: i64,
    pub since_at: String,
    /// Failures since, not alerted about again.
    pub further: i64,
    /// The newest failed job.
    pub last_job: i64,
}

/// A change of an image's health the alerts tell about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) enum HealthChange {
    /// From healthy (or another failure) to this failure, by this job.
    Failing {
        state: String,
        previous: Option<ImageHealth>,
    },
    /// Healthy again; it had been failing so.
    Recovered { was: ImageHealth },
}

/// An alert waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingAlert {
    pub(crate) id: i64,
    pub(crate) image_key: String,
    pub(crate) job_id: i64,
    pub(crate) change: HealthChange,
}

/// Time stamps as operators read them (UTC, RFC 3339, seconds).
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Above this many free pages (4 KiB each), [`Journal::finish`] gives the
/// space of cleared bodies back to the file system.
const VACUUM_FREE_PAGES: i64 = 256;
/// The WAL is cut back to this size after a checkpoint (a large body grows it).
const WAL_SIZE_LIMIT: i64 = 4 << 20;

/// The journal, opened for writing by the daemon. Calls are short
/// transactions; one connection behind a mutex is plenty.
pub struct Journal {
    file: PathBuf,
    conn: Mutex<Connection>,
    /// The files SQLite writes (database, WAL, shared memory), each held open
    /// by us too, to tell whether the path still leads to them.
    on_disk: Vec<(PathBuf, std::fs::File)>,
    /// Counts the writes, so that the status page follows them without
    /// polling (see [`Journal::subscribe`]).
    changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("file", &self.file).finish()
    }
}

impl Journal {
    /// Opens (creating) STATE_DIR/rabbit2packer.sqlite for the daemon.
    pub(crate) fn open(state_dir: &Path) -> Result<Journal> {
        let file = state_dir.join(FILE_NAME);
        let err = |source| JournalError::Sql {
            file: file.display().to_string(),
            source,
        };
        // SQLite opens a file it may not write read-only, silently, and fails
        // at the first write with "attempt to write a readonly database".
        for f in sqlite_files(&file) {
            check_writable(&f)?;
        }
        let conn = Connection::open(&file).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        if conn.is_readonly(rusqlite::MAIN_DB).map_err(err)? {
            return Err(not_writable(&file, "SQLite opened it read-only".into()));
        }
        // Space of cleared bodies goes back to the file system
        // (`incremental_vacuum`); an older journal is converted once.
        let auto_vacuum: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).map_err(err)?;
        if auto_vacuum != 2 {
            conn.execute_batch("PRAGMA auto_vacuum=INCREMENTAL").map_err(err)?;
            let tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(err)?;
            if tables > 0 {
                conn.execute_batch("VACUUM").map_err(err)?;
            }
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(JournalError::Other {
                file: file.display().to_string(),
                problem: format!("cannot switch to WAL (journal_mode is {mode})"),
            });
        }
        // FULL: a commit is fsynced before the delivery it records is acked.
        conn.execute_batch(&format!(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA journal_size_limit={WAL_SIZE_LIMIT};"
        ))
        .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        migrate(&conn).map_err(|problem| JournalError::Other {
            file: file.display().to_string(),
            problem,
        })?;
        // The WAL and shared-memory files exist now (WAL mode, schema written).
        let mut on_disk = Vec::new();
        for f in sqlite_files(&file) {
            match std::fs::File::open(&f) {
                Ok(h) => on_disk.push((f, h)),
                Err(e) if f == file || e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(JournalError::Other {
                        file: f.display().to_string(),
                        problem: format!("cannot open: {e}"),
                    })
                }
                Err(_) => {}
            }
        }
        let journal = Journal {
            file,
            conn: Mutex::new(conn),
            on_disk,
            changes: tokio::sync::watch::Sender::new(0),
        };
        journal.check_on_disk()?;
        Ok(journal)
    }

    /// Is what we write still the journal at STATE_DIR/rabbit2packer.sqlite
    /// (and its WAL and shared memory)? A file deleted or replaced under a
    /// running daemon (`rm STATE_DIR/rabbit2packer.sqlite*`) takes every
    /// commit since with it at the next start: a delivery must not be acked.
    pub(crate) fn check_on_disk(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        for (path, held) in &self.on_disk {
            let ours = held.metadata().map_err(|e| JournalError::Replaced {
                file: path.display().to_string(),
                problem: format!("cannot stat the open file: {e}"),
            })?;
            let problem = if ours.nlink() == 0 {
                Some("was deleted while rabbit2packer was writing it".to_string())
            } else {
                match std::fs::metadata(path) {
                    Ok(m) if (m.dev(), m.ino()) == (ours.dev(), ours.ino()) => None,
                    Ok(_) => Some("was replaced by another file while rabbit2packer was writing it".into()),
                    Err(e) => Some(format!("is gone from its path while rabbit2packer was writing it: {e}")),
                }
            };
            if let Some(problem) = problem {
                return Err(JournalError::Replaced {
                    file: path.display().to_string(),
                    problem: format!("{problem}; what rabbit2packer commits now would be lost at the next start"),
                });
            }
        }
        Ok(())
    }

    /// Opens the journal read-only (for `status` and `history` while the daemon runs).
    pub fn open_read_only(state_dir: &Path) -> Result<Journal> {
        let file = state_dir.join(FILE_NAME);
        let err = |source| JournalError::Sql {
            file: file.display().to_string(),
            source,
        };
        if !file.exists() {
            return Err(JournalError::Other {
                file: file.display().to_string(),
                problem: "does not exist (has the daemon run with this STATE_DIR?)".into(),
            });
        }
        let conn = Connection::open_with_flags(&file, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        Ok(Journal {
            file,
            conn: Mutex::new(conn),
            on_disk: Vec::new(),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Fires after each write of this process to the journal (the value
    /// counts them). The status page waits on it instead of polling.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A write like [`Journal::with`], announced to subscribers once done.
    fn write<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let out = self.with(f);
        self.changes.send_modify(|n| *n += 1);
        out
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        // A panic elsewhere while holding the lock leaves the connection usable.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| JournalError::Sql {
            file: self.file.display().to_string(),
            source,
        })
    }

    /// Records a delivery as a waiting job, unless it is one already journaled:
    /// the same message id, or (for messages without one, as the original
    /// cdb2rabbit sends) a redelivery whose body was journaled before.
    /// `supersede` is the image's waiting job that the new one replaces.
    pub(crate) fn insert(&self, job: &NewJob, redelivered: bool, supersede: Option<i64>) -> Result<Inserted> {
        self.write(|conn| {
            let tx = conn.transaction()?;
            let existing: Option<i64> = match &job.message_id {
                Some(mid) => tx
                    .query_row(
                        "SELECT id FROM jobs WHERE message_id = ?1 ORDER BY id DESC LIMIT 1",
                        [mid],
                        |r| r.get(0),
                    )
                    .optional()?,
                // Without an id, identical bodies may be genuine new requests (a
                // profile changed back): only a redelivery is taken as a copy.
                None if redelivered => tx
                    .query_row(
                        "SELECT id FROM jobs WHERE body_sha256 = ?1 AND message_id IS NULL ORDER BY id DESC LIMIT 1",
                        [&job.body_sha256],
                        |r| r.get(0),
                    )
                    .optional()?,
                None => None,
            };
            if let Some(id) = existing {
                return Ok(Inserted::Duplicate(id));
            }
            tx.execute(
                "INSERT INTO jobs (message_id, body_sha256, profile, image_key, body, state, received_at)
                 VALUES (?1, ?2, ?3, ?4, X'', 'waiting', ?5)",
                params![job.message_id, job.body_sha256, job.profile, job.image_key, now()],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO bodies (job_id, body) VALUES (?1, zeroblob(?2))",
                params![id, job.body.len() as i64],
            )?;
            if !job.body.is_empty() {
                let mut blob = tx.blob_open(rusqlite::MAIN_DB, "bodies", "body", id, false)?;
                blob.write_at(&job.body, 0)?;
            }
            if let Some(old) = supersede {
                let n = tx.execute(
                    "UPDATE jobs SET state = 'superseded', superseded_by = ?1, finished_at = ?2, body = X''
                     WHERE id = ?3 AND state = 'waiting'",
                    params![id, now(), old],
                )?;
                if n > 0 {
                    tx.execute("DELETE FROM bodies WHERE job_id = ?1", [old])?;
                }
            }
            tx.commit()?;
            Ok(Inserted::New(id))
        })
        .and_then(|inserted| {
            // Committed, but to the file at STATE_DIR? Only then may it be acked.
            self.check_on_disk()?;
            Ok(inserted)
        })
    }

    /// Takes in a job claimed from the site journal under its site id (a
    /// daemon on STATE_DB runs jobs through its own journal in
    /// STATE_DIR/site, see [`crate::site`]): it waits here, ready for
    /// `set_running`. A job this daemon ran before (taken over, released)
    /// waits again, its earlier builds kept.
    pub(crate) fn mirror(
        &self,
        id: i64,
        image_key: &str,
        message_id: Option<&str>,
        profile: Option<&str>,
        body: &[u8],
    ) -> Result<()> {
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body));
        self.write(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO jobs (id, message_id, body_sha256, profile, image_key, body, state, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, X'', 'waiting', ?6)
                 ON CONFLICT (id) DO UPDATE SET state = 'waiting', finished_at = NULL, error = NULL,
                     superseded_by = NULL",
                params![id, message_id, sha, profile, image_key, now()],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO bodies (job_id, body) VALUES (?1, ?2)",
                params![id, body],
            )?;
            tx.commit()
        })
    }

    /// A worker took the job.
    pub(crate) fn set_running(&self, id: i64, worker: &str) -> Result<()> {
        self.write(|c| {
            c.execute(
                "UPDATE jobs SET state = 'running', started_at = ?1, finished_at = NULL, worker = ?2,
                 attempts = attempts + 1, error = NULL WHERE id = ?3",
                params![now(), worker, id],
            )
            .map(drop)
        })
    }

    /// The job's final state (succeeded, failed, interrupted).
    pub(crate) fn finish(&self, id: i64, state: JobState, error: Option<&str>) -> Result<()> {
        self.write(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE jobs SET state = ?1, finished_at = ?2, error = ?3 WHERE id = ?4",
                params![state.as_str(), now(), error, id],
            )?;
            // Profiles can be large and arrive all day: only the newest finished
            // body per image is kept (history needs none; dedupe uses the hash).
            tx.execute(
                "UPDATE jobs SET body = X'' WHERE image_key = (SELECT image_key FROM jobs WHERE id = ?1)
                 AND id < ?1 AND state IN ('succeeded', 'failed', 'superseded', 'cancelled') AND length(body) > 0",
                [id],
            )?;
            tx.execute(
                "DELETE FROM bodies WHERE job_id IN (SELECT id FROM jobs
                 WHERE image_key = (SELECT image_key FROM jobs WHERE id = ?1)
                 AND id < ?1 AND state IN ('succeeded', 'failed', 'superseded', 'cancelled'))",
                [id],
            )?;
            tx.commit()?;
            reclaim_space(c)
        })
    }

    /// A template build from `source_image` starts: returns its id.
    pub(crate) fn start_build(
        &self,
        job_id: i64,
        template: &str,
        log_path: &Path,
        build_file: &Path,
        source_image: &str,
    ) -> Result<i64> {
        self.write(|c| {
            c.execute(
                "INSERT INTO builds (job_id, template, started_at, log_path, build_file, source_image)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    job_id,
                    template,
                    now(),
                    log_path.display().to_string(),
                    build_file.display().to_string(),
                    source_image
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Records the build's packer process group (killed at the next start if still alive).
    pub(crate) fn set_build_pgid(&self, build_id: i64, pgid: i32, boot_id: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE builds SET pgid = ?1, boot_id = ?2 WHERE id = ?3",
                params![pgid, boot_id, build_id],
            )
            .map(drop)
        })
    }

    /// The build's test (TEST_COMMAND) ended: its process group is gone.
    pub(crate) fn clear_build_pgid(&self, build_id: i64) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE builds SET pgid = NULL WHERE id = ?1", [build_id])
                .map(drop)
        })
    }

    /// A template build ended (the process group is gone).
    pub(crate) fn finish_build(
        &self,
        build_id: i64,
        exit_code: Option<i32>,
        artifact_id: Option<&str>,
        error: Option<&str>,
    ) -> Result<()> {
        self.write(|c| {
            c.execute(
                "UPDATE builds SET finished_at = ?1, exit_code = ?2, artifact_id = ?3, error = ?4, pgid = NULL
                 WHERE id = ?5",
                params![now(), exit_code, artifact_id, error, build_id],
            )
            .map(drop)
        })
    }

    /// The rotation result of a build (`done: ...`, `skipped: ...`, `failed: ...`).
    pub(crate) fn set_rotation(&self, build_id: i64, rotation: &str) -> Result<()> {
        self.write(|c| {
            c.execute(
                "UPDATE builds SET rotation = ?1 WHERE id = ?2",
                params![rotation, build_id],
            )
            .map(drop)
        })
    }

    /// The images a build made (found in Glance).
    pub(crate) fn set_build_images(&self, build_id: i64, images: &[BuiltImage]) -> Result<()> {
        let images = serde_json::to_string(images).expect("images serialise");
        self.write(|c| {
            c.execute("UPDATE builds SET images = ?1 WHERE id = ?2", params![images, build_id])
                .map(drop)
        })
    }

    /// The test gate's state of a build (`testing`, `passed`, or why it failed).
    pub(crate) fn set_test(&self, build_id: i64, test: &str, exit_code: Option<i32>) -> Result<()> {
        self.write(|c| {
            c.execute(
                "UPDATE builds SET test = ?1, test_exit_code = ?2 WHERE id = ?3",
                params![test, exit_code, build_id],
            )
            .map(drop)
        })
    }

    /// Builds of `image_key` whose images were staged for a test that will
    /// never run: their job ended while `testing` (superseded by a newer
    /// request at a restart). Their images wait as STAGED_NAME for nothing.
    pub(crate) fn orphaned_staged(&self, image_key: &str) -> Result<Vec<(i64, StagedBuild)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT b.id, COALESCE(b.log_path, ''), b.images, j.id FROM builds b JOIN jobs j ON j.id = b.job_id
                 WHERE j.image_key = ?1 AND b.test = ?2 AND j.state NOT IN ('running', 'waiting', 'interrupted')
                 ORDER BY b.id",
            )?;
            let rows = st.query_map(params![image_key, TESTING], |r| {
                Ok((
                    r.get::<_, i64>(3)?,
                    StagedBuild {
                        build_id: r.get(0)?,
                        log_path: PathBuf::from(r.get::<_, String>(1)?),
                        images: images_from(r.get::<_, Option<String>>(2)?),
                    },
                ))
            })?;
            rows.collect()
        })
    }

    /// The newest build of `template` in job `job_id` whose images were
    /// staged and not tested to the end (a restart resumes there).
    pub(crate) fn staged(&self, job_id: i64, template: &str) -> Result<Option<StagedBuild>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, COALESCE(log_path, ''), images, test FROM builds
                 WHERE job_id = ?1 AND template = ?2 ORDER BY id DESC LIMIT 1",
                params![job_id, template],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()
            .map(|row| {
                row.filter(|(_, _, _, test)| test.as_deref() == Some(TESTING))
                    .map(|(build_id, log, images, _)| StagedBuild {
                        build_id,
                        log_path: PathBuf::from(log),
                        images: images_from(images),
                    })
                    .filter(|s| !s.images.is_empty())
            })
        })
    }

    /// The source image of each image key's newest succeeded build (for
    /// outdated images): image key -> (job, source image).
    pub fn built_from(&self) -> Result<Vec<(String, i64, String)>> {
        // A few index seeks per image (as `images`), whatever the journal's
        // size: `/api/images` asks this on every change.
        self.with(|c| {
            let tx = c.transaction()?;
            let mut out = Vec::new();
            {
                let mut newest = tx.prepare_cached(
                    "SELECT id FROM jobs WHERE image_key = ?1 AND state = 'succeeded' ORDER BY id DESC LIMIT 1",
                )?;
                let mut source = tx.prepare_cached(
                    "SELECT source_image FROM builds WHERE job_id = ?1 AND source_image IS NOT NULL ORDER BY id LIMIT 1",
                )?;
                for key in image_keys_in_order(&tx)? {
                    let Some(job) = newest.query_row([&key], |r| r.get::<_, i64>(0)).optional()? else {
                        continue;
                    };
                    if let Some(src) = source.query_row([job], |r| r.get::<_, String>(0)).optional()? {
                        out.push((key, job, src));
                    }
                }
            }
            tx.commit()?;
            Ok(out)
        })
    }

    /// At start-up: jobs running when the daemon died, interrupted and
    /// waiting ones go back to waiting; of several for one image only the
    /// newest stays, the others superseded by it. Returns them to schedule,
    /// and the process groups of builds that never finished.
    pub(crate) fn recover(&self) -> Result<Recovery> {
        self.write(|conn| {
            let tx = conn.transaction()?;
            let mut rec = Recovery::default();
            {
                let mut st =
                    tx.prepare("SELECT b.id, b.pgid, COALESCE(b.boot_id, '') FROM builds b WHERE b.pgid IS NOT NULL")?;
                rec.groups = st
                    .query_map([], |r| {
                        Ok(LeftoverGroup {
                            build_id: r.get(0)?,
                            pgid: r.get(1)?,
                            boot_id: r.get(2)?,
                        })
                    })?
                    .collect::<rusqlite::Result<_>>()?;
            }
            {
                let mut st =
                    tx.prepare("SELECT log_path FROM builds WHERE finished_at IS NULL AND log_path IS NOT NULL")?;
                rec.unfinished_logs = st
                    .query_map([], |r| r.get::<_, String>(0))?
                    .map(|p| p.map(PathBuf::from))
                    .collect::<rusqlite::Result<_>>()?;
            }
            tx.execute(
                "UPDATE builds SET finished_at = ?1, pgid = NULL,
                 error = COALESCE(error, 'rabbit2packer stopped during this build')
                 WHERE finished_at IS NULL",
                [now()],
            )?;
            // A finished build's group is its test's (TEST_COMMAND), stopped above.
            tx.execute("UPDATE builds SET pgid = NULL WHERE pgid IS NOT NULL", [])?;
            {
                let mut st = tx.prepare("SELECT id FROM jobs WHERE state = 'running' ORDER BY id")?;
                rec.rebuilt = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            }
            tx.execute(
                "UPDATE jobs SET state = 'waiting', worker = NULL WHERE state IN ('running', 'interrupted')",
                [],
            )?;
            let pending: Vec<(i64, String, Vec<u8>)> = {
                let mut st = tx.prepare(
                    "SELECT id, image_key, COALESCE((SELECT body FROM bodies WHERE job_id = jobs.id), body)
                     FROM jobs WHERE state = 'waiting' ORDER BY id",
                )?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut newest: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
            for (i, (_, key, _)) in pending.iter().enumerate() {
                newest.insert(key.clone(), i);
            }
            for (i, (id, key, body)) in pending.into_iter().enumerate() {
                let keep = newest[&key];
                if keep == i {
                    rec.jobs.push(JobRef {
                        id,
                        image_key: key,
                        body: std::sync::Arc::new(body),
                    });
                } else {
                    // `pending` is in id order, so `keep` is already final.
                    let newer: i64 = tx.query_row(
                        "SELECT id FROM jobs WHERE image_key = ?1 AND state = 'waiting' ORDER BY id DESC LIMIT 1",
                        [&key],
                        |r| r.get(0),
                    )?;
                    tx.execute(
                        "UPDATE jobs SET state = 'superseded', superseded_by = ?1, finished_at = ?2 WHERE id = ?3",
                        params![newer, now(), id],
                    )?;
                }
            }
            tx.commit()?;
            Ok(rec)
        })
    }

    /// Marks every job still running as interrupted (the end of a stop).
    pub(crate) fn interrupt_running(&self) -> Result<usize> {
        self.write(|c| {
            c.execute(
                "UPDATE jobs SET state = 'interrupted', finished_at = ?1,
                 error = COALESCE(error, 'interrupted: rabbit2packer stopped') WHERE state = 'running'",
                [now()],
            )
        })
    }

    /// Pending work, oldest first: running and waiting jobs, and the ones a
    /// stop interrupted (they run again at the next start).
    pub(crate) fn active(&self) -> Result<Vec<JobRecord>> {
        self.jobs_where("state IN ('running', 'waiting', 'interrupted') ORDER BY id", params![])
    }

    /// The newest `limit` finished or superseded jobs (of `image` when given), newest first.
    pub(crate) fn history(&self, image: Option<&str>, limit: usize) -> Result<Vec<JobRecord>> {
        let limit = limit as i64;
        match image {
            Some(img) => self.jobs_where(
                "state NOT IN ('running', 'waiting') AND image_key = ?1 ORDER BY id DESC LIMIT ?2",
                params![img, limit],
            ),
            None => self.jobs_where(
                "state NOT IN ('running', 'waiting') ORDER BY id DESC LIMIT ?1",
                params![limit],
            ),
        }
    }

    /// One job by id.
    pub fn job(&self, id: i64) -> Result<Option<JobRecord>> {
        Ok(self.jobs_where("id = ?1", params![id])?.into_iter().next())
    }

    /// The newest profile journaled for `image_key` (for `rebuild`): its
    /// job, `profile` header and body. Only the newest finished body per
    /// image is kept, which is the one a rebuild wants.
    pub(crate) fn last_body(&self, image_key: &str) -> Result<Option<LastBody>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, profile, COALESCE((SELECT body FROM bodies WHERE job_id = jobs.id), body) AS b
                 FROM jobs WHERE image_key = ?1 AND length(b) > 0 ORDER BY id DESC LIMIT 1",
                [image_key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
    }

    /// A job's body, when still kept (for `retry`).
    pub(crate) fn body(&self, id: i64) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            c.query_row(
                "SELECT COALESCE((SELECT body FROM bodies WHERE job_id = jobs.id), body) FROM jobs WHERE id = ?1",
                [id],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map(|b| b.filter(|b| !b.is_empty()))
        })
    }

    /// The image keys of the jobs journaled (newest first, at most `limit`).
    pub(crate) fn image_keys(&self, limit: usize) -> Result<Vec<String>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT image_key FROM jobs GROUP BY image_key ORDER BY max(id) DESC LIMIT ?1")?;
            let rows = st.query_map([limit as i64], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// A waiting job is cancelled (the scheduler has let go of it).
    pub(crate) fn cancel_waiting(&self, id: i64, why: &str) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?1, error = ?2 WHERE id = ?3 AND state = 'waiting'",
                params![now(), why, id],
            )?;
            Ok(n > 0)
        })
    }

    /// Records how `job_id` left its image: `failing` is `Some("build
    /// failing")`/`Some("rotation failing")`, or `None` for healthy. Returns
    /// the change to alert about: none when the image stays as it was (a
    /// further failure of the same kind is only counted).
    /// With `outbox`, the change is also queued in the journal's outbox,
    /// in the same transaction (see [`Journal::pending_alerts`]).
    pub(crate) fn record_health(
        &self,
        image_key: &str,
        job_id: i64,
        failing: Option<&str>,
        outbox: bool,
    ) -> Result<Option<HealthChange>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let previous = health_row(&tx, image_key)?;
            let change = match (failing, previous) {
                (None, None) => None,
                (None, Some(was)) => {
                    tx.execute("DELETE FROM image_health WHERE image_key = ?1", [image_key])?;
                    Some(HealthChange::Recovered { was })
                }
                (Some(state), Some(was)) if was.state == state => {
                    tx.execute(
                        "UPDATE image_health SET further = further + 1, last_job = ?1, updated_at = ?2
                         WHERE image_key = ?3",
                        params![job_id, now(), image_key],
                    )?;
                    None
                }
                (Some(state), previous) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO image_health
                         (image_key, state, since_job, since_at, further, last_job, updated_at)
                         VALUES (?1, ?2, ?3, ?4, 0, ?3, ?4)",
                        params![image_key, state, job_id, now()],
                    )?;
                    Some(HealthChange::Failing {
                        state: state.to_string(),
                        previous,
                    })
                }
            };
            if let (Some(change), true) = (&change, outbox) {
                tx.execute(
                    "INSERT INTO alert_outbox (image_key, job_id, change, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![
                        image_key,
                        job_id,
                        serde_json::to_string(change).expect("changes serialise"),
                        now()
                    ],
                )?;
            }
            tx.commit()?;
            Ok(change)
        })
    }

    /// Alerts not yet sent (nor given up on), oldest first.
    pub(crate) fn pending_alerts(&self) -> Result<Vec<PendingAlert>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id, image_key, job_id, change FROM alert_outbox ORDER BY id")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, image_key, job_id, change) = row?;
                match serde_json::from_str(&change) {
                    Ok(change) => out.push(PendingAlert {
                        id,
                        image_key,
                        job_id,
                        change,
                    }),
                    // Written by this code; only a hand-edited journal gets here.
                    Err(e) => tracing::error!("alert {id} in the journal's outbox is unreadable, dropped: {e}"),
                }
            }
            Ok(out)
        })
    }

    /// Jobs newest first, filtered (the status API's `/api/jobs`). Each
    /// filter is served by an index: `jobs_state`, `jobs_image`,
    /// `jobs_image_state`, or the primary key alone.
    pub fn jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>> {
        let mut clause = String::from("id < ?1");
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = vec![Box::new(filter.before.unwrap_or(i64::MAX))];
        if let Some(img) = &filter.image {
            args.push(Box::new(img.clone()));
            clause.push_str(&format!(" AND image_key = ?{}", args.len()));
        }
        match filter.state {
            Some(StateFilter::Is(st)) => {
                args.push(Box::new(st.as_str()));
                clause.push_str(&format!(" AND state = ?{}", args.len()));
            }
            Some(StateFilter::Finished) => clause.push_str(" AND state NOT IN ('running', 'waiting')"),
            None => {}
        }
        args.push(Box::new(filter.limit as i64));
        clause.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
        let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
        self.jobs_where(&clause, &refs)
    }

    /// Running and waiting jobs (gauges of `/metrics`).
    pub fn counts(&self) -> Result<(i64, i64)> {
        self.with(|c| {
            let n = |state: &str| -> rusqlite::Result<i64> {
                c.query_row("SELECT count(*) FROM jobs WHERE state = ?1", [state], |r| r.get(0))
            };
            Ok((n("running")?, n("waiting")?))
        })
    }

    /// One summary per image key that has a job, by key: what it is doing,
    /// its last success and failure, its current or last job. A few index
    /// seeks per image (`jobs_image_state`), whatever the journal's size.
    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        // One read transaction: a consistent view, and no lock taken per query.
        self.with(|c| {
            let tx = c.transaction()?;
            let keys = image_keys_in_order(&tx)?;
            let mut newest_st = tx.prepare_cached(
                "SELECT id, finished_at FROM jobs WHERE image_key = ?1 AND state = ?2 ORDER BY id DESC LIMIT 1",
            )?;
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                let mut newest = |state: &str| -> rusqlite::Result<Option<(i64, Option<String>)>> {
                    newest_st
                        .query_row(params![key, state], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                };
                let running = newest("running")?;
                let waiting = match newest("waiting")? {
                    Some(w) => Some(w),
                    None => newest("interrupted")?,
                };
                let success = newest("succeeded")?;
                let failure = newest("failed")?;
                let last_finished = match (&success, &failure) {
                    (Some(s), Some(f)) => Some(s.0.max(f.0)),
                    (Some(s), None) => Some(s.0),
                    (None, Some(f)) => Some(f.0),
                    (None, None) => None,
                };
                let current_id = running
                    .as_ref()
                    .map(|r| r.0)
                    .or(waiting.as_ref().map(|w| w.0))
                    .or(last_finished);
                let one = |id: i64| -> rusqlite::Result<Option<JobRecord>> {
                    Ok(query_jobs(&tx, "id = ?1", params![id])?.into_iter().next())
                };
                let current = match current_id {
                    Some(id) => one(id)?,
                    None => None,
                };
                // The last finished job decides between idle, failed and rotation failed.
                let last = match last_finished {
                    Some(id) if Some(id) == current_id => current.clone(),
                    Some(id) => one(id)?,
                    None => None,
                };
                let state = ImageState::of(running.is_some(), waiting.is_some(), last.as_ref());
                out.push(ImageSummary {
                    image_key: key,
                    state,
                    last_success_at: success.as_ref().and_then(|s| s.1.clone()),
                    last_success_job: success.map(|s| s.0),
                    last_failure_at: failure.as_ref().and_then(|f| f.1.clone()),
                    last_failure_job: failure.map(|f| f.0),
                    job: current,
                    failing: None,
                    outdated: None,
                });
            }
            drop(newest_st);
            // A journal from before alerts (read by an older daemon's `status`) has no health table.
            let has_health: bool = tx.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'image_health'",
                [],
                |r| r.get(0),
            )?;
            if has_health {
                for image in &mut out {
                    image.failing = health_row(&tx, &image.image_key)?;
                }
            }
            tx.commit()?;
            Ok(out)
        })
    }

    /// The alert was sent (or given up on): out of the outbox.
    pub(crate) fn alert_done(&self, id: i64) -> Result<()> {
        self.with(|c| c.execute("DELETE FROM alert_outbox WHERE id = ?1", [id]).map(drop))
    }

    /// Images whose builds or rotations fail, by image key (empty for a
    /// journal from before alerts).
    pub fn image_health(&self) -> Result<Vec<ImageHealth>> {
        self.with(|c| {
            let exists: i64 = c.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'image_health'",
                [],
                |r| r.get(0),
            )?;
            if exists == 0 {
                return Ok(Vec::new());
            }
            let mut st = c.prepare(
                "SELECT image_key, state, since_job, since_at, further, last_job FROM image_health ORDER BY image_key",
            )?;
            let rows = st.query_map([], health_from_row)?;
            rows.collect()
        })
    }

    /// Every job (tests and benchmarks).
    pub fn all(&self) -> Result<Vec<JobRecord>> {
        self.jobs_where("1 ORDER BY id", params![])
    }

    fn jobs_where(&self, clause: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<JobRecord>> {
        self.with(|c| query_jobs(c, clause, args))
    }
}

/// `sql` without its `ALTER TABLE t ADD COLUMN c ...` statements whose
/// column `t` has already (SQLite has no `ADD COLUMN IF NOT EXISTS`): a
/// migration stopped between its statements and its version, or a journal
/// whose version was reset by hand, is upgraded all the same.
fn without_present_columns(conn: &Connection, sql: &str) -> rusqlite::Result<String> {
    let mut out = String::new();
    for stmt in sql.split_inclusive(';') {
        let words: Vec<&str> = stmt.split_whitespace().collect();
        if let ["ALTER", "TABLE", table, "ADD", "COLUMN", column, ..] = words.as_slice() {
            let present: bool = conn.query_row(
                "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                [table, column],
                |r| r.get(0),
            )?;
            if present {
                continue;
            }
        }
        out.push_str(stmt);
    }
    Ok(out)
}

/// Every image key of the journal, in order: one index seek each
/// (`jobs_image`), not a scan of the jobs.
fn image_keys_in_order(c: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut st = c.prepare_cached("SELECT image_key FROM jobs WHERE image_key > ?1 ORDER BY image_key LIMIT 1")?;
    let mut last = String::new();
    while let Some(k) = st.query_row([&last], |r| r.get::<_, String>(0)).optional()? {
        last.clone_from(&k);
        keys.push(k);
    }
    Ok(keys)
}

/// Upgrades the journal to [`SCHEMA_VERSION`]; refuses a newer one (a
/// downgrade would write a journal the newer version misreads).
fn migrate(conn: &Connection) -> std::result::Result<(), String> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "was written by a newer rabbit2packer (journal schema {version}; this one knows up to {SCHEMA_VERSION})"
        ));
    }
    for (to, sql) in MIGRATIONS.iter().filter(|(to, _)| *to > version) {
        let sql = without_present_columns(conn, sql).map_err(|e| e.to_string())?;
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql} PRAGMA user_version = {to}; COMMIT;"))
            .map_err(|e| {
                let _ = conn.execute_batch("ROLLBACK");
                format!("cannot upgrade to journal schema {to}: {e}")
            })?;
        if *to > 1 {
            tracing::info!("job journal upgraded to schema {to}");
        }
    }
    Ok(())
}

/// Jobs (with their builds) matching `clause`; statements are cached, as
/// the status server asks the same questions again and again.
fn query_jobs(c: &Connection, clause: &str, args: &[&dyn rusqlite::ToSql]) -> rusqlite::Result<Vec<JobRecord>> {
    let sql = format!(
        "SELECT id, image_key, profile, message_id, state, received_at, started_at, finished_at,
                    superseded_by, attempts, worker, error
             FROM jobs WHERE {clause}"
    );
    let mut st = c.prepare_cached(&sql)?;
    let mut jobs: Vec<JobRecord> = st
        .query_map(args, |r| {
            let state: String = r.get(4)?;
            Ok(JobRecord {
                id: r.get(0)?,
                image_key: r.get(1)?,
                profile: r.get(2)?,
                message_id: r.get(3)?,
                state: JobState::parse(&state).unwrap_or(JobState::Failed),
                outcome: String::new(),
                received_at: r.get(5)?,
                started_at: r.get(6)?,
                finished_at: r.get(7)?,
                superseded_by: r.get(8)?,
                attempts: r.get(9)?,
                worker: r.get(10)?,
                error: r.get(11)?,
                builds: Vec::new(),
                host: None,
                host_url: None,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut bst = c.prepare_cached(
        "SELECT template, started_at, finished_at, exit_code, log_path, artifact_id, rotation, error,
                images, source_image, test, test_exit_code
             FROM builds WHERE job_id = ?1 ORDER BY id",
    )?;
    for job in &mut jobs {
        job.builds = bst
            .query_map([job.id], |r| {
                Ok(BuildRecord {
                    template: r.get(0)?,
                    started_at: r.get(1)?,
                    finished_at: r.get(2)?,
                    exit_code: r.get(3)?,
                    log_path: r.get(4)?,
                    artifact_id: r.get(5)?,
                    rotation: r.get(6)?,
                    error: r.get(7)?,
                    images: images_from(r.get::<_, Option<String>>(8)?),
                    source_image: r.get(9)?,
                    test: r.get(10)?,
                    test_exit_code: r.get(11)?,
                    host: None,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        job.outcome = outcome(job);
    }
    Ok(jobs)
}

/// Gives the pages of cleared bodies back to the file system once there are
/// enough of them: a 40 MB profile superseded by a small one must not keep
/// the journal at 40 MB for ever.
fn reclaim_space(c: &Connection) -> rusqlite::Result<()> {
    let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    if free < VACUUM_FREE_PAGES {
        return Ok(());
    }
    // Each step frees some pages: step it to the end.
    let mut st = c.prepare("PRAGMA incremental_vacuum")?;
    let mut rows = st.query([])?;
    while rows.next()?.is_some() {}
    drop(rows);
    // Copies the WAL into the database, which is cut to its new size, and
    // empties the WAL. A reader in the way (`status`) only delays it.
    let _: (i64, i64, i64) = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(())
}

fn health_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageHealth> {
    Ok(ImageHealth {
        image_key: r.get(0)?,
        state: r.get(1)?,
        since_job: r.get(2)?,
        since_at: r.get(3)?,
        further: r.get(4)?,
        last_job: r.get(5)?,
    })
}

fn health_row(c: &Connection, image_key: &str) -> rusqlite::Result<Option<ImageHealth>> {
    c.query_row(
        "SELECT image_key, state, since_job, since_at, further, last_job FROM image_health WHERE image_key = ?1",
        [image_key],
        health_from_row,
    )
    .optional()
}

/// The journal and the files SQLite keeps beside it in WAL mode.
fn sqlite_files(file: &Path) -> Vec<PathBuf> {
    let mut files = vec![file.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = file.as_os_str().to_owned();
        name.push(suffix);
        files.push(PathBuf::from(name));
    }
    files
}

/// Opens `path`, if it exists, for writing (as SQLite will), to name the
/// file, its owner and its mode when that fails.
fn check_writable(path: &Path) -> Result<()> {
    match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(not_writable(path, e.to_string())),
    }
}

fn not_writable(path: &Path, why: String) -> JournalError {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: plain syscalls.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let owner = match std::fs::metadata(path) {
        Ok(m) => format!(
            "owner {}, group {}, mode {:04o}",
            account_name(m.uid(), false),
            account_name(m.gid(), true),
            m.mode() & 0o7777
        ),
        Err(e) => format!("owner and mode unknown: {e}"),
    };
    JournalError::NotWritable {
        file: path.display().to_string(),
        problem: format!(
            "cannot be written by rabbit2packer (running as {}, group {}): {why}; it has {owner} \
             (fix its owner or mode, or the mount; STATE_DIR must be writable)",
            account_name(uid, false),
            account_name(gid, true),
        ),
    }
}

/// `name (id)`, or the id alone when no name is known.
fn account_name(id: u32, group: bool) -> String {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let name = unsafe {
        // SAFETY: the buffers outlive the calls; the result pointers point into them.
        if group {
            let mut grp: libc::group = std::mem::zeroed();
            let mut res: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrgid_r(id, &mut grp, buf.as_mut_ptr(), buf.len(), &mut res);
            (rc == 0 && !res.is_null()).then(|| std::ffi::CStr::from_ptr(grp.gr_name).to_string_lossy().into_owned())
        } else {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut res: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwuid_r(id, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut res);
            (rc == 0 && !res.is_null()).then(|| std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned())
        }
    };
    match name {
        Some(n) => format!("{n} ({id})"),
        None => id.to_string(),
    }
}

/// A build's `images` column (a JSON list; nothing for NULL or junk).
pub(crate) fn images_from(column: Option<String>) -> Vec<BuiltImage> {
    column
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// The outcome of a job whose image was built but failed its test.
pub const TEST_FAILED: &str = "built, test failed";

/// Whether a build's image failed the test gate.
pub(crate) fn test_failed(b: &BuildRecord) -> bool {
    b.test.as_deref().is_some_and(|t| t != TESTING && t != PASSED)
}

/// The one-word summary history shows: the state, `built, rotation failed`
/// or `built, test failed`.
pub(crate) fn outcome(job: &JobRecord) -> String {
    if job.state == JobState::Failed && job.builds.iter().any(test_failed) {
        return TEST_FAILED.to_string();
    }
    if job.state == JobState::Succeeded
        && job
            .builds
            .iter()
            .any(|b| b.rotation.as_deref().is_some_and(|r| r.starts_with("failed")))
    {
        return ROTATION_FAILED.to_string();
    }
    job.state.as_str().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_job(key: &str, mid: Option<&str>, body: &str) -> NewJob {
        NewJob {
            message_id: mid.map(str::to_string),
            body_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes())),
            profile: Some("p.example.org".into()),
            image_key: key.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn message_id_and_redelivered_body_are_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let Inserted::New(a) = j.insert(&new_job("k", Some("m1"), "{}"), false, None).unwrap() else {
            panic!()
        };
        assert_eq!(
            j.insert(&new_job("k", Some("m1"), "{}"), false, None).unwrap(),
            Inserted::Duplicate(a)
        );
        let Inserted::New(b) = j.insert(&new_job("k", None, "{1}"), false, None).unwrap() else {
            panic!()
        };
        assert_eq!(
            j.insert(&new_job("k", None, "{1}"), true, None).unwrap(),
            Inserted::Duplicate(b)
        );
        // A fresh (not redelivered) message with the same body is a new request.
        assert!(matches!(
            j.insert(&new_job("k", None, "{1}"), false, None).unwrap(),
            Inserted::New(_)
        ));
    }

    #[test]
    fn recovery_requeues_running_and_keeps_newest_per_image() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let ids: Vec<i64> = ["a", "a", "b"]
            .iter()
            .enumerate()
            .map(
                |(i, k)| match j.insert(&new_job(k, Some(&i.to_string()), "{}"), false, None).unwrap() {
                    Inserted::New(id) => id,
                    Inserted::Duplicate(_) => panic!(),
                },
            )
            .collect();
        j.set_running(ids[0], "Thread-1").unwrap();
        let b = j
            .start_build(ids[0], "t.json", Path::new("/l"), Path::new("/f"), "src")
            .unwrap();
        j.set_build_pgid(b, 4242, "boot").unwrap();
        let rec = j.recover().unwrap();
        assert_eq!(rec.rebuilt, vec![ids[0]]);
        assert_eq!(rec.groups.len(), 1);
        assert_eq!(rec.jobs.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[1], ids[2]]);
        let old = j.job(ids[0]).unwrap().unwrap();
        assert_eq!(old.state, JobState::Superseded);
        assert_eq!(old.superseded_by, Some(ids[1]));
    }

    #[test]
    fn a_journal_from_before_alerts_is_upgraded_once_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let j = Journal::open(dir.path()).unwrap();
            let Inserted::New(id) = j.insert(&new_job("a", Some("m"), "{}"), false, None).unwrap() else {
                panic!()
            };
            j.finish(id, JobState::Failed, Some("x")).unwrap();
            // As the previous version left it: no version, no health table.
            j.with(|c| c.execute_batch("DROP TABLE image_health; PRAGMA user_version = 0;"))
                .unwrap();
            id
        };
        let j = Journal::open(dir.path()).unwrap();
        let version: i64 = j
            .with(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(j.job(id).unwrap().unwrap().state, JobState::Failed, "jobs are kept");
        assert!(j.record_health("a", id, Some("build failing"), true).unwrap().is_some());
        // Reading an old journal (status of a daemon not yet upgraded) works too.
        j.with(|c| c.execute_batch("DROP TABLE image_health; PRAGMA user_version = 0;"))
            .unwrap();
        drop(j);
        let r = Journal::open_read_only(dir.path()).unwrap();
        assert!(r.image_health().unwrap().is_empty());
        drop(r);
        let j = Journal::open(dir.path()).unwrap();
        j.with(|c| c.execute_batch("PRAGMA user_version = 99;")).unwrap();
        drop(j);
        let e = Journal::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("newer rabbit2packer (journal schema 99"), "{e}");
    }

    #[test]
    fn a_journal_without_a_schema_version_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        {
            // As rabbit2packer wrote it before schema versions: user_version 0.
            let c = Connection::open(dir.path().join(FILE_NAME)).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.execute(
                "INSERT INTO jobs (body_sha256, image_key, body, state, received_at, finished_at)
                 VALUES ('x', 'a-sl7x-x86_64', X'', 'succeeded', 't', '2026-01-01T00:00:00.000Z')",
                [],
            )
            .unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        let (version, index): (i64, i64) = j
            .with(|c| {
                Ok((
                    c.query_row("PRAGMA user_version", [], |r| r.get(0))?,
                    c.query_row(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'jobs_image_state'",
                        [],
                        |r| r.get(0),
                    )?,
                ))
            })
            .unwrap();
        assert_eq!((version, index), (SCHEMA_VERSION, 1));
        assert_eq!(j.all().unwrap().len(), 1);
        drop(j);
        // Opening again changes nothing.
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(
            j.images().unwrap()[0].last_success_at.as_deref(),
            Some("2026-01-01T00:00:00.000Z")
        );
    }

    #[test]
    fn images_show_what_each_image_key_is_doing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let add = |key: &str, n: usize| match j.insert(&new_job(key, Some(&format!("{key}{n}")), "{}"), false, None) {
            Ok(Inserted::New(id)) => id,
            other => panic!("{other:?}"),
        };
        let a1 = add("a", 1);
        j.finish(a1, JobState::Succeeded, None).unwrap();
        let a2 = add("a", 2);
        j.finish(a2, JobState::Failed, Some("boom")).unwrap();
        let b1 = add("b", 1);
        j.set_running(b1, "Thread-1").unwrap();
        let c1 = add("c", 1);
        let d1 = add("d", 1);
        j.finish(d1, JobState::Succeeded, None).unwrap();
        let b = j
            .start_build(d1, "t.json", Path::new("/l"), Path::new("/f"), "src")
            .unwrap();
        j.set_rotation(b, "failed after 4 attempt(s): glance down").unwrap();
        let images = j.images().unwrap();
        let keys: Vec<(&str, ImageState)> = images.iter().map(|i| (i.image_key.as_str(), i.state)).collect();
        assert_eq!(
            keys,
            vec![
                ("a", ImageState::Failed),
                ("b", ImageState::Building),
                ("c", ImageState::Waiting),
                ("d", ImageState::RotationFailed)
            ]
        );
        assert_eq!(images[0].last_success_job, Some(a1));
        assert_eq!(images[0].last_failure_job, Some(a2));
        assert_eq!(images[0].job.as_ref().unwrap().id, a2);
        assert_eq!(images[1].job.as_ref().unwrap().id, b1);
        assert_eq!(images[2].job.as_ref().unwrap().id, c1);

        let page = |state: Option<StateFilter>, image: Option<&str>, before: Option<i64>, limit: usize| -> Vec<i64> {
            j.jobs(&JobFilter {
                state,
                image: image.map(str::to_string),
                before,
                limit,
            })
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect()
        };
        assert_eq!(page(None, None, None, 50), vec![d1, c1, b1, a2, a1]);
        assert_eq!(page(None, None, Some(b1), 2), vec![a2, a1]);
        assert_eq!(page(Some(StateFilter::Finished), None, None, 50), vec![d1, a2, a1]);
        assert_eq!(page(Some(StateFilter::Is(JobState::Running)), None, None, 50), vec![b1]);
        assert_eq!(
            page(Some(StateFilter::Is(JobState::Failed)), Some("a"), None, 50),
            vec![a2]
        );
        assert_eq!(page(None, Some("a"), None, 1), vec![a2]);
        assert_eq!(j.counts().unwrap(), (1, 1));
    }

    #[test]
    fn only_the_newest_finished_body_per_image_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for n in 0..3 {
            let Inserted::New(id) = j
                .insert(&new_job("a", Some(&n.to_string()), "{}"), false, None)
                .unwrap()
            else {
                panic!()
            };
            j.finish(id, JobState::Succeeded, None).unwrap();
            ids.push(id);
        }
        let bodies: Vec<usize> = j
            .with(|c| {
                let mut st = c.prepare(
                    "SELECT length(COALESCE((SELECT body FROM bodies WHERE job_id = jobs.id), body)) FROM jobs ORDER BY id",
                )?;
                let rows = st.query_map([], |r| r.get::<_, i64>(0))?;
                rows.map(|r| r.map(|n| n as usize)).collect()
            })
            .unwrap();
        assert_eq!(bodies, vec![0, 0, 2]);
    }
}
