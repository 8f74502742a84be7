//! The daemon on the site journal (`[rabbit2packer] STATE_DB`, issue #13):
//! several daemons share one job journal in PostgreSQL
//! ([`crate::site_journal`]), and the database decides who builds what.
//!
//! - The consumer journals each delivery in the site journal (site-wide
//!   dedupe and coalescing) before acking it; with the database away it
//!   pauses (messages stay in RabbitMQ).
//! - A worker claims the oldest waiting job of an image nobody builds, under
//!   this daemon's lease, and runs it as a single host does: through this
//!   daemon's own journal in `STATE_DIR/site` (under the site's job id),
//!   which holds what only this host knows (packer's process groups, the
//!   build logs' paths, the gate's state). At the end the job's builds, with
//!   their logs gzip-compressed, and its outcome go to the site journal,
//!   only if the job is still this daemon's attempt.
//! - Every third of JOB_LEASE the leases of this daemon's running jobs are
//!   renewed; a job missing from the renewal was taken over by another
//!   daemon and its build here is stopped. Then jobs of other daemons whose
//!   lease ran out are taken over (they wait again, or are superseded by
//!   their image's waiting job), but only once this daemon has reached the
//!   database for a whole lease: after an outage the owners renew first.
//! - Free workers sleep until the database NOTIFYs a change (a new job, a
//!   finished one, a takeover): no polling.
//! - At start, what this daemon ran in its previous life and nobody took
//!   over is given back (it waits again), before its workers claim
//!   anything; at stop, its running jobs too. A database that does not
//!   answer at start is waited for the same way as one lost later: the
//!   daemon starts, and consumes and claims once it answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use packuilon_common::config::SiteConfig;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::control::Cancels;
use crate::journal::{JobRef, JobState, Journal};
use crate::site_journal::{Claim, Finished, Health, Request, SiteJournal, SiteJournalError};

/// Pauses between attempts to reach the database: doubling up to this.
const MAX_PAUSE: Duration = Duration::from_secs(30);
const FIRST_PAUSE: Duration = Duration::from_millis(500);

/// The journal in STATE_DIR/site: where a daemon on the site journal runs
/// its claimed jobs (see the module's text).
pub(crate) const WORK_DIR: &str = "site";

/// A job this daemon runs.
#[derive(Debug)]
struct Mine {
    attempt: i32,
    /// When it was claimed: a renewal asked before knows nothing of it.
    claimed: Instant,
    /// Builds of the job in this daemon's journal before this attempt.
    builds_before: usize,
    /// The renewal did not find it: another daemon took it over.
    taken_over: bool,
    /// Its builds as told to the site journal when they started (their ids
    /// there, in order), and the telling still under way.
    started: Arc<Mutex<Vec<i64>>>,
    telling: Option<tokio::task::JoinHandle<()>>,
}

/// This daemon's part of the site.
#[derive(Debug)]
pub(crate) struct Site {
    pub(crate) journal: Arc<SiteJournal>,
    /// HOST_NAME: this daemon's name in the site journal.
    pub(crate) host: String,
    pub(crate) lease: Duration,
    /// Woken when the database says something changed (or it is back).
    wake: Notify,
    running: Mutex<HashMap<i64, Mine>>,
    /// Since when the database answers (None: it does not).
    reachable_since: Mutex<Option<Instant>>,
    /// Woken when a job starts or ends here (systemd's STATUS=).
    pub(crate) changed: Notify,
    /// Bumped at each NOTIFY of the site journal: the status page's
    /// `/api/changes` waits on it (any daemon's change).
    changes: tokio::sync::watch::Sender<u64>,
    /// This daemon has joined the site ([`Site::join`]): workers claim only then.
    joined: tokio::sync::watch::Sender<bool>,
    /// Its status page's address, registered when it joins.
    status_url: Mutex<Option<String>>,
}

impl Site {
    /// Connects (and migrates); a configuration error is returned at once.
    /// A database that does not answer is waited for in the background:
    /// the daemon starts, consuming and claiming wait.
    pub(crate) async fn connect(cfg: &SiteConfig) -> Result<Site, SiteJournalError> {
        let host = cfg.host_name.clone().unwrap_or_else(crate::site_journal::host_name);
        let (journal, reachable) = match SiteJournal::connect(&cfg.url, cfg.password_file.as_deref()).await {
            Ok(j) => (j, true),
            Err(e) if e.is_transient() => {
                tracing::warn!(
                    "{e}; starting all the same: consuming and claiming wait for it (reconnecting with backoff)"
                );
                crate::daemon::notify_status("site journal unreachable: waiting for it");
                (SiteJournal::lazy(&cfg.url, cfg.password_file.as_deref())?, false)
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            "Site journal {} (schema version {}): this daemon is {host}, job lease {:?}",
            journal.target(),
            crate::site_journal::SCHEMA_VERSION,
            cfg.job_lease
        );
        Ok(Site {
            journal: Arc::new(journal),
            host,
            lease: cfg.job_lease,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            reachable_since: Mutex::new(reachable.then(Instant::now)),
            changed: Notify::new(),
            changes: tokio::sync::watch::Sender::new(0),
            joined: tokio::sync::watch::Sender::new(false),
            status_url: Mutex::new(None),
        })
    }

    /// Says a site-wide change (see `changes`).
    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver of the site's changes (the status server's long poll).
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Jobs running here.
    pub(crate) fn running_count(&self) -> usize {
        self.running().len()
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Mine>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Says (once per change) whether the database answers: in the log and
    /// in systemd's STATUS= line.
    fn reached(&self, result: Result<(), &SiteJournalError>) {
        let mut since = self.reachable_since.lock().unwrap_or_else(|p| p.into_inner());
        match (result, since.is_some()) {
            (Ok(()), false) => {
                *since = Some(Instant::now());
                tracing::info!(
                    "site journal {} reachable again: consuming and claiming jobs",
                    self.journal.target()
                );
                crate::daemon::notify_status("site journal reachable again");
            }
            (Err(e), true) if e.is_transient() => {
                *since = None;
                tracing::warn!(
                    "{e}; consuming paused (messages stay in RabbitMQ), running builds go on; reconnecting with backoff"
                );
                crate::daemon::notify_status("site journal unreachable: consuming paused, running builds go on");
            }
            _ => {}
        }
    }

    /// Returns once the database answers, asking with growing pauses.
    pub(crate) async fn wait_reachable(&self) {
        let mut pause = FIRST_PAUSE;
        loop {
            let r = self.journal.job(0).await.map(drop);
            self.reached(r.as_ref().map(|_| ()));
            if r.is_ok() {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Has the database answered for at least a whole lease?
    fn settled(&self) -> bool {
        let since = self.reachable_since.lock().unwrap_or_else(|p| p.into_inner());
        since.is_some_and(|t| t.elapsed() >= self.lease)
    }

    /// Journals a delivery in the site journal; Ok means: ack it.
    pub(crate) async fn accept(
        &self,
        job: crate::journal::NewJob,
        redelivered: bool,
    ) -> Result<crate::scheduler::Accepted, SiteJournalError> {
        // PostgreSQL's text cannot hold NUL, which a message id or a header
        // can: one replaced so, always the same way (a redelivery is still
        // known by its id), rather than a message refused for ever.
        let text = |t: Option<String>| {
            t.map(|t| {
                if t.contains('\0') {
                    t.replace('\0', "\u{fffd}")
                } else {
                    t
                }
            })
        };
        let req = Request {
            message_id: text(job.message_id),
            body_sha256: job.body_sha256,
            profile: text(job.profile),
            image_key: job.image_key,
            body: job.body,
        };
        let r = self.journal.insert(&req, redelivered).await;
        self.reached(r.as_ref().map(drop));
        Ok(match r? {
            crate::site_journal::Inserted::New { id, superseded } => crate::scheduler::Accepted::New { id, superseded },
            crate::site_journal::Inserted::Duplicate(id) => crate::scheduler::Accepted::Duplicate(id),
        })
    }

    /// Joins the site: registers this daemon's status page (`status_url`,
    /// the first time), and gives back the jobs the site journal says it
    /// runs, from its previous life. Until this has been done, its workers
    /// claim nothing (they would be given back with the others); the lease
    /// keeper tries again while the database does not answer.
    pub(crate) async fn join(&self, status_url: Option<String>) {
        if status_url.is_some() {
            *self.status_url.lock().unwrap_or_else(|p| p.into_inner()) = status_url;
        }
        if *self.joined.borrow() {
            return;
        }
        let url = self.status_url.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(e) = self.journal.register(&self.host, url.as_deref()).await {
            self.reached(Err(&e));
            return;
        }
        if self.release(&format!("{} started again", self.host)).await {
            self.joined.send_replace(true);
        }
    }

    /// Waits for a job to run, claims it for `worker` and takes it into
    /// this daemon's journal (under the site's id).
    pub(crate) async fn next(&self, worker: &str, work: &Journal) -> JobRef {
        let _ = self.joined.subscribe().wait_for(|j| *j).await;
        let mut pause = FIRST_PAUSE;
        loop {
            // Armed before the claim: a NOTIFY during it is not missed.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let claimed = self.journal.claim(&self.host, worker, self.lease).await;
            self.reached(claimed.as_ref().map(drop));
            match claimed {
                Ok(Some(c)) => match self.take(c, work).await {
                    Some(job) => return job,
                    None => continue,
                },
                Ok(None) => {
                    pause = FIRST_PAUSE;
                    woken.await;
                }
                Err(e) => {
                    if !e.is_transient() {
                        tracing::error!("{worker}: {e}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = woken => {}
                    }
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    /// A claimed job into this daemon's journal; None (and the job failed
    /// in the site journal, saying why) if that journal cannot take it.
    async fn take(&self, c: Claim, work: &Journal) -> Option<JobRef> {
        let taken = work
            .mirror(
                c.id,
                &c.image_key,
                c.message_id.as_deref(),
                c.profile.as_deref(),
                &c.body,
            )
            .and_then(|()| work.job(c.id));
        match taken {
            Ok(Some(rec)) => {
                self.running().insert(
                    c.id,
                    Mine {
                        attempt: c.attempt,
                        claimed: Instant::now(),
                        builds_before: rec.builds.len(),
                        taken_over: false,
                        started: Arc::default(),
                        telling: None,
                    },
                );
                self.changed.notify_one();
                Some(JobRef {
                    id: c.id,
                    image_key: c.image_key,
                    body: Arc::new(c.body),
                })
            }
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    _ => "it is not there after the write".into(),
                };
                let error = format!("{} cannot record it in {}: {why}", self.host, work_dir_name());
                tracing::error!("job {} for {}: {error}", c.id, c.image_key);
                if let Err(e) = self
                    .journal
                    .finish(&self.host, c.id, c.attempt, Finished::Failed, Some(&error))
                    .await
                {
                    tracing::error!("job {} for {}: {e}", c.id, c.image_key);
                }
                None
            }
        }
    }

    /// A template build of job `id` starts here: told to the site journal
    /// (by a task of its own: a database away never holds up a build), so
    /// that every daemon shows what the job builds.
    pub(crate) fn build_started(
        self: &Arc<Self>,
        id: i64,
        template: &str,
        log_path: &std::path::Path,
        build_file: &std::path::Path,
        source_image: &str,
    ) {
        let mut running = self.running();
        let Some(mine) = running.get_mut(&id) else { return };
        let (site, attempt, started) = (self.clone(), mine.attempt, mine.started.clone());
        let (template, log_path, build_file, source_image) = (
            template.to_string(),
            log_path.to_path_buf(),
            build_file.to_path_buf(),
            source_image.to_string(),
        );
        // One after another: the builds of a job are told in their order.
        let before = mine.telling.take();
        mine.telling = Some(tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            let told = site
                .journal
                .start_build(
                    &site.host,
                    id,
                    attempt,
                    &template,
                    &log_path,
                    &build_file,
                    &source_image,
                )
                .await;
            match told {
                Ok(build) => started.lock().unwrap_or_else(|p| p.into_inner()).push(build),
                // Recorded whole at the job's end all the same.
                Err(e) => {
                    tracing::debug!("job {id}: the start of its build of {template} is not in the site journal: {e}")
                }
            }
        }));
    }

    /// The job ended here: its builds (with their logs) and its outcome go
    /// to the site journal, unless it was taken over or the daemon stops
    /// (then `release` gives it back). Transient failures are retried
    /// until the job is recorded or no longer this daemon's.
    pub(crate) async fn done(
        &self,
        job: &JobRef,
        state: JobState,
        error: Option<&str>,
        work: &Journal,
        alerts: &crate::alerts::Alerts,
    ) {
        let Some(mut mine) = self.running().remove(&job.id) else {
            return;
        };
        self.changed.notify_one();
        if let Some(telling) = mine.telling.take() {
            let _ = telling.await;
        }
        let started = std::mem::take(&mut *mine.started.lock().unwrap_or_else(|p| p.into_inner()));
        if mine.taken_over {
            tracing::warn!(
                "job {} for {} was taken over by another daemon (the lease of {} ran out); its end here is not recorded",
                job.id,
                job.image_key,
                self.host
            );
            return;
        }
        let finished = match state {
            JobState::Succeeded => Finished::Succeeded,
            JobState::Cancelled => Finished::Cancelled,
            JobState::Failed => Finished::Failed,
            // A stop: `release` gives it back for another daemon (or the next start).
            _ => return,
        };
        let rec = match work.job(job.id) {
            Ok(rec) => rec,
            Err(e) => {
                tracing::error!(
                    "job {}: its builds cannot be read from {}: {e}",
                    job.id,
                    work_dir_name()
                );
                None
            }
        };
        // The image's health after this job, as a single host's alerts see it.
        let failing = rec.as_ref().and_then(crate::alerts::health_of);
        let builds = rec
            .map(|rec| rec.builds)
            .unwrap_or_default()
            .into_iter()
            .skip(mine.builds_before)
            .map(|b| {
                let log = b.log_path.as_deref().and_then(|p| std::fs::read(p).ok());
                (b, log)
            })
            .collect::<Vec<_>>();
        let health = failing.map(|failing| Health {
            failing,
            outbox: alerts.sends(),
        });
        let mut pause = FIRST_PAUSE;
        loop {
            let r = async {
                self.journal
                    .record_builds(&self.host, job.id, mine.attempt, &builds, &started)
                    .await?;
                self.journal
                    .finish_with_health(&self.host, job.id, mine.attempt, finished, error, health)
                    .await
            }
            .await;
            self.reached(r.as_ref().map(drop));
            match r {
                Ok(change) => {
                    if change.is_some() {
                        alerts.wake();
                    }
                    return;
                }
                Err(e @ SiteJournalError::NotYours { .. }) => {
                    tracing::warn!("{e}: its end here is not recorded");
                    return;
                }
                Err(e) if e.is_transient() => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Err(e) => {
                    tracing::error!("job {} for {}: {e}", job.id, job.image_key);
                    return;
                }
            }
        }
    }

    /// Every third of the lease: renew this daemon's leases (stopping the
    /// builds of jobs taken over), then take over jobs whose lease ran out.
    pub(crate) async fn keep_leases(self: Arc<Self>, cancels: Arc<Cancels>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            if !*self.joined.borrow() {
                self.join(None).await;
            }
            let asked = Instant::now();
            let mine: Vec<i64> = self.running().keys().copied().collect();
            let renewed = self.journal.renew(&self.host, self.lease, &mine).await;
            self.reached(renewed.as_ref().map(drop));
            let Ok(held) = renewed else { continue };
            let lost: Vec<i64> = {
                let mut running = self.running();
                running
                    .iter_mut()
                    .filter(|(id, m)| m.claimed < asked && !m.taken_over && !held.contains(&(**id, m.attempt)))
                    .map(|(id, m)| {
                        m.taken_over = true;
                        *id
                    })
                    .collect()
            };
            for id in lost {
                tracing::warn!("job {id} is no longer {}'s (its lease ran out and another daemon took it over): stopping its build here", self.host);
                cancels.cancel(id, "taken over by another daemon");
            }
            if !self.settled() {
                continue;
            }
            match self.journal.take_over_expired(&self.host).await {
                Ok(requeued) if !requeued.is_empty() => self.wake.notify_waiters(),
                Ok(_) => {}
                Err(e) => self.reached(Err(&e)),
            }
        }
    }

    /// Wakes free workers whenever the database NOTIFYs; reconnects (with
    /// a pause) when the listening connection is lost, and wakes them then
    /// too, for what was missed meanwhile.
    pub(crate) async fn listen(self: Arc<Self>, stop: CancellationToken) {
        let mut pause = FIRST_PAUSE;
        loop {
            let listening = tokio::select! {
                l = self.journal.listen() => l,
                _ = stop.cancelled() => return,
            };
            match listening {
                Ok(mut listener) => {
                    pause = FIRST_PAUSE;
                    // The database answers: join now if that is still to do.
                    self.join(None).await;
                    self.wake.notify_waiters();
                    self.bump();
                    loop {
                        tokio::select! {
                            n = listener.next() => match n {
                                Some(_) => {
                                    self.wake.notify_waiters();
                                    self.bump();
                                }
                                None => break,
                            },
                            _ = stop.cancelled() => return,
                        }
                    }
                    tracing::warn!(
                        "site journal {}: the LISTEN connection was lost; listening again",
                        self.journal.target()
                    );
                }
                Err(e) => self.reached(Err(&e)),
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Gives back the jobs the site journal says this daemon runs (at start:
    /// those of its previous life; at stop: those it was running). False if
    /// the database did not answer.
    pub(crate) async fn release(&self, why: &str) -> bool {
        match self.journal.release(&self.host, why).await {
            Ok(jobs) => {
                for r in jobs {
                    match r.superseded_by {
                        Some(newer) => tracing::warn!(
                            "job {} for {} given back ({why}); superseded by waiting job {newer}",
                            r.id,
                            r.image_key
                        ),
                        None => tracing::warn!("job {} for {} given back ({why}): it runs again", r.id, r.image_key),
                    }
                }
                true
            }
            Err(e) => {
                tracing::error!(
                    "{e}; the jobs {} ran wait for their lease to run out ({:?}), or for it to be back",
                    self.host,
                    self.lease
                );
                self.reached(Err(&e));
                false
            }
        }
    }
}

fn work_dir_name() -> String {
    format!("STATE_DIR/{WORK_DIR}")
}
