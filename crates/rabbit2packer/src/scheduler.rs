//! Which job runs when: per image key at most one running job and one
//! waiting job; a newer request for an image replaces its waiting job (the
//! replaced one is recorded as superseded by it), so twenty messages for one
//! image during a build give one more build, with the newest profile.
//! Different images build in parallel, up to THREAD_COUNT workers.
//!
//! Workers sleep on a channel of ready image keys; an image is in that
//! channel at most once, and only while it has a waiting job and nothing
//! running. No polling: a request wakes a free worker at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::journal::{Inserted, JobRef, JobState, Journal, JournalError, NewJob};
use crate::site::Site;

#[derive(Debug, Default)]
struct Slot {
    running: Option<i64>,
    waiting: Option<JobRef>,
    /// The key is in the ready channel.
    queued: bool,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<String, Slot>,
}

/// What became of an accepted delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// A new waiting job; `superseded` is the waiting job it replaced.
    New { id: i64, superseded: Option<i64> },
    /// Already journaled: nothing to build.
    Duplicate(i64),
}

/// The per-image slots and the ready queue.
#[derive(Debug)]
pub(crate) struct Scheduler {
    journal: Arc<Journal>,
    state: Mutex<State>,
    ready_tx: mpsc::UnboundedSender<String>,
    ready_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    /// Woken when a job is accepted, started, done or cancelled (systemd's STATUS=).
    pub(crate) changed: tokio::sync::Notify,
}

impl Scheduler {
    pub(crate) fn new(journal: Arc<Journal>) -> Scheduler {
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        Scheduler {
            journal,
            state: Mutex::new(State::default()),
            ready_tx,
            ready_rx: tokio::sync::Mutex::new(ready_rx),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Journals a delivery (under the scheduler's lock, so the journal and
    /// the slots agree on which job is waiting) and schedules it. Returns
    /// once the job is committed: the caller may ack then.
    pub(crate) fn accept(&self, job: NewJob, redelivered: bool) -> Result<Accepted, JournalError> {
        let mut state = self.lock();
        let slot = state.slots.entry(job.image_key.clone()).or_default();
        let supersede = slot.waiting.as_ref().map(|w| w.id);
        let id = match self.journal.insert(&job, redelivered, supersede)? {
            Inserted::Duplicate(id) => return Ok(Accepted::Duplicate(id)),
            Inserted::New(id) => id,
        };
        let key = job.image_key.clone();
        slot.waiting = Some(JobRef {
            id,
            image_key: job.image_key,
            body: Arc::new(job.body),
        });
        self.make_ready(slot, key);
        self.changed.notify_one();
        Ok(Accepted::New {
            id,
            superseded: supersede,
        })
    }

    /// Schedules jobs found in the journal at start-up (already waiting there).
    pub(crate) fn restore(&self, jobs: Vec<JobRef>) {
        let mut state = self.lock();
        for job in jobs {
            let key = job.image_key.clone();
            let slot = state.slots.entry(key.clone()).or_default();
            slot.waiting = Some(job);
            self.make_ready(slot, key);
        }
    }

    fn make_ready(&self, slot: &mut Slot, key: String) {
        if slot.running.is_none() && slot.waiting.is_some() && !slot.queued {
            slot.queued = true;
            // The receiver lives as long as the scheduler.
            let _ = self.ready_tx.send(key);
        }
    }

    /// Waits for a job to run and marks it running (in memory; the worker
    /// records it in the journal).
    pub(crate) async fn next(&self) -> JobRef {
        loop {
            let key = {
                let mut rx = self.ready_rx.lock().await;
                match rx.recv().await {
                    Some(k) => k,
                    // Cannot happen: the scheduler holds a sender.
                    None => std::future::pending().await,
                }
            };
            let mut state = self.lock();
            let Some(slot) = state.slots.get_mut(&key) else {
                continue;
            };
            slot.queued = false;
            if slot.running.is_some() {
                continue;
            }
            if let Some(job) = slot.waiting.take() {
                slot.running = Some(job.id);
                self.changed.notify_one();
                return job;
            }
        }
    }

    /// Cancels job `id` if it is an image's waiting job (under the lock, so
    /// no worker takes it meanwhile); false if it is not waiting here.
    pub(crate) fn cancel_waiting(&self, id: i64, why: &str) -> Result<bool, JournalError> {
        let mut state = self.lock();
        let Some((key, _)) = state
            .slots
            .iter()
            .find(|(_, s)| s.waiting.as_ref().is_some_and(|w| w.id == id))
        else {
            return Ok(false);
        };
        let key = key.clone();
        if !self.journal.cancel_waiting(id, why)? {
            return Ok(false);
        }
        let slot = state.slots.get_mut(&key).expect("found above");
        slot.waiting = None;
        if slot.running.is_none() {
            // `next` skips a key whose slot is gone.
            state.slots.remove(&key);
        }
        self.changed.notify_one();
        Ok(true)
    }

    /// Jobs running and waiting, for systemd's STATUS= line.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let running = state.slots.values().filter(|s| s.running.is_some()).count();
        let waiting = state.slots.values().filter(|s| s.waiting.is_some()).count();
        (running, waiting)
    }

    /// The image's running job ended: its waiting job (if any) becomes ready.
    pub(crate) fn done(&self, image_key: &str) {
        let mut state = self.lock();
        let remove = {
            let Some(slot) = state.slots.get_mut(image_key) else {
                return;
            };
            slot.running = None;
            self.make_ready(slot, image_key.to_string());
            slot.waiting.is_none()
        };
        self.changed.notify_one();
        if remove {
            // Thousands of images come and go: keep only the busy ones.
            state.slots.remove(image_key);
        }
    }
}

/// Where deliveries are journaled and workers take their jobs: this
/// host's [`Scheduler`] on its SQLite journal, or the site journal shared
/// by several daemons ([`Site`], `[rabbit2packer] STATE_DB`).
#[derive(Debug, Clone)]
pub(crate) enum Jobs {
    Local(Arc<Scheduler>),
    Site(Arc<Site>),
}

/// Why a delivery (or a control request) was not journaled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotJournaled {
    #[error("{0}")]
    Local(#[from] JournalError),
    #[error("{0}")]
    Site(#[from] crate::site_journal::SiteJournalError),
}

impl Jobs {
    /// Journals a request (see [`Scheduler::accept`], [`Site::accept`]);
    /// once this returns Ok the job is committed and the delivery may be acked.
    pub(crate) async fn accept(&self, job: NewJob, redelivered: bool) -> Result<Accepted, NotJournaled> {
        match self {
            Jobs::Local(s) => Ok(s.accept(job, redelivered)?),
            Jobs::Site(s) => Ok(s.accept(job, redelivered).await?),
        }
    }

    /// The next job for `worker`, running (in memory) from now on.
    pub(crate) async fn next(&self, worker: &str, work: &Journal) -> JobRef {
        match self {
            Jobs::Local(s) => s.next().await,
            Jobs::Site(s) => s.next(worker, work).await,
        }
    }

    /// Job `job` ended as `state` (already in this daemon's journal): the
    /// image's health is recorded (and an alert queued when it changed), and
    /// the image's next job may run.
    pub(crate) async fn done(&self, job: &JobRef, state: JobState, error: Option<&str>, ctx: &crate::job::Context) {
        match self {
            Jobs::Local(s) => {
                ctx.alerts.observe(&job.image_key, job.id);
                s.done(&job.image_key)
            }
            Jobs::Site(s) => s.done(job, state, error, &ctx.journal, &ctx.alerts).await,
        }
    }

    /// Woken when a job is accepted, started, done or cancelled.
    pub(crate) fn changed(&self) -> &tokio::sync::Notify {
        match self {
            Jobs::Local(s) => &s.changed,
            Jobs::Site(s) => &s.changed,
        }
    }

    /// Jobs running and waiting here, for systemd's STATUS= line (on the
    /// site journal: running here; waiting is the site's).
    pub(crate) fn counts(&self) -> (usize, usize) {
        match self {
            Jobs::Local(s) => s.counts(),
            Jobs::Site(s) => (s.running_count(), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(key: &str, n: u32) -> NewJob {
        NewJob {
            message_id: Some(format!("{key}-{n}")),
            body_sha256: format!("{n}"),
            profile: None,
            image_key: key.into(),
            body: format!("{{\"n\": {n}}}").into_bytes(),
        }
    }

    #[tokio::test]
    async fn newer_request_replaces_the_waiting_one() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let s = Scheduler::new(j.clone());
        let Accepted::New { id: first, .. } = s.accept(job("a", 1), false).unwrap() else {
            panic!()
        };
        let running = s.next().await;
        assert_eq!(running.id, first);
        let Accepted::New { id: second, .. } = s.accept(job("a", 2), false).unwrap() else {
            panic!()
        };
        let r = s.accept(job("a", 3), false).unwrap();
        assert_eq!(
            r,
            Accepted::New {
                id: second + 1,
                superseded: Some(second)
            }
        );
        let rec = j.job(second).unwrap().unwrap();
        assert_eq!(rec.state, crate::journal::JobState::Superseded);
        assert_eq!(rec.superseded_by, Some(second + 1));
        // Nothing else for "a" until the running one is done.
        s.accept(job("b", 1), false).unwrap();
        assert_eq!(s.next().await.image_key, "b");
        s.done("a");
        let next = s.next().await;
        assert_eq!((next.image_key.as_str(), next.id), ("a", second + 1));
        assert_eq!(&*next.body, b"{\"n\": 3}");
    }
}
