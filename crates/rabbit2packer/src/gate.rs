//! The test gate (`[rabbit2packer] TEST_COMMAND`): after a template's build
//! made its images and before the rotation, each new image waits private
//! under STAGED_NAME while TEST_COMMAND runs; exit 0 and it takes its live
//! name (the rotation follows), otherwise it is renamed BROKEN_NAME and the
//! live image and its members are not touched.
//!
//! The journal says where a build is: `testing` is recorded before the image
//! is staged, so a daemon stopped or killed during the test runs the test
//! again at its next start, not the build ([`crate::journal::Journal::staged`]).
//! The outcome is recorded before the image is renamed BROKEN_NAME: a crash
//! in between leaves a private `next-...` image, never an untested live one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use glance_rotate::glance::Glance;
use glance_rotate::RotateError;
use tokio_util::sync::CancellationToken;

use crate::build_log::TestLog;
use crate::job::Context;
use crate::journal::{BuiltImage, JobRef, PASSED, TESTING};
use crate::metrics::TestResult;
use crate::runner::{self, GroupCommand, Stream};

/// Exit status of the test's shell when PACKER_AUTH_FILE cannot be sourced.
const AUTH_FILE_FAILED: i32 = 125;

/// How the gate ended for a template's images.
#[derive(Debug)]
pub(crate) enum GateOutcome {
    /// Every image passed and took its live name.
    Passed,
    /// The images are BROKEN_NAME (or, when Glance failed, left staged).
    Failed(GateFailure),
    /// The daemon is stopping or the job was cancelled: the test runs again at the next start.
    Cancelled,
}

/// Why an image did not pass. Its text follows "built, test failed: " in the journal.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GateFailure {
    #[error("TEST_COMMAND exited with code {code} for image {image} (log: {})", log.display())]
    Exit { code: i32, image: String, log: PathBuf },
    #[error("TEST_COMMAND timed out after {} (TEST_TIMEOUT) for image {image}; it was interrupted (log: {})", crate::job::humanize(*after), log.display())]
    TimedOut {
        after: Duration,
        image: String,
        log: PathBuf,
    },
    #[error("cannot run TEST_COMMAND (bash): {0}")]
    NotStarted(std::io::Error),
    /// The build reported no image and none of its name was found.
    #[error("no new image to test: {0}")]
    NoImage(String),
    /// Staging, promoting or marking failed on every attempt.
    #[error("{what}: {source}")]
    Glance { what: String, source: RotateError },
}

impl GateFailure {
    /// The `result` label of `packuilon_image_tests_total`.
    pub(crate) fn result(&self) -> TestResult {
        match self {
            GateFailure::Exit { .. } => TestResult::Failed,
            GateFailure::TimedOut { .. } => TestResult::TimedOut,
            _ => TestResult::Error,
        }
    }

    /// TEST_COMMAND's exit code, when it ran to an end.
    pub(crate) fn exit_code(&self) -> Option<i32> {
        match self {
            GateFailure::Exit { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One template build's images at the gate.
pub(crate) struct Gate<'a> {
    pub(crate) ctx: &'a Context,
    pub(crate) thread: &'a str,
    pub(crate) job: &'a JobRef,
    pub(crate) key: &'a str,
    pub(crate) build_id: Option<i64>,
    pub(crate) log_path: &'a Path,
    pub(crate) glance: &'a Glance,
    pub(crate) env: &'a BTreeMap<String, String>,
    pub(crate) stop: &'a CancellationToken,
}

impl Gate<'_> {
    /// Stages, tests, then promotes or marks broken `images`.
    pub(crate) async fn run(&self, command: &str, images: &[BuiltImage]) -> GateOutcome {
        let outcome = self.stage_and_test(command, images).await;
        let result = match &outcome {
            GateOutcome::Passed => Some(TestResult::Passed),
            GateOutcome::Failed(f) => Some(f.result()),
            GateOutcome::Cancelled => None,
        };
        if let Some(r) = result {
            self.ctx.metrics.test_finished(r);
        }
        outcome
    }

    async fn stage_and_test(&self, command: &str, images: &[BuiltImage]) -> GateOutcome {
        let (ctx, thread) = (self.ctx, self.thread);
        let gate = &ctx.config.gate;
        self.retire_orphans().await;
        self.record(TESTING, None);
        let mut log = TestLog::open(self.log_path);
        let now = chrono::Local::now();
        for image in images {
            let staged = glance_rotate::gate::render_name(&gate.staged_name, &image.name, now);
            let what = format!("staging image {} as {staged:?}", image.id);
            if let Err(e) = self
                .retry(&what, || glance_rotate::gate::stage(self.glance, &image.id, &staged))
                .await
            {
                if self.stop.is_cancelled() {
                    return GateOutcome::Cancelled;
                }
                // Not staged: it keeps the name packer gave it; nothing is promoted or rotated.
                log.note(&e.to_string());
                log.finish(1);
                self.record(&format!("not tested: {e}"), None);
                return GateOutcome::Failed(e);
            }
            log.note(&format!("image {} staged as {staged:?} (private)", image.id));
        }
        for image in images {
            tracing::info!(
                "{thread}: testing image {} for {:?} (TEST_COMMAND, timeout {})",
                image.id,
                image.name,
                crate::job::humanize(gate.test_timeout)
            );
            log.note(&format!(
                "running TEST_COMMAND for image {} ({:?})",
                image.id, image.name
            ));
            match self.test(command, image, &mut log).await {
                Ok(()) => log.note(&format!("image {} passed", image.id)),
                Err(None) if ctx.stop.is_cancelled() => {
                    log.note("rabbit2packer stopped: the test runs again at the next start");
                    return GateOutcome::Cancelled;
                }
                Err(None) => {
                    // `rabbit2packer cancel`: the job ends here and never runs
                    // again, so its untested images must not wait as STAGED_NAME.
                    log.note("the job was cancelled during the test (rabbit2packer cancel)");
                    self.record("cancelled during the test", None);
                    self.mark_broken(images, &mut log).await;
                    log.finish(130);
                    return GateOutcome::Cancelled;
                }
                Err(Some(failure)) => {
                    tracing::error!("{thread}: {}: built, test failed: {failure}", self.key);
                    self.record(&format!("failed: {failure}"), failure.exit_code());
                    self.mark_broken(images, &mut log).await;
                    log.finish(failure.exit_code().unwrap_or(1));
                    return GateOutcome::Failed(failure);
                }
            }
        }
        for image in images {
            let what = format!("giving image {} its name {:?}", image.id, image.name);
            if let Err(e) = self
                .retry(&what, || {
                    glance_rotate::gate::promote(self.glance, &image.id, &image.name)
                })
                .await
            {
                if self.stop.is_cancelled() {
                    return GateOutcome::Cancelled;
                }
                log.note(&e.to_string());
                log.finish(1);
                self.record(&format!("passed, not promoted: {e}"), Some(0));
                return GateOutcome::Failed(e);
            }
        }
        self.record(PASSED, Some(0));
        log.note("every image passed and took its name; the rotation follows");
        log.finish(0);
        GateOutcome::Passed
    }

    /// TEST_COMMAND for one image: `Ok` passed, `Err(None)` stopped, `Err(Some)` failed.
    async fn test(&self, command: &str, image: &BuiltImage, log: &mut TestLog) -> Result<(), Option<GateFailure>> {
        let ctx = self.ctx;
        let gate = &ctx.config.gate;
        let mut env = self.env.clone();
        env.insert("PACKUILON_IMAGE_ID".into(), image.id.clone());
        env.insert("PACKUILON_IMAGE_NAME".into(), image.name.clone());
        env.insert("PACKUILON_IMAGE_KEY".into(), self.key.to_string());
        env.insert("PACKUILON_JOB".into(), self.job.id.to_string());
        let script = format!(
            ". \"$0\" || {{ echo \"rabbit2packer: test: cannot source $0 (PACKER_AUTH_FILE)\" >&2; exit {AUTH_FILE_FAILED}; }}\n{command}"
        );
        let cmd = GroupCommand {
            program: PathBuf::from("bash"),
            args: vec!["-c".into(), script.into(), ctx.config.packer_auth_file.clone().into()],
            env,
            cwd: Some(ctx.config.state_dir.clone()),
        };
        // The group is in the journal while it runs, as packer's is: a start
        // after `kill -9` stops what is left of it.
        let record_group = |pgid| {
            if let Some(b) = self.build_id {
                if let Err(e) = ctx.journal.set_build_pgid(b, pgid, &ctx.boot_id) {
                    tracing::error!("{}: {e}", self.thread);
                }
            }
        };
        let outcome = runner::run(
            &ctx.spawner,
            cmd,
            gate.test_timeout,
            ctx.config.stop_timeout,
            self.stop,
            record_group,
            |_: Stream, line| log.line(line),
        )
        .await;
        if let Some(b) = self.build_id {
            if let Err(e) = ctx.journal.clear_build_pgid(b) {
                tracing::error!("{}: {e}", self.thread);
            }
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                log.note(&format!("cannot run TEST_COMMAND: {e}"));
                return Err(Some(GateFailure::NotStarted(e)));
            }
        };
        log.note(&format!(
            "TEST_COMMAND exited with code {} for image {}",
            outcome.exit_code, image.id
        ));
        let log_path = self.log_path.to_path_buf();
        if outcome.cancelled {
            return Err(None);
        }
        if outcome.timed_out {
            return Err(Some(GateFailure::TimedOut {
                after: gate.test_timeout,
                image: image.id.clone(),
                log: log_path,
            }));
        }
        if outcome.exit_code != 0 {
            return Err(Some(GateFailure::Exit {
                code: outcome.exit_code,
                image: image.id.clone(),
                log: log_path,
            }));
        }
        Ok(())
    }

    /// Images an earlier job of this image key staged and never tested (it
    /// was superseded at a restart while at the gate): they would wait as
    /// STAGED_NAME for ever, so they become BROKEN_NAME.
    async fn retire_orphans(&self) {
        let orphans = match self.ctx.journal.orphaned_staged(self.key) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("{}: {e}", self.thread);
                return;
            }
        };
        for (job, staged) in orphans {
            tracing::warn!(
                "{}: job {job} of {} was superseded while its image(s) waited for their test: renaming them BROKEN_NAME",
                self.thread,
                self.key
            );
            let mut log = TestLog::open(&staged.log_path);
            log.note(&format!(
                "never tested: job {job} was superseded by job {} (a newer request)",
                self.job.id
            ));
            let orphan = Gate {
                build_id: Some(staged.build_id),
                log_path: &staged.log_path,
                ..*self
            };
            orphan.record(&format!("not tested: superseded by job {}", self.job.id), None);
            orphan.mark_broken(&staged.images, &mut log).await;
            log.finish(1);
        }
    }

    /// BROKEN_NAME for each image (a failure is logged: the image stays
    /// private under STAGED_NAME, which no one boots by its live name either).
    async fn mark_broken(&self, images: &[BuiltImage], log: &mut TestLog) {
        let now = chrono::Local::now();
        for image in images {
            let broken = glance_rotate::gate::render_name(&self.ctx.config.rotation.broken_name, &image.name, now);
            let what = format!("renaming image {} to {broken:?}", image.id);
            match self
                .retry(&what, || {
                    glance_rotate::gate::mark_broken(self.glance, &image.id, &broken, &image.name)
                })
                .await
            {
                Ok(_) => log.note(&format!(
                    "image {} renamed {broken:?} (private); the live image of {:?} is unchanged",
                    image.id, image.name
                )),
                Err(e) => {
                    tracing::error!("{}: {e}", self.thread);
                    log.note(&e.to_string());
                }
            }
        }
    }

    async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, GateFailure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RotateError>>,
    {
        with_retries(self.ctx, self.thread, self.stop, what, op).await
    }

    fn record(&self, test: &str, exit_code: Option<i32>) {
        if let Some(b) = self.build_id {
            if let Err(e) = self.ctx.journal.set_test(b, test, exit_code) {
                tracing::error!("{}: {e}", self.thread);
            }
        }
    }
}

/// `op` until it succeeds, with the rotation's pauses between attempts (a
/// configuration error or a stop ends it at once).
pub(crate) async fn with_retries<T, F, Fut>(
    ctx: &Context,
    thread: &str,
    stop: &CancellationToken,
    what: &str,
    op: F,
) -> Result<T, GateFailure>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, RotateError>>,
{
    let pauses = &ctx.rotation_backoff;
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(source) => {
                let failed = |source| GateFailure::Glance {
                    what: what.to_string(),
                    source,
                };
                let Some(pause) = pauses.get(attempt).filter(|_| !source.is_config()) else {
                    return Err(failed(source));
                };
                tracing::warn!(
                    "{thread}: {what} failed (attempt {}/{}): {source}",
                    attempt + 1,
                    pauses.len() + 1
                );
                tokio::select! {
                    _ = tokio::time::sleep(*pause) => {}
                    _ = stop.cancelled() => return Err(failed(source)),
                }
                attempt += 1;
            }
        }
    }
}
