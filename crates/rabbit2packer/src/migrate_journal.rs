//! `rabbit2packer migrate-journal --to postgresql://...`: copies one host's
//! SQLite journal (STATE_DIR/rabbit2packer.sqlite) into the shared site
//! journal ([`crate::site_journal`]), history included, so that the host can
//! join a site whose daemons share PostgreSQL.
//!
//! What arrives: every job with its state, times, attempts, worker and
//! error (job numbers are new: the database numbers jobs site-wide; each
//! keeps its old number in `origin`, `<host>:<STATE_DIR>#<n>`), every build
//! with its log read from the path the journal recorded (gzip, when the file
//! is still there), the bodies the journal kept, message ids (for site-wide
//! dedupe), and the images' health. Jobs that were running or interrupted
//! arrive waiting (they run again, as after a restart); of several waiting
//! jobs of one image only the newest stays waiting, the others superseded
//! by it, and a job the site already has waiting for the image supersedes
//! the copied ones (2).
//!
//! One transaction: all or nothing. A journal is copied once: the copy is
//! recorded in the table `imports` under `<host>:<STATE_DIR>` and a second
//! run for it is refused, not doubled. The daemon of STATE_DIR must be
//! stopped (its lock on STATE_DIR is taken for the copy).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::OpenFlags;

use crate::site_journal::{self, SiteJournal, SiteJournalError};

/// Why the copy was not made.
#[derive(Debug, thiserror::Error)]
pub enum MigrateJournalError {
    /// The source journal cannot be used (missing, too old, unreadable): exit 2.
    #[error("{file}: {problem}")]
    Source { file: PathBuf, problem: String },
    /// The daemon of STATE_DIR runs: exit 1, stop it first.
    #[error("{dir}: a rabbit2packer daemon runs on it: stop it before copying its journal")]
    InUse { dir: PathBuf },
    /// This journal was copied before: exit 1.
    #[error("{source_name} was copied into {target} already (on {at}, {jobs} jobs): nothing done")]
    AlreadyCopied {
        source_name: String,
        target: String,
        at: String,
        jobs: i32,
    },
    /// The site journal failed.
    #[error("{0}")]
    Site(#[from] SiteJournalError),
}

impl MigrateJournalError {
    /// 2 for a configuration error (bad URL, no or unusable journal), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            MigrateJournalError::Source { .. } => 2,
            MigrateJournalError::Site(e) if e.is_config() => 2,
            _ => 1,
        }
    }
}

/// What was copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    /// `<host>:<STATE_DIR>`.
    pub source: String,
    pub jobs: usize,
    /// Of them, waiting to run in the site journal now.
    pub waiting: usize,
    pub builds: usize,
    /// Build logs found at their recorded paths and kept with their builds.
    pub logs: usize,
    pub health: usize,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "copied {}: {} jobs ({} waiting to run), {} builds ({} with their logs), {} image health records",
            self.source, self.jobs, self.waiting, self.builds, self.logs, self.health
        )
    }
}

/// One job row of the SQLite journal.
struct Job {
    id: i64,
    message_id: Option<String>,
    body_sha256: String,
    profile: Option<String>,
    image_key: String,
    body: Vec<u8>,
    state: String,
    superseded_by: Option<i64>,
    received_at: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
    attempts: i64,
    worker: Option<String>,
    error: Option<String>,
}

/// One build row of the SQLite journal.
struct Build {
    job_id: i64,
    template: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    exit_code: Option<i64>,
    log_path: Option<String>,
    build_file: Option<String>,
    artifact_id: Option<String>,
    rotation: Option<String>,
    error: Option<String>,
    images: Option<String>,
    source_image: Option<String>,
    test: Option<String>,
    test_exit_code: Option<i64>,
}

/// Copies STATE_DIR's journal into the site journal at `url`.
pub async fn migrate(state_dir: &Path, url: &str, password_file: Option<&Path>) -> Result<Copied, MigrateJournalError> {
    SiteJournal::check_url(url, password_file)?;
    let _lock = lock(state_dir)?;
    let site = SiteJournal::connect(url, password_file).await?;
    let file = state_dir.join(crate::journal::FILE_NAME);
    let (jobs, builds, health) = read(&file)?;
    let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let host = site_journal::host_name();
    let source = format!("{host}:{}", dir.display());
    let copied = site
        .import(&source, &host, jobs, builds, health)
        .await
        .map_err(|e| match e {
            ImportError::Site(e) => MigrateJournalError::Site(e),
            ImportError::Already { at, jobs } => MigrateJournalError::AlreadyCopied {
                source_name: source.clone(),
                target: site.target().to_string(),
                at,
                jobs,
            },
        })?;
    Ok(copied)
}

/// STATE_DIR's lock, as the daemon takes it: no daemon runs on it during the copy.
fn lock(dir: &Path) -> Result<std::fs::File, MigrateJournalError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(dir).map_err(|e| MigrateJournalError::Source {
        file: dir.to_path_buf(),
        problem: e.to_string(),
    })?;
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(MigrateJournalError::InUse { dir: dir.to_path_buf() });
    }
    Ok(file)
}

/// An image_health row: key, state, since job, since, further failures, last job.
type Health = (String, String, i64, String, i64, i64);
/// What the SQLite journal holds that is copied.
type Journal = (Vec<Job>, Vec<Build>, Vec<Health>);

fn read(file: &Path) -> Result<Journal, MigrateJournalError> {
    let err = |problem: String| MigrateJournalError::Source {
        file: file.to_path_buf(),
        problem,
    };
    if !file.exists() {
        return Err(err("does not exist (has the daemon run with this STATE_DIR?)".into()));
    }
    let c = rusqlite::Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| err(e.to_string()))?;
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| err(e.to_string()))?;
    if version != crate::journal::SCHEMA_VERSION {
        return Err(err(format!(
            "journal schema {version}, this rabbit2packer copies schema {} only (start this version's daemon \
             on it once, which upgrades it, then stop it and copy)",
            crate::journal::SCHEMA_VERSION
        )));
    }
    let sql = |e: rusqlite::Error| err(e.to_string());
    let mut st = c
        .prepare(
            "SELECT id, message_id, body_sha256, profile, image_key,
                    COALESCE((SELECT body FROM bodies WHERE job_id = jobs.id), body),
                    state, superseded_by, received_at, started_at, finished_at, attempts, worker, error
             FROM jobs ORDER BY id",
        )
        .map_err(sql)?;
    let jobs = st
        .query_map([], |r| {
            Ok(Job {
                id: r.get(0)?,
                message_id: r.get(1)?,
                body_sha256: r.get(2)?,
                profile: r.get(3)?,
                image_key: r.get(4)?,
                body: r.get(5)?,
                state: r.get(6)?,
                superseded_by: r.get(7)?,
                received_at: r.get(8)?,
                started_at: r.get(9)?,
                finished_at: r.get(10)?,
                attempts: r.get(11)?,
                worker: r.get(12)?,
                error: r.get(13)?,
            })
        })
        .map_err(sql)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql)?;
    let mut st = c
        .prepare(
            "SELECT job_id, template, started_at, finished_at, exit_code, log_path, build_file, artifact_id,
                    rotation, error, images, source_image, test, test_exit_code
             FROM builds ORDER BY id",
        )
        .map_err(sql)?;
    let builds = st
        .query_map([], |r| {
            Ok(Build {
                job_id: r.get(0)?,
                template: r.get(1)?,
                started_at: r.get(2)?,
                finished_at: r.get(3)?,
                exit_code: r.get(4)?,
                log_path: r.get(5)?,
                build_file: r.get(6)?,
                artifact_id: r.get(7)?,
                rotation: r.get(8)?,
                error: r.get(9)?,
                images: r.get(10)?,
                source_image: r.get(11)?,
                test: r.get(12)?,
                test_exit_code: r.get(13)?,
            })
        })
        .map_err(sql)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql)?;
    let mut st = c
        .prepare("SELECT image_key, state, since_job, since_at, further, last_job FROM image_health")
        .map_err(sql)?;
    let health = st
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })
        .map_err(sql)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql)?;
    Ok((jobs, builds, health))
}

/// A time as the SQLite journal wrote it (RFC 3339), normalised; None if it is not one.
fn rfc3339(t: &Option<String>) -> Option<String> {
    let t = t.as_deref()?;
    chrono::DateTime::parse_from_rfc3339(t).ok().map(|d| {
        d.with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    })
}

pub(crate) enum ImportError {
    Site(SiteJournalError),
    Already { at: String, jobs: i32 },
}

impl SiteJournal {
    /// The copy itself, in one transaction (see the module's comment).
    async fn import(
        &self,
        source: &str,
        host: &str,
        jobs: Vec<Job>,
        builds: Vec<Build>,
        health: Vec<Health>,
    ) -> Result<Copied, ImportError> {
        let pending = |j: &Job| matches!(j.state.as_str(), "waiting" | "running" | "interrupted");
        // Of an image's jobs that will wait, the newest stays waiting.
        let mut newest_pending: HashMap<&str, i64> = HashMap::new();
        for j in jobs.iter().filter(|j| pending(j)) {
            newest_pending.insert(&j.image_key, j.id);
        }
        let r = self
            .with_tx(async |tx| {
                let n = tx
                    .execute(
                        "INSERT INTO imports (source, jobs) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        &[&source, &(jobs.len() as i32)],
                    )
                    .await?;
                if n == 0 {
                    let row = tx
                        .query_one(
                            "SELECT packuilon_ts(imported_at), jobs FROM imports WHERE source = $1",
                            &[&source],
                        )
                        .await?;
                    return Ok(Err((row.get::<_, String>(0), row.get::<_, i32>(1))));
                }
                let mut copied = Copied {
                    source: source.to_string(),
                    ..Copied::default()
                };
                // New numbers for all, first: superseded_by points forward.
                let new_ids: Vec<i64> = tx
                    .query(
                        "SELECT nextval(pg_get_serial_sequence('jobs', 'id')) FROM generate_series(1, $1)",
                        &[&(jobs.len() as i32)],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let ids: HashMap<i64, i64> = jobs.iter().map(|j| j.id).zip(new_ids).collect();
                // (2) The site's waiting job of each image, under the image's
                // lock as `insert` takes it: it stays the waiting one.
                let mut site_waiting: HashMap<&str, i64> = HashMap::new();
                for key in newest_pending.keys() {
                    tx.execute(
                        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                        &[&site_journal::IMAGE_LOCK, key],
                    )
                    .await?;
                    if let Some(r) = tx
                        .query_opt("SELECT id FROM jobs WHERE image_key = $1 AND state = 'waiting'", &[key])
                        .await?
                    {
                        site_waiting.insert(key, r.get(0));
                    }
                }
                for j in &jobs {
                    let id = ids[&j.id];
                    let mut error = j.error.clone();
                    let mut finished = rfc3339(&j.finished_at);
                    let (state, superseded_by) = if !pending(j) {
                        (j.state.as_str(), j.superseded_by.and_then(|old| ids.get(&old).copied()))
                    } else if let Some(&w) = site_waiting.get(j.image_key.as_str()) {
                        ("superseded", Some(w))
                    } else if newest_pending.get(j.image_key.as_str()) == Some(&j.id) {
                        if j.state != "waiting" {
                            error = Some(format!(
                                "interrupted: {} on {host} when its journal was copied to the site journal",
                                j.state
                            ));
                        }
                        copied.waiting += 1;
                        ("waiting", None)
                    } else {
                        ("superseded", Some(ids[&newest_pending[j.image_key.as_str()]]))
                    };
                    if state == "superseded" && pending(j) {
                        finished = None; // now(), below
                    }
                    let origin = format!("{source}#{}", j.id);
                    // Who ran it: this host, if it ever started.
                    let ran_on = j.started_at.is_some().then_some(host);
                    tx.execute(
                        "INSERT INTO jobs (id, message_id, body_sha256, profile, image_key, state, superseded_by,
                             received_at, started_at, finished_at, attempts, host, worker, error, origin)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE(($8::text)::timestamptz, now()),
                             ($9::text)::timestamptz,
                             CASE WHEN $6 IN ('waiting') THEN NULL ELSE COALESCE(($10::text)::timestamptz, now()) END,
                             $11, $12, $13, $14, $15)",
                        &[
                            &id,
                            &j.message_id,
                            &j.body_sha256,
                            &j.profile,
                            &j.image_key,
                            &state,
                            &superseded_by,
                            &rfc3339(&j.received_at),
                            &rfc3339(&j.started_at),
                            &finished,
                            &(j.attempts as i32),
                            &ran_on,
                            &j.worker,
                            &error,
                            &origin,
                        ],
                    )
                    .await?;
                    if let Some(mid) = &j.message_id {
                        // (3) Known site-wide from now on (unless the site had it already).
                        tx.execute(
                            "INSERT INTO messages (message_id, job_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                            &[mid, &id],
                        )
                        .await?;
                    }
                    // The waiting job's body, and those the journal kept (the
                    // newest finished one per image, for a rebuild).
                    if state == "waiting" || (!j.body.is_empty() && state != "superseded") {
                        tx.execute("INSERT INTO bodies (job_id, body) VALUES ($1, $2)", &[&id, &j.body])
                            .await?;
                    }
                    copied.jobs += 1;
                }
                for b in &builds {
                    let Some(&job_id) = ids.get(&b.job_id) else { continue };
                    // (6) The log, read from where the journal says it is.
                    let log = b.log_path.as_deref().and_then(|p| std::fs::read(p).ok());
                    let size = log.as_ref().map(|l| l.len() as i64);
                    let gz = log.as_deref().map(site_journal::gzip);
                    copied.logs += usize::from(log.is_some());
                    let error = match (&b.finished_at, &b.error) {
                        (None, None) => Some("rabbit2packer stopped during this build".to_string()),
                        _ => b.error.clone(),
                    };
                    tx.execute(
                        "INSERT INTO builds (job_id, host, template, started_at, finished_at, exit_code, log_path,
                             build_file, artifact_id, rotation, error, images, source_image, test, test_exit_code,
                             log_gz, log_size)
                         VALUES ($1, $2, $3, COALESCE(($4::text)::timestamptz, now()),
                             COALESCE(($5::text)::timestamptz, now()), $6, $7, $8, $9, $10, $11, $12, $13, $14,
                             $15, $16, $17)",
                        &[
                            &job_id,
                            &host,
                            &b.template,
                            &rfc3339(&b.started_at),
                            &rfc3339(&b.finished_at),
                            &b.exit_code.map(|c| c as i32),
                            &b.log_path,
                            &b.build_file,
                            &b.artifact_id,
                            &b.rotation,
                            &error,
                            &b.images,
                            &b.source_image,
                            &b.test,
                            &b.test_exit_code.map(|c| c as i32),
                            &gz,
                            &size,
                        ],
                    )
                    .await?;
                    copied.builds += 1;
                }
                for (key, state, since_job, since_at, further, last_job) in &health {
                    let (Some(since), Some(last)) = (ids.get(since_job), ids.get(last_job)) else {
                        continue;
                    };
                    // An image the site already tracks keeps the site's health.
                    let n = tx
                        .execute(
                            "INSERT INTO image_health (image_key, state, since_job, since_at, further, last_job)
                             VALUES ($1, $2, $3, COALESCE(($4::text)::timestamptz, now()), $5, $6)
                             ON CONFLICT DO NOTHING",
                            &[
                                key,
                                state,
                                since,
                                &rfc3339(&Some(since_at.clone())),
                                &(*further as i32),
                                last,
                            ],
                        )
                        .await?;
                    copied.health += n as usize;
                }
                // (5) The site's daemons wake for the jobs that wait now.
                for key in newest_pending.keys() {
                    tx.execute("SELECT pg_notify($1, $2)", &[&site_journal::CHANNEL, key])
                        .await?;
                }
                Ok(Ok(copied))
            })
            .await
            .map_err(ImportError::Site)?;
        r.map_err(|(at, jobs)| ImportError::Already { at, jobs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Inserted, JobState, Journal, NewJob};
    use packuilon_testsupport::postgres::PrivatePostgres;

    fn new_job(key: &str, mid: &str, body: &str) -> NewJob {
        NewJob {
            message_id: Some(mid.into()),
            body_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes())),
            profile: Some("p.example.org".into()),
            image_key: key.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn add(j: &Journal, key: &str, mid: &str, body: &str, supersede: Option<i64>) -> i64 {
        match j.insert(&new_job(key, mid, body), false, supersede).unwrap() {
            Inserted::New(id) => id,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hosts_journal_is_copied_with_its_history_and_waiting_jobs_once() {
        let pg = PrivatePostgres::shared().unwrap();
        let url = pg.database("import").unwrap();
        let state = tempfile::tempdir().unwrap();
        let logs = tempfile::tempdir().unwrap();
        let j = Journal::open(state.path()).unwrap();
        // History: a success with its build and log, a failure (the image's health).
        let ok = add(&j, "a-sl7x-x86_64", "m1", "{\"a\": 1}", None);
        j.set_running(ok, "Thread-1").unwrap();
        let log = logs.path().join("a.t.1.log");
        std::fs::write(&log, "==> null: done\n".repeat(100)).unwrap();
        let b = j
            .start_build(ok, "t.json", &log, "/b/t.json".as_ref(), "src-1")
            .unwrap();
        j.finish_build(b, Some(0), Some("Null"), None).unwrap();
        j.finish(ok, JobState::Succeeded, None).unwrap();
        let bad = add(&j, "b-sl7x-x86_64", "m2", "{\"b\": 1}", None);
        j.set_running(bad, "Thread-2").unwrap();
        j.finish(bad, JobState::Failed, Some("packer exited with code 1"))
            .unwrap();
        j.record_health("b-sl7x-x86_64", bad, Some("build failing"), false)
            .unwrap();
        // Pending: "a" running with a newer request waiting; "c" interrupted.
        let running = add(&j, "a-sl7x-x86_64", "m3", "{\"a\": 2}", None);
        j.set_running(running, "Thread-1").unwrap();
        let waiting = add(&j, "a-sl7x-x86_64", "m4", "{\"a\": 3}", None);
        let interrupted = add(&j, "c-sl7x-x86_64", "m5", "{\"c\": 1}", None);
        j.set_running(interrupted, "Thread-2").unwrap();
        j.interrupt_running().unwrap();
        drop(j);

        // The daemon still runs on STATE_DIR: refused.
        let held = std::fs::File::open(state.path()).unwrap();
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) },
            0
        );
        let e = migrate(state.path(), &url, None).await.unwrap_err();
        assert!(matches!(e, MigrateJournalError::InUse { .. }), "{e}");
        assert_eq!(e.exit_code(), 1);
        drop(held);

        let copied = migrate(state.path(), &url, None).await.unwrap();
        assert_eq!(
            (copied.jobs, copied.waiting, copied.builds, copied.logs, copied.health),
            (5, 2, 1, 1, 1)
        );
        let site = SiteJournal::connect(&url, None).await.unwrap();
        let all = site.all().await.unwrap();
        let origins = origins(pg, &url);
        let by_origin = |old: i64| {
            let id = origins[&old];
            all.iter().find(|r| r.id == id).cloned().unwrap()
        };
        let s_ok = by_origin(ok);
        assert_eq!(s_ok.state, JobState::Succeeded);
        assert_eq!(s_ok.builds.len(), 1);
        assert_eq!(s_ok.builds[0].artifact_id.as_deref(), Some("Null"));
        assert_eq!(s_ok.builds[0].source_image.as_deref(), Some("src-1"));
        let build_id = site.build_ids(s_ok.id).await.unwrap()[0].0;
        assert_eq!(
            site.build_log(build_id).await.unwrap().unwrap(),
            std::fs::read(&log).unwrap(),
            "the log is kept with its build"
        );
        assert_eq!(by_origin(bad).state, JobState::Failed);
        assert_eq!(by_origin(bad).error.as_deref(), Some("packer exited with code 1"));
        // "a": the newest request waits; the running one is superseded by it.
        let s_running = by_origin(running);
        let s_waiting = by_origin(waiting);
        assert_eq!(s_waiting.state, JobState::Waiting);
        assert_eq!(
            (s_running.state, s_running.superseded_by),
            (JobState::Superseded, Some(s_waiting.id))
        );
        // "c": interrupted, it waits to run again.
        let s_int = by_origin(interrupted);
        assert_eq!(s_int.state, JobState::Waiting);
        assert_eq!(site.body(s_int.id).await.unwrap().as_deref(), Some(&b"{\"c\": 1}"[..]));
        // Its messages are known site-wide: a redelivery is a duplicate.
        let again = crate::site_journal::Request::new("a-sl7x-x86_64", Some("m4"), None, b"{\"a\": 3}".to_vec());
        assert_eq!(
            site.insert(&again, true).await.unwrap(),
            crate::site_journal::Inserted::Duplicate(s_waiting.id)
        );
        // The waiting jobs run on any host.
        let c1 = site
            .claim("B", "Thread-1", std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let c2 = site
            .claim("B", "Thread-2", std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let mut claimed = vec![c1.id, c2.id];
        claimed.sort();
        assert_eq!(claimed, vec![s_waiting.id, s_int.id]);

        // A second run is refused, and changes nothing.
        let e = migrate(state.path(), &url, None).await.unwrap_err();
        assert!(matches!(e, MigrateJournalError::AlreadyCopied { jobs: 5, .. }), "{e}");
        assert_eq!(e.exit_code(), 1);
        assert_eq!(site.all().await.unwrap().len(), 5);
    }

    /// The site's job number of each job of the SQLite journal (from `origin`).
    fn origins(pg: &PrivatePostgres, url: &str) -> HashMap<i64, i64> {
        let db = url.rsplit('/').next().unwrap();
        pg.psql(db, "SELECT id, origin FROM jobs")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (id, origin) = l.split_once('|')?;
                Some((origin.rsplit_once('#')?.1.parse().ok()?, id.parse().ok()?))
            })
            .collect()
    }
}
