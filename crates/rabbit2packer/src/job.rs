//! One job from start to end: profile -> names -> templates -> for each
//! template (one after another, as the original) a rendered build file, a
//! packer run with its build log, and the rotation of the image it made.
//! Every step is recorded in the journal as it happens.
//!
//! A template's build is a `TemplateBuild` in three steps, each testable
//! alone: `render` (the build file), `run` (packer and its build log),
//! `record` (the journal and the log lines operators know); then `rotate`.
//! Failures are typed (`JobError`, `TemplateError`, `PackerFailure`,
//! `RotationError`), so a reader of the outcome can tell a render error from
//! a packer failure from a rotation error; their texts are what the journal
//! and the logs show.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use packuilon_common::config::Rabbit2PackerConfig;
use packuilon_common::profile::{ImageNames, ProfileError};
use packuilon_common::rcfile::RcFileError;
use tokio_util::sync::CancellationToken;

use crate::build_log::{BuildLog, Summary};
use crate::catalog::{Catalog, LiveCatalog};
use crate::journal::{JobRef, JobState, Journal};
use crate::render::{self, RenderError, Values};
use crate::runner::{self, GroupCommand, Spawner, Stream};

/// Everything a worker needs, shared by all workers.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) config: Rabbit2PackerConfig,
    pub(crate) journal: Arc<Journal>,
    pub(crate) catalog: Arc<LiveCatalog>,
    pub(crate) spawner: Spawner,
    /// Fires when the daemon stops: running builds are interrupted.
    pub(crate) stop: CancellationToken,
    pub(crate) boot_id: String,
    /// Pauses between rotation attempts (a few, growing).
    pub(crate) rotation_backoff: Vec<Duration>,
    /// PACKER_AUTH_FILE's exports.
    pub(crate) auth_env: AuthEnv,
    /// Running jobs' own stop tokens (`rabbit2packer cancel`).
    pub(crate) cancels: Arc<crate::control::Cancels>,
    /// Health changes of images -> mail, webhook.
    pub(crate) alerts: crate::alerts::Alerts,
    /// Builds and rotations are counted here (`/metrics`).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// The site journal (STATE_DB): a build's start is told there too, so
    /// that every daemon's `status` says what a running job builds.
    pub(crate) site: Option<Arc<crate::site::Site>>,
}

/// How a job ended.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) state: JobState,
    pub(crate) error: Option<JobError>,
}

impl Finished {
    fn failed(error: JobError) -> Finished {
        let state = match error {
            JobError::Interrupted { .. } => JobState::Interrupted,
            _ => JobState::Failed,
        };
        Finished {
            state,
            error: Some(error),
        }
    }
}

/// Why a job did not succeed. Its text is what the journal and the logs
/// show; the variant says which step failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    /// The body names no image (checked when it arrived; only a journal
    /// edited by hand gets here).
    #[error("{0}")]
    Profile(#[from] ProfileError),
    /// The template map has neither the image's key nor a default entry.
    #[error("no Packer template for {key} and no {} entry in {}", crate::catalog::DEFAULT_KEY, map.display())]
    NoTemplate { key: String, map: PathBuf },
    /// IMAGES_CONFIG has no source image for `<os><version>-<arch>`.
    #[error("source image was not found for {source_key} in {} (IMAGES_CONFIG)", images.display())]
    NoSourceImage { source_key: String, images: PathBuf },
    /// PACKER_AUTH_FILE could not be sourced.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// One or more templates failed (the others were built).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Templates(Vec<TemplateFailure>),
    /// The daemon stopped before the job ended; it runs again at the next start.
    #[error("interrupted{}: rabbit2packer stopped", during.as_ref().map(|t| format!(" during {t}")).unwrap_or_default())]
    Interrupted { during: Option<String> },
    /// The job's task panicked.
    #[error("internal error (panic): {0}")]
    Panicked(String),
    /// The job's task ended otherwise.
    #[error("internal error: {0}")]
    Aborted(tokio::task::JoinError),
}

/// One failed template of a job: `<template name>: <error>`.
#[derive(Debug, thiserror::Error)]
#[error("{template}: {error}")]
pub(crate) struct TemplateFailure {
    pub(crate) template: String,
    pub(crate) error: TemplateError,
}

/// Why one template gave no image.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TemplateError {
    /// The template is in the map but its text was not loaded.
    #[error("template {} is not in the catalog", .0.display())]
    NotInCatalog(PathBuf),
    /// The template did not render to JSON.
    #[error("{}: {source}", template.display())]
    Render { template: PathBuf, source: RenderError },
    /// The rendered build file could not be written to BUILD_FILE_DIR.
    #[error("cannot write build file {}: {source}", path.display())]
    BuildFile { path: PathBuf, source: std::io::Error },
    /// No build log could be created in LOG_DIR.
    #[error("cannot create a build log in {} (LOG_DIR): {source}", dir.display())]
    BuildLog { dir: PathBuf, source: std::io::Error },
    /// The image was built and did not pass the test gate (or could not be tested).
    #[error("built, test failed: {0}")]
    Test(crate::gate::GateFailure),
    /// Packer ran (or could not start) and made no image; `last_error` is
    /// the last error packer printed.
    #[error("{failure}{} (log: {})", last_error.as_ref().map(|l| format!(": {l}")).unwrap_or_default(), log.display())]
    Packer {
        failure: PackerFailure,
        last_error: Option<String>,
        log: PathBuf,
    },
}

/// How a packer run failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PackerFailure {
    #[error("cannot run {} (PACKER_PATH): {source}", packer.display())]
    NotStarted { packer: PathBuf, source: std::io::Error },
    #[error("build timed out after {} (BUILD_TIMEOUT); packer was interrupted", humanize(*.0))]
    TimedOut(Duration),
    #[error("packer exited with code {0}")]
    Exit(i32),
    /// The daemon is stopping (SIGINT to packer's process group).
    #[error("interrupted: rabbit2packer stopped")]
    Interrupted,
}

/// Runs `job` on worker `thread` (`Thread-N`) and returns its final state.
/// `stop` fires when the daemon stops or the job is cancelled
/// (`rabbit2packer cancel`): packer is interrupted. Journal writes that
/// fail are logged; they never stop the build.
pub(crate) async fn execute(ctx: &Context, thread: &str, job: &JobRef, stop: &CancellationToken) -> Finished {
    let names = match crate::consumer::image_names(&job.body) {
        Ok(n) => n,
        // Checked when the message arrived; only a journal edited by hand gets here.
        Err(e) => {
            tracing::error!("{thread}: could not decode profile, malformed json? Continuing ({e})");
            return Finished::failed(e.into());
        }
    };
    let key = names.image_key();
    let catalog = ctx.catalog.refresh();
    let Some(choice) = catalog.templates_for(&key) else {
        let e = JobError::NoTemplate {
            key,
            map: catalog.map_file().to_path_buf(),
        };
        tracing::error!("{thread}: {e}");
        return Finished::failed(e);
    };
    if choice.default {
        tracing::info!("No Packer template defined for {key}. Using the default values");
    }
    let source_key = names.source_key();
    let Some(source_image) = catalog.source_image(&source_key) else {
        tracing::error!("{thread}: source image was not found, check IMAGES_CONFIG. Continuing");
        return Finished::failed(JobError::NoSourceImage {
            source_key,
            images: catalog.images_file().to_path_buf(),
        });
    };
    let values = Values::new(&names, source_image);

    let env = match packer_env(ctx).await {
        Ok(env) => env,
        Err(e) => {
            tracing::error!("{thread}: {key}: {e}");
            return Finished::failed(e.into());
        }
    };

    let mut failures = Vec::new();
    for template in &choice.templates {
        if stop.is_cancelled() {
            return Finished::failed(JobError::Interrupted { during: None });
        }
        let build = TemplateBuild {
            ctx,
            stop,
            thread,
            job,
            key: &key,
            names: &names,
            source_image,
            values: &values,
            env: &env,
            template,
        };
        match build.build(&catalog).await {
            TemplateResult::Ok => {}
            TemplateResult::Cancelled => {
                return Finished::failed(JobError::Interrupted {
                    during: Some(build.name()),
                })
            }
            TemplateResult::Failed(error) => failures.push(TemplateFailure {
                template: build.name(),
                error,
            }),
        }
    }
    if failures.is_empty() {
        Finished {
            state: JobState::Succeeded,
            error: None,
        }
    } else {
        Finished::failed(JobError::Templates(failures))
    }
}

/// How one template's build ended.
#[derive(Debug)]
pub(crate) enum TemplateResult {
    Ok,
    Failed(TemplateError),
    Cancelled,
}

/// What PACKER_AUTH_FILE exports, sourced by bash again whenever the file
/// changes (so an edited RC file needs no restart, and no bash runs between
/// a request and its packer start otherwise).
#[derive(Debug, Default)]
pub(crate) struct AuthEnv {
    cached: std::sync::Mutex<Option<(FileStamp, BTreeMap<String, String>)>>,
}

type FileStamp = Option<(std::time::SystemTime, u64, u64)>;

fn file_stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl AuthEnv {
    async fn exports(&self, file: &Path) -> Result<BTreeMap<String, String>, AuthError> {
        let stamp = file_stamp(file);
        if let Some((s, env)) = &*self.cached.lock().unwrap_or_else(|p| p.into_inner()) {
            if stamp.is_some() && *s == stamp {
                return Ok(env.clone());
            }
        }
        let owned = file.to_path_buf();
        let env = tokio::task::spawn_blocking(move || packuilon_common::rcfile::source(&owned))
            .await
            .map_err(AuthError::Sourcing)?
            .map_err(AuthError::RcFile)?;
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((stamp, env.clone()));
        Ok(env)
    }
}

/// Why PACKER_AUTH_FILE gave no environment for packer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The task sourcing it did not finish.
    #[error("sourcing PACKER_AUTH_FILE: {0}")]
    Sourcing(tokio::task::JoinError),
    /// bash could not source it.
    #[error("PACKER_AUTH_FILE {0}")]
    RcFile(RcFileError),
}

/// The daemon's environment plus what PACKER_AUTH_FILE exports plus the
/// original's aliases, and HOME (STATE_DIR) when the daemon has none.
async fn packer_env(ctx: &Context) -> Result<BTreeMap<String, String>, AuthError> {
    let exports = ctx.auth_env.exports(&ctx.config.packer_auth_file).await?;
    Ok(packer_env_from(exports, &ctx.config.state_dir))
}

/// Packer's environment from PACKER_AUTH_FILE's `exports`: the names the
/// OpenStack builder reads filled in from the ones RC files set (also for
/// `plan`'s `packer validate`).
pub(crate) fn packer_env_from(mut env: BTreeMap<String, String>, state_dir: &Path) -> BTreeMap<String, String> {
    let lookup = |env: &BTreeMap<String, String>, k: &str| env.get(k).cloned().or_else(|| std::env::var(k).ok());
    if !env.contains_key("OS_TENANT_ID") {
        if let Some(v) = lookup(&env, "OS_PROJECT_ID") {
            env.insert("OS_TENANT_ID".into(), v);
        }
    }
    // Packer keeps its config under $HOME; a system service may have none.
    if lookup(&env, "HOME").is_none() {
        env.insert("HOME".into(), state_dir.display().to_string());
    }
    if !env.contains_key("OS_DOMAIN_NAME") {
        if let Some(v) = lookup(&env, "OS_USER_DOMAIN_NAME") {
            env.insert("OS_DOMAIN_NAME".into(), v);
        }
    }
    env
}

/// One template of a job and what its steps share: [`render`](Self::render)
/// the build file, [`run`](Self::run) packer with its build log,
/// [`record`](Self::record) the outcome; a built image is then rotated.
pub(crate) struct TemplateBuild<'a> {
    ctx: &'a Context,
    /// The job's stop: the daemon's, or a `cancel` of this job.
    stop: &'a CancellationToken,
    thread: &'a str,
    job: &'a JobRef,
    key: &'a str,
    names: &'a ImageNames,
    /// IMAGES_CONFIG's entry for the image (`$IMAGE`).
    source_image: &'a str,
    values: &'a Values,
    env: &'a BTreeMap<String, String>,
    template: &'a Path,
}

/// A template rendered to its build file.
#[derive(Debug)]
pub(crate) struct Rendered {
    build_file: PathBuf,
    /// The build file's text (its SHA-256 is a provenance property).
    text: String,
    json: serde_json::Value,
}

/// A packer run whose log is finished, not yet recorded.
#[derive(Debug)]
pub(crate) struct Ran {
    build_id: Option<i64>,
    log_path: PathBuf,
    exit_code: i32,
    failure: Option<PackerFailure>,
    summary: Summary,
    started: chrono::DateTime<chrono::Utc>,
}

impl TemplateBuild<'_> {
    /// The template's name in logs, build files and the journal.
    fn name(&self) -> String {
        render::template_name(self.template)
    }

    /// Render, run, record; then the new images get their provenance, pass
    /// the test gate (when TEST_COMMAND is set) and are rotated. A build
    /// whose images were staged before a stop resumes at the test.
    async fn build(&self, catalog: &Catalog) -> TemplateResult {
        if let Some(command) = &self.ctx.config.gate.test_command {
            match self.ctx.journal.staged(self.job.id, &self.name()) {
                Ok(Some(staged)) => return self.resume_at_test(command, staged).await,
                Ok(None) => {}
                Err(e) => tracing::error!("{}: {e}", self.thread),
            }
        }
        let rendered = match self.render(catalog) {
            Ok(r) => r,
            Err(e) => return TemplateResult::Failed(e),
        };
        let mut ran = match self.run(&rendered).await {
            Ok(r) => r,
            Err(e) => return TemplateResult::Failed(e),
        };
        let result = self.record(&mut ran);
        if !matches!(result, TemplateResult::Ok) {
            return result;
        }
        let published = match self.publish(&ran, &rendered).await {
            Ok(p) => p,
            Err(e) => return self.gate_failed(e),
        };
        let targets = match (&self.ctx.config.gate.test_command, published) {
            (Some(command), Some(p)) => match self.gate(command, ran.build_id, &ran.log_path, &p).await {
                Ok(()) => Some(p.targets()),
                Err(result) => return result,
            },
            (Some(_), None) => unreachable!("publish finds the images to test or fails"),
            (None, p) => p.map(|p| p.targets()),
        };
        let targets = targets.unwrap_or_else(|| legacy_targets(&ran.summary, &rendered.json, self.values, ran.started));
        self.rotate_and_record(ran.build_id, targets).await;
        TemplateResult::Ok
    }

    /// A job stopped during its test: the images were built and staged;
    /// the test runs again, then the rotation.
    async fn resume_at_test(&self, command: &str, staged: crate::journal::StagedBuild) -> TemplateResult {
        let ids: Vec<&str> = staged.images.iter().map(|i| i.id.as_str()).collect();
        tracing::info!(
            "{}: {}.{}: image(s) {} built before the stop; running the test again, not the build",
            self.thread,
            self.key,
            self.name(),
            ids.join(", ")
        );
        let glance = match self.glance().await {
            Ok(g) => g,
            Err(e) => return self.gate_failed(e),
        };
        let p = Published {
            glance,
            images: staged.images,
        };
        if let Err(result) = self.gate(command, Some(staged.build_id), &staged.log_path, &p).await {
            return result;
        }
        self.rotate_and_record(Some(staged.build_id), p.targets()).await;
        TemplateResult::Ok
    }

    /// The test gate for `p`'s images: `Ok` when they passed (they have their names back).
    async fn gate(
        &self,
        command: &str,
        build_id: Option<i64>,
        log_path: &Path,
        p: &Published,
    ) -> Result<(), TemplateResult> {
        let gate = crate::gate::Gate {
            ctx: self.ctx,
            thread: self.thread,
            job: self.job,
            key: self.key,
            build_id,
            log_path,
            glance: &p.glance,
            env: self.env,
            stop: self.stop,
        };
        match gate.run(command, &p.images).await {
            crate::gate::GateOutcome::Passed => Ok(()),
            crate::gate::GateOutcome::Cancelled => Err(TemplateResult::Cancelled),
            crate::gate::GateOutcome::Failed(f) => Err(TemplateResult::Failed(TemplateError::Test(f))),
        }
    }

    /// A gate that could not start (no Glance, no image): the build stands, nothing goes live.
    fn gate_failed(&self, e: crate::gate::GateFailure) -> TemplateResult {
        if self.stop.is_cancelled() {
            return TemplateResult::Cancelled;
        }
        tracing::error!("{}: {}.{}: built, test failed: {e}", self.thread, self.key, self.name());
        self.ctx.metrics.test_finished(e.result());
        TemplateResult::Failed(TemplateError::Test(e))
    }

    /// Glance with PACKER_ADMIN_AUTH_FILE's credentials, else PACKER_AUTH_FILE's.
    async fn glance(&self) -> Result<glance_rotate::Glance, crate::gate::GateFailure> {
        let rc = (self.ctx.config.rotation.admin_auth_file.clone())
            .unwrap_or_else(|| self.ctx.config.packer_auth_file.clone());
        let what = format!("Glance credentials from {}", rc.display());
        let creds = tokio::task::spawn_blocking(move || glance_rotate::credentials_from_rc(&rc))
            .await
            .map_err(|e| glance_rotate::RotateError::Other(format!("sourcing: {e}")))
            .and_then(|r| r);
        let session = creds.and_then(glance_rotate::Session::new);
        match session {
            Ok(s) => Ok(glance_rotate::Glance::new(Arc::new(s))),
            Err(source) => Err(crate::gate::GateFailure::Glance { what, source }),
        }
    }

    /// The images a successful run made, found in Glance, with their
    /// provenance properties set. `Ok(None)`: Glance is not used for this
    /// build (no gate, no OpenStack image reported, rotation off) or could
    /// not be asked (the rotation then tries on its own). With TEST_COMMAND
    /// set, no image found is an error: nothing untested goes live.
    async fn publish(&self, ran: &Ran, rendered: &Rendered) -> Result<Option<Published>, crate::gate::GateFailure> {
        let cfg = &self.ctx.config;
        let gated = cfg.gate.test_command.is_some();
        let reported = ran.summary.openstack_images();
        if !gated && reported.is_empty() && cfg.rotation.admin_auth_file.is_none() {
            return Ok(None);
        }
        let found = async {
            let glance = self.glance().await?;
            let targets: Vec<glance_rotate::Target> = if reported.is_empty() {
                legacy_targets(&ran.summary, &rendered.json, self.values, ran.started)
            } else {
                reported.into_iter().map(glance_rotate::Target::ImageId).collect()
            };
            let mut images = Vec::new();
            for target in &targets {
                let what = format!("looking up the new {}", target_text(target));
                let found = crate::gate::with_retries(self.ctx, self.thread, self.stop, &what, || {
                    glance_rotate::rotate::new_image(&glance, target)
                })
                .await?;
                match found {
                    Some(img) => images.push(crate::journal::BuiltImage {
                        id: img.id.clone(),
                        name: img.name().to_string(),
                    }),
                    None => {
                        return Err(crate::gate::GateFailure::NoImage(format!(
                            "no active {} in Glance",
                            target_text(target)
                        )))
                    }
                }
            }
            Ok(Published { glance, images })
        }
        .await;
        let published = match found {
            Ok(p) => p,
            Err(e) if gated => return Err(e),
            Err(e) => {
                tracing::warn!("{}: {}.{}: no provenance set: {e}", self.thread, self.key, self.name());
                return Ok(None);
            }
        };
        if let Some(b) = ran.build_id {
            if let Err(e) = self.ctx.journal.set_build_images(b, &published.images) {
                tracing::error!("{}: {e}", self.thread);
            }
        }
        self.set_provenance(&published, rendered).await;
        Ok(Some(published))
    }

    /// Provenance properties on each new image (a failure is logged: the
    /// image is good without them).
    async fn set_provenance(&self, p: &Published, rendered: &Rendered) {
        let profile = self.ctx.journal.job(self.job.id).ok().flatten().and_then(|j| j.profile);
        let packer_version = crate::provenance::packer_version(&self.ctx.config.packer_path).await;
        let origin = crate::provenance::Origin {
            names: self.names,
            image_key: self.key,
            profile: profile.as_deref(),
            body: &self.job.body,
            template: self.template,
            build_file_text: &rendered.text,
            source_image: self.source_image,
            job: self.job.id,
            packer_version: &packer_version,
        };
        let props = crate::provenance::properties(&origin, chrono::Utc::now());
        for image in &p.images {
            let what = format!("setting the provenance of image {}", image.id);
            let set = crate::gate::with_retries(self.ctx, self.thread, self.stop, &what, || {
                glance_rotate::gate::set_properties(&p.glance, &image.id, &props)
            })
            .await;
            if let Err(e) = set {
                tracing::warn!("{}: {e}", self.thread);
            }
        }
    }

    /// Rotates `targets` and records the result on the build.
    async fn rotate_and_record(&self, build_id: Option<i64>, targets: Vec<glance_rotate::Target>) {
        let rotations = rotate(self.ctx, self.thread, targets).await;
        for r in &rotations {
            self.ctx.metrics.rotation(match r {
                Rotation::Skipped(_) => "skipped",
                Rotation::Done(_) => "done",
                Rotation::Failed { .. } => "failed",
            });
        }
        if let Some(b) = build_id {
            if let Err(e) = self.ctx.journal.set_rotation(b, &rotation_field(&rotations)) {
                tracing::error!("{}: {e}", self.thread);
            }
        }
    }

    /// The template with the job's values, written atomically to BUILD_FILE_DIR.
    fn render(&self, catalog: &Catalog) -> Result<Rendered, TemplateError> {
        let thread = self.thread;
        let Some(text) = catalog.template_text(self.template) else {
            return Err(TemplateError::NotInCatalog(self.template.to_path_buf()));
        };
        let (rendered, json) = render::render(&text, self.values).map_err(|source| {
            tracing::error!("{thread}: {}: {source}", self.template.display());
            TemplateError::Render {
                template: self.template.to_path_buf(),
                source,
            }
        })?;
        let build_file = render::build_file_path(&self.ctx.config.build_file_dir, self.key, self.template);
        if let Err(source) = render::write_atomic(&build_file, &rendered) {
            let e = TemplateError::BuildFile {
                path: build_file,
                source,
            };
            tracing::error!("{thread}: {e}");
            return Err(e);
        }
        Ok(Rendered {
            build_file,
            text: rendered,
            json,
        })
    }

    /// Packer on the build file, its output into a new build log, the
    /// build started in the journal (with packer's process group).
    async fn run(&self, rendered: &Rendered) -> Result<Ran, TemplateError> {
        let (ctx, thread, cfg) = (self.ctx, self.thread, &self.ctx.config);
        let build_file = &rendered.build_file;
        let mut log = BuildLog::create(&cfg.log_dir, self.key, &self.name(), cfg.log_keep).map_err(|source| {
            let e = TemplateError::BuildLog {
                dir: cfg.log_dir.clone(),
                source,
            };
            tracing::error!("{thread}: {e}");
            e
        })?;
        let log_path = log.path().to_path_buf();
        let build_id = ctx
            .journal
            .start_build(self.job.id, &self.name(), &log_path, build_file, self.source_image)
            .map_err(|e| tracing::error!("{thread}: {e}"))
            .ok();
        if let Some(site) = &ctx.site {
            site.build_started(self.job.id, &self.name(), &log_path, build_file, self.source_image);
        }
        tracing::info!("packer build starting, see: {} for details", log_path.display());
        let started = chrono::Utc::now();

        let cmd = GroupCommand::packer_build(
            cfg.packer_path.clone(),
            build_file,
            self.env.clone(),
            build_file.parent().map(Path::to_path_buf),
        );
        let journal = ctx.journal.clone();
        let boot_id = ctx.boot_id.clone();
        let outcome = runner::run(
            &ctx.spawner,
            cmd,
            cfg.build_timeout,
            cfg.stop_timeout,
            self.stop,
            |pgid| {
                if let Some(b) = build_id {
                    if let Err(e) = journal.set_build_pgid(b, pgid, &boot_id) {
                        tracing::error!("{e}");
                    }
                }
            },
            |stream, line| match stream {
                Stream::Stdout => log.packer_line(line),
                Stream::Stderr => log.raw_line(line),
            },
        )
        .await;

        let (exit_code, failure) = match outcome {
            Err(source) => (
                127,
                Some(PackerFailure::NotStarted {
                    packer: cfg.packer_path.clone(),
                    source,
                }),
            ),
            Ok(o) if o.timed_out => (o.exit_code, Some(PackerFailure::TimedOut(cfg.build_timeout))),
            Ok(o) if o.cancelled => (o.exit_code, Some(PackerFailure::Interrupted)),
            Ok(o) if o.exit_code != 0 => (o.exit_code, Some(PackerFailure::Exit(o.exit_code))),
            Ok(o) => (o.exit_code, None),
        };
        match &failure {
            Some(PackerFailure::Interrupted) if !ctx.stop.is_cancelled() => log.note(
                "the job was cancelled (rabbit2packer cancel): packer was interrupted (SIGINT to its process group)",
            ),
            Some(PackerFailure::Interrupted) => {
                log.note("rabbit2packer is stopping: packer was interrupted (SIGINT to its process group)")
            }
            Some(f @ (PackerFailure::NotStarted { .. } | PackerFailure::TimedOut(_))) => log.note(&f.to_string()),
            _ => {}
        }
        let summary = match log.finish(exit_code) {
            Ok(s) => s,
            // The build's result stands whatever became of its log.
            Err(unfinished) => {
                tracing::error!("{thread}: build log {}: {unfinished}", log_path.display());
                unfinished.summary
            }
        };
        Ok(Ran {
            build_id,
            log_path,
            exit_code,
            failure,
            summary,
            started,
        })
    }

    /// The run's outcome into the journal and the log lines operators know.
    fn record(&self, ran: &mut Ran) -> TemplateResult {
        let (thread, key, tname) = (self.thread, self.key, self.name());
        let cancelled = matches!(ran.failure, Some(PackerFailure::Interrupted));
        let error = ran.failure.take().map(|failure| TemplateError::Packer {
            last_error: ran.summary.last_error.clone().filter(|_| !cancelled),
            failure,
            log: ran.log_path.clone(),
        });
        let result = match &error {
            None => crate::metrics::BuildResult::Succeeded,
            Some(_) if cancelled => crate::metrics::BuildResult::Interrupted,
            Some(_) => crate::metrics::BuildResult::Failed,
        };
        let seconds = (chrono::Utc::now() - ran.started).num_milliseconds() as f64 / 1000.0;
        self.ctx.metrics.build_finished(key, &tname, result, seconds);
        if let Some(b) = ran.build_id {
            let error_text = error.as_ref().map(ToString::to_string);
            if let Err(e) = self.ctx.journal.finish_build(
                b,
                Some(ran.exit_code),
                ran.summary.artifact_id().as_deref(),
                error_text.as_deref(),
            ) {
                tracing::error!("{thread}: {e}");
            }
        }
        match error {
            None => {
                tracing::info!("{thread}: image built successfully: {key}.{tname}");
                TemplateResult::Ok
            }
            Some(_) if cancelled => TemplateResult::Cancelled,
            Some(e) => {
                if let TemplateError::Packer {
                    failure: PackerFailure::NotStarted { .. },
                    ..
                } = e
                {
                    tracing::error!("{thread}: packer could not be started, {key}.{tname} build failed: {e}");
                } else {
                    tracing::error!("{thread}: packer exited with non zero exit code, {key}.{tname} build failed");
                }
                TemplateResult::Failed(e)
            }
        }
    }
}

pub(crate) fn humanize(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 && s % 3600.0 == 0.0 {
        format!("{}h", s / 3600.0)
    } else if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{}m", s / 60.0)
    } else {
        format!("{s}s")
    }
}

/// How the rotation for one new image ended (an outcome, not always an
/// error). Its text is the journal's rotation field.
#[derive(Debug)]
pub(crate) enum Rotation {
    Skipped(String),
    Done(glance_rotate::Report),
    /// Every attempt failed (the image is not rebuilt for it); `last` is the
    /// last attempt's error.
    Failed {
        attempts: usize,
        last: RotationError,
    },
}

impl std::fmt::Display for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rotation::Skipped(why) => write!(f, "skipped: {why}"),
            Rotation::Done(r) => write!(
                f,
                "done: {} ({}): archived {}, moved {} member(s), deleted {}",
                r.name,
                r.new_image_id,
                r.archived.len(),
                r.members_moved.len(),
                r.deleted.len()
            ),
            Rotation::Failed { attempts, last } => write!(f, "failed after {attempts} attempt(s): {last}"),
        }
    }
}

/// Why one rotation attempt failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RotationError {
    /// The task sourcing the admin RC file did not finish.
    #[error("sourcing {} failed: {source}", rc.display())]
    Sourcing {
        rc: PathBuf,
        source: tokio::task::JoinError,
    },
    /// glance-rotate's error: credentials, RC file, Keystone or Glance.
    #[error(transparent)]
    Rotate(#[from] glance_rotate::RotateError),
}

/// The journal's rotation field for a build's rotations: the first failed
/// one, else all of them joined by `; `.
fn rotation_field(rotations: &[Rotation]) -> String {
    if let Some(failed) = rotations.iter().find(|r| matches!(r, Rotation::Failed { .. })) {
        return failed.to_string();
    }
    rotations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// What a build made, found in Glance.
pub(crate) struct Published {
    glance: glance_rotate::Glance,
    images: Vec<crate::journal::BuiltImage>,
}

impl Published {
    fn targets(&self) -> Vec<glance_rotate::Target> {
        self.images
            .iter()
            .map(|i| glance_rotate::Target::ImageId(i.id.clone()))
            .collect()
    }
}

fn target_text(target: &glance_rotate::Target) -> String {
    match target {
        glance_rotate::Target::ImageId(id) => format!("image {id}"),
        glance_rotate::Target::Name { name, .. } => format!("image named {name:?}"),
    }
}

/// The images a build made as the rotation looks for them without asking
/// Glance first: packer's OpenStack artifacts, else the newest active image
/// of the rendered name created since the build started.
fn legacy_targets(
    summary: &Summary,
    rendered: &serde_json::Value,
    values: &Values,
    started: chrono::DateTime<chrono::Utc>,
) -> Vec<glance_rotate::Target> {
    let images = summary.openstack_images();
    if images.is_empty() {
        vec![glance_rotate::Target::Name {
            name: render::image_name(rendered, &values.raw_name),
            created_after: Some(started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        }]
    } else {
        images.into_iter().map(glance_rotate::Target::ImageId).collect()
    }
}

/// The rename-old-images step for what a template build produced: one
/// rotation per new image (after a few attempts each).
async fn rotate(ctx: &Context, thread: &str, targets: Vec<glance_rotate::Target>) -> Vec<Rotation> {
    let rc = &ctx.config.rotation;
    let Some(admin_rc) = rc.admin_auth_file.clone() else {
        return vec![Rotation::Skipped(
            "rotation is off (no PACKER_ADMIN_AUTH_FILE)".to_string(),
        )];
    };
    let opts = glance_rotate::RotateOptions::from(rc);
    let mut results = Vec::new();
    for target in targets {
        results.push(rotate_one(ctx, thread, &admin_rc, target, &opts).await);
    }
    results
}

async fn rotate_one(
    ctx: &Context,
    thread: &str,
    admin_rc: &Path,
    target: glance_rotate::Target,
    opts: &glance_rotate::RotateOptions,
) -> Rotation {
    let what = target_text(&target);
    let attempts = ctx.rotation_backoff.len() + 1;
    let mut attempt = 1;
    let last = loop {
        match rotate_call(admin_rc, target.clone(), opts).await {
            Ok(report) => {
                if let Some(why) = report.skipped {
                    tracing::info!("{thread}: rotation of {what} skipped: {why}");
                    return Rotation::Skipped(why);
                }
                let done = Rotation::Done(report);
                tracing::info!("{thread}: rotation of {what} {done}");
                return done;
            }
            Err(e) => {
                tracing::warn!("{thread}: rotation of {what} failed (attempt {attempt}/{attempts}): {e}");
                let Some(pause) = ctx.rotation_backoff.get(attempt - 1) else {
                    break e;
                };
                tokio::select! {
                    _ = tokio::time::sleep(*pause) => {}
                    _ = ctx.stop.cancelled() => break e,
                }
                attempt += 1;
            }
        }
    };
    tracing::error!("{thread}: built, rotation failed for {what}: {last}");
    Rotation::Failed { attempts, last }
}

/// One glance-rotate call: the admin RC file is sourced by bash on the
/// blocking pool (a process and its wait), the HTTP calls run on the runtime.
async fn rotate_call(
    admin_rc: &Path,
    target: glance_rotate::Target,
    opts: &glance_rotate::RotateOptions,
) -> Result<glance_rotate::Report, RotationError> {
    let rc = admin_rc.to_path_buf();
    let creds = tokio::task::spawn_blocking(move || glance_rotate::credentials_from_rc(&rc))
        .await
        .map_err(|source| RotationError::Sourcing {
            rc: admin_rc.to_path_buf(),
            source,
        })??;
    Ok(glance_rotate::rotate_with_credentials(creds, target, opts).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site in a temp dir: config.ini, one template, the catalog and a
    /// worker's context on them (no daemon, no packer run).
    fn site(dir: &Path) -> (Context, Arc<Catalog>) {
        let d = dir.display();
        std::fs::write(dir.join("auth.sh"), "export OS_AUTH_URL=http://127.0.0.1:1/v3\n").unwrap();
        std::fs::write(
            dir.join("t.json"),
            r#"{"builders": [{"type": "null", "name": "$NAME", "x": "$IMAGE"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.join("template-map.json"), r#"{"DEFAULT": ["t.json"]}"#).unwrap();
        std::fs::write(dir.join("source-images.json"), r#"{"sl7x-x86_64": "abc"}"#).unwrap();
        let config = dir.join("config.ini");
        std::fs::write(
            &config,
            format!(
                "[rabbit2packer]\nTHREAD_COUNT = 1\nLOG_DIR = {d}/logs\nBUILD_FILE_DIR = {d}/build-files\n\
                 PACKER_AUTH_FILE = {d}/auth.sh\nPACKER_TEMPLATE_MAP = {d}/template-map.json\n\
                 IMAGES_CONFIG = {d}/source-images.json\nSTATE_DIR = {d}/state\n"
            ),
        )
        .unwrap();
        let ini = packuilon_common::config::IniFile::load(&config).unwrap();
        let cfg = ini.rabbit2packer(&mut Vec::new()).unwrap();
        for d in [&cfg.log_dir, &cfg.build_file_dir, &cfg.state_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let catalog = Catalog::load(&cfg.packer_template_map, &cfg.images_config).unwrap();
        let journal = Arc::new(Journal::open(&cfg.state_dir).unwrap());
        let ctx = Context {
            alerts: crate::alerts::Alerts::disabled(journal.clone()),
            cancels: Default::default(),
            journal,
            catalog: Arc::new(LiveCatalog::new(catalog)),
            spawner: Spawner::start().unwrap(),
            stop: CancellationToken::new(),
            boot_id: runner::boot_id(),
            rotation_backoff: Vec::new(),
            auth_env: AuthEnv::default(),
            metrics: Default::default(),
            site: None,
            config: cfg,
        };
        let catalog = ctx.catalog.refresh();
        (ctx, catalog)
    }

    /// What a template's build borrows: the job, its values and environment.
    struct Job {
        job: JobRef,
        names: ImageNames,
        values: Values,
        env: BTreeMap<String, String>,
    }

    impl Job {
        fn new() -> Job {
            Job {
                job: JobRef {
                    id: 1,
                    image_key: "sample-sl7x-x86_64".into(),
                    body: Arc::new(Vec::new()),
                },
                names: ImageNames::from_json(&sample_profile()).unwrap(),
                values: Values::sample(),
                env: BTreeMap::new(),
            }
        }

        fn build<'a>(&'a self, ctx: &'a Context, template: &'a Path) -> TemplateBuild<'a> {
            TemplateBuild {
                ctx,
                stop: &ctx.stop,
                thread: "Thread-1",
                job: &self.job,
                key: &self.job.image_key,
                names: &self.names,
                source_image: "00000000-0000-0000-0000-000000000000",
                values: &self.values,
                env: &self.env,
                template,
            }
        }
    }

    /// A profile naming the sample image.
    fn sample_profile() -> serde_json::Value {
        serde_json::json!({
            "system": {
                "personality": {"name": "sample"},
                "archetype": {"name": "sample-archetype"},
                "os": {"distribution": {"name": "sl"}, "version": {"name": "7x"}, "architecture": "x86_64"}
            }
        })
    }

    #[test]
    fn render_writes_the_build_file_with_the_jobs_values() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, catalog) = site(dir.path());
        let (job, template) = (Job::new(), dir.path().join("t.json"));
        let build = job.build(&ctx, &template);
        let rendered = build.render(&catalog).unwrap();
        assert!(rendered.build_file.starts_with(&ctx.config.build_file_dir));
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&rendered.build_file).unwrap()).unwrap();
        assert_eq!(written, rendered.json);
        assert_eq!(written["builders"][0]["name"], job.values.raw_name.as_str());
        assert_eq!(written["builders"][0]["x"], "00000000-0000-0000-0000-000000000000");

        let other = dir.path().join("other.json");
        let e = job.build(&ctx, &other).render(&catalog).unwrap_err();
        assert!(matches!(e, TemplateError::NotInCatalog(_)), "{e}");
    }

    #[test]
    fn record_tells_a_failed_run_from_an_interrupted_one_and_names_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, _) = site(dir.path());
        let (job, template) = (Job::new(), dir.path().join("t.json"));
        let build = job.build(&ctx, &template);
        let ran = |failure| Ran {
            build_id: None,
            log_path: PathBuf::from("/logs/t.log"),
            exit_code: 1,
            failure,
            summary: Summary {
                last_error: Some("boom".into()),
                ..Summary::default()
            },
            started: chrono::Utc::now(),
        };
        let TemplateResult::Failed(e) = build.record(&mut ran(Some(PackerFailure::Exit(1)))) else {
            panic!("a failed run is a failed template");
        };
        assert!(matches!(
            e,
            TemplateError::Packer {
                failure: PackerFailure::Exit(1),
                ..
            }
        ));
        assert_eq!(e.to_string(), "packer exited with code 1: boom (log: /logs/t.log)");
        let interrupted = build.record(&mut ran(Some(PackerFailure::Interrupted)));
        assert!(matches!(interrupted, TemplateResult::Cancelled), "{interrupted:?}");
        assert!(matches!(build.record(&mut ran(None)), TemplateResult::Ok));
    }
}
