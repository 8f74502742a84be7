//! One job from start to end: profile -> names -> templates -> for each
//! template (one after another, as the original) a rendered build file, a
//! packer run with its build log, and the rotation of the image it made.
//! Every step is recorded in the journal as it happens.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use packuilon_common::config::Rabbit2PackerConfig;
use packuilon_common::profile::ImageNames;
use tokio_util::sync::CancellationToken;

use crate::build_log::{BuildLog, Summary};
use crate::catalog::LiveCatalog;
use crate::journal::{JobRef, JobState, Journal};
use crate::render::{self, Values};
use crate::runner::{self, PackerCommand, Spawner, Stream};

/// Everything a worker needs, shared by all workers.
#[derive(Debug)]
pub struct Context {
    pub config: Rabbit2PackerConfig,
    pub journal: Arc<Journal>,
    pub catalog: Arc<LiveCatalog>,
    pub spawner: Spawner,
    /// Fires when the daemon stops: running builds are interrupted.
    pub stop: CancellationToken,
    pub boot_id: String,
    /// Pauses between rotation attempts (a few, growing).
    pub rotation_backoff: Vec<Duration>,
    /// PACKER_AUTH_FILE's exports.
    pub auth_env: AuthEnv,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub state: JobState,
    pub error: Option<String>,
}

impl Finished {
    fn failed(error: impl Into<String>) -> Finished {
        Finished {
            state: JobState::Failed,
            error: Some(error.into()),
        }
    }
}

/// Runs `job` on worker `thread` (`Thread-N`) and returns its final state.
/// Journal writes that fail are logged; they never stop the build.
pub async fn execute(ctx: &Context, thread: &str, job: &JobRef) -> Finished {
    let names = match crate::consumer::image_names(&job.body) {
        Ok(n) => n,
        // Checked when the message arrived; only a journal edited by hand gets here.
        Err(e) => {
            tracing::error!("{thread}: could not decode profile, malformed json? Continuing ({e})");
            return Finished::failed(e.to_string());
        }
    };
    let key = names.image_key();
    let catalog = ctx.catalog.refresh();
    let Some(choice) = catalog.templates_for(&key) else {
        let e = format!(
            "no Packer template for {key} and no {} entry in {}",
            crate::catalog::DEFAULT_KEY,
            catalog.map_file().display()
        );
        tracing::error!("{thread}: {e}");
        return Finished::failed(e);
    };
    if choice.default {
        tracing::info!("No Packer template defined for {key}. Using the default values");
    }
    let source_key = names.source_key();
    let Some(source_image) = catalog.source_image(&source_key) else {
        tracing::error!("{thread}: source image was not found, check IMAGES_CONFIG. Continuing");
        return Finished::failed(format!(
            "source image was not found for {source_key} in {} (IMAGES_CONFIG)",
            catalog.images_file().display()
        ));
    };
    let values = Values::new(&names, source_image);

    let env = match packer_env(ctx).await {
        Ok(env) => env,
        Err(e) => {
            tracing::error!("{thread}: {key}: {e}");
            return Finished::failed(e);
        }
    };

    let mut errors = Vec::new();
    for template in &choice.templates {
        if ctx.stop.is_cancelled() {
            return Finished {
                state: JobState::Interrupted,
                error: Some("interrupted: rabbit2packer stopped".into()),
            };
        }
        let tname = render::template_name(template);
        let result = build_template(ctx, thread, job, &names, &values, &env, template, &catalog).await;
        match result {
            TemplateResult::Ok => {}
            TemplateResult::Cancelled => {
                return Finished {
                    state: JobState::Interrupted,
                    error: Some(format!("interrupted during {tname}: rabbit2packer stopped")),
                }
            }
            TemplateResult::Failed(e) => errors.push(format!("{tname}: {e}")),
        }
    }
    if errors.is_empty() {
        Finished {
            state: JobState::Succeeded,
            error: None,
        }
    } else {
        Finished::failed(errors.join("; "))
    }
}

enum TemplateResult {
    Ok,
    Failed(String),
    Cancelled,
}

/// What PACKER_AUTH_FILE exports, sourced by bash again whenever the file
/// changes (so an edited RC file needs no restart, and no bash runs between
/// a request and its packer start otherwise).
#[derive(Debug, Default)]
pub struct AuthEnv {
    cached: std::sync::Mutex<Option<(FileStamp, BTreeMap<String, String>)>>,
}

type FileStamp = Option<(std::time::SystemTime, u64, u64)>;

fn file_stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl AuthEnv {
    async fn exports(&self, file: &Path) -> Result<BTreeMap<String, String>, String> {
        let stamp = file_stamp(file);
        if let Some((s, env)) = &*self.cached.lock().unwrap_or_else(|p| p.into_inner()) {
            if stamp.is_some() && *s == stamp {
                return Ok(env.clone());
            }
        }
        let owned = file.to_path_buf();
        let env = tokio::task::spawn_blocking(move || packuilon_common::rcfile::source(&owned))
            .await
            .map_err(|e| format!("sourcing PACKER_AUTH_FILE: {e}"))?
            .map_err(|e| format!("PACKER_AUTH_FILE {e}"))?;
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((stamp, env.clone()));
        Ok(env)
    }
}

/// The daemon's environment plus what PACKER_AUTH_FILE exports plus the
/// original's aliases, and HOME (STATE_DIR) when the daemon has none.
async fn packer_env(ctx: &Context) -> Result<BTreeMap<String, String>, String> {
    let mut env = ctx.auth_env.exports(&ctx.config.packer_auth_file).await?;
    let lookup = |env: &BTreeMap<String, String>, k: &str| env.get(k).cloned().or_else(|| std::env::var(k).ok());
    if !env.contains_key("OS_TENANT_ID") {
        if let Some(v) = lookup(&env, "OS_PROJECT_ID") {
            env.insert("OS_TENANT_ID".into(), v);
        }
    }
    // Packer keeps its config under $HOME; a system service may have none.
    if lookup(&env, "HOME").is_none() {
        env.insert("HOME".into(), ctx.config.state_dir.display().to_string());
    }
    if !env.contains_key("OS_DOMAIN_NAME") {
        if let Some(v) = lookup(&env, "OS_USER_DOMAIN_NAME") {
            env.insert("OS_DOMAIN_NAME".into(), v);
        }
    }
    Ok(env)
}

#[allow(clippy::too_many_arguments)]
async fn build_template(
    ctx: &Context,
    thread: &str,
    job: &JobRef,
    names: &ImageNames,
    values: &Values,
    env: &BTreeMap<String, String>,
    template: &Path,
    catalog: &crate::catalog::Catalog,
) -> TemplateResult {
    let key = names.image_key();
    let tname = render::template_name(template);
    let cfg = &ctx.config;
    let Some(text) = catalog.template_text(template) else {
        return TemplateResult::Failed(format!("template {} is not in the catalog", template.display()));
    };
    let (rendered, rendered_json) = match render::render(&text, values) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{thread}: {}: {e}", template.display());
            return TemplateResult::Failed(format!("{}: {e}", template.display()));
        }
    };
    let build_file = render::build_file_path(&cfg.build_file_dir, &key, template);
    if let Err(e) = render::write_atomic(&build_file, &rendered) {
        let e = format!("cannot write build file {}: {e}", build_file.display());
        tracing::error!("{thread}: {e}");
        return TemplateResult::Failed(e);
    }
    let mut log = match BuildLog::create(&cfg.log_dir, &key, &tname, cfg.log_keep) {
        Ok(l) => l,
        Err(e) => {
            let e = format!("cannot create a build log in {} (LOG_DIR): {e}", cfg.log_dir.display());
            tracing::error!("{thread}: {e}");
            return TemplateResult::Failed(e);
        }
    };
    let log_path = log.path().to_path_buf();
    let build_id = ctx
        .journal
        .start_build(job.id, &tname, &log_path, &build_file)
        .map_err(|e| tracing::error!("{thread}: {e}"))
        .ok();
    tracing::info!("packer build starting, see: {} for details", log_path.display());
    let started = chrono::Utc::now();

    let cmd = PackerCommand {
        packer: cfg.packer_path.clone(),
        build_file: build_file.clone(),
        env: env.clone(),
        cwd: build_file.parent().map(Path::to_path_buf),
    };
    let journal = ctx.journal.clone();
    let boot_id = ctx.boot_id.clone();
    let outcome = runner::run(
        &ctx.spawner,
        cmd,
        cfg.build_timeout,
        cfg.stop_timeout,
        &ctx.stop,
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

    let started_packer = outcome.is_ok();
    let (rc, error, cancelled) = match outcome {
        Err(e) => {
            let e = format!("cannot run {} (PACKER_PATH): {e}", cfg.packer_path.display());
            log.note(&e);
            (127, Some(e), false)
        }
        Ok(o) if o.timed_out => {
            let e = format!(
                "build timed out after {} (BUILD_TIMEOUT); packer was interrupted",
                humanize(cfg.build_timeout)
            );
            log.note(&e);
            (o.exit_code, Some(e), false)
        }
        Ok(o) if o.cancelled => {
            log.note("rabbit2packer is stopping: packer was interrupted (SIGINT to its process group)");
            (
                o.exit_code,
                Some("interrupted: rabbit2packer stopped".to_string()),
                true,
            )
        }
        Ok(o) if o.exit_code != 0 => (
            o.exit_code,
            Some(format!("packer exited with code {}", o.exit_code)),
            false,
        ),
        Ok(o) => (o.exit_code, None, false),
    };
    let summary = match log.finish(rc) {
        Ok(s) => s,
        // The build's result stands whatever became of its log.
        Err(unfinished) => {
            tracing::error!("{thread}: build log {}: {unfinished}", log_path.display());
            unfinished.summary
        }
    };
    let error = error.map(|e| match &summary.last_error {
        Some(last) if !cancelled => format!("{e}: {last} (log: {})", log_path.display()),
        _ => format!("{e} (log: {})", log_path.display()),
    });
    if let Some(b) = build_id {
        if let Err(e) = ctx
            .journal
            .finish_build(b, Some(rc), summary.artifact_id().as_deref(), error.as_deref())
        {
            tracing::error!("{thread}: {e}");
        }
    }
    if cancelled {
        return TemplateResult::Cancelled;
    }
    if let Some(e) = error {
        if started_packer {
            tracing::error!("{thread}: packer exited with non zero exit code, {key}.{tname} build failed");
        } else {
            tracing::error!("{thread}: packer could not be started, {key}.{tname} build failed: {e}");
        }
        return TemplateResult::Failed(e);
    }
    tracing::info!("{thread}: image built successfully: {key}.{tname}");

    let rotation = rotate(ctx, thread, &summary, &rendered_json, values, started).await;
    if let Some(b) = build_id {
        if let Err(e) = ctx.journal.set_rotation(b, &rotation) {
            tracing::error!("{thread}: {e}");
        }
    }
    TemplateResult::Ok
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 && s % 3600.0 == 0.0 {
        format!("{}h", s / 3600.0)
    } else if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{}m", s / 60.0)
    } else {
        format!("{s}s")
    }
}

/// The rename-old-images step for what this template build produced.
/// Returns the journal's rotation field: `skipped: ...`, `done: ...` or
/// `failed: ...` (after a few attempts; the image is not rebuilt for it).
async fn rotate(
    ctx: &Context,
    thread: &str,
    summary: &Summary,
    rendered: &serde_json::Value,
    values: &Values,
    started: chrono::DateTime<chrono::Utc>,
) -> String {
    let rc = &ctx.config.rotation;
    let Some(admin_rc) = rc.admin_auth_file.clone() else {
        return "skipped: rotation is off (no PACKER_ADMIN_AUTH_FILE)".to_string();
    };
    let images = summary.openstack_images();
    let targets: Vec<glance_rotate::Target> = if images.is_empty() {
        vec![glance_rotate::Target::Name {
            name: render::image_name(rendered, &values.raw_name),
            created_after: Some(started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        }]
    } else {
        images.into_iter().map(glance_rotate::Target::ImageId).collect()
    };
    let opts = glance_rotate::RotateOptions::from(rc);
    let mut results = Vec::new();
    for target in targets {
        results.push(rotate_one(ctx, thread, &admin_rc, target, &opts).await);
    }
    if let Some(failed) = results.iter().find(|r| r.starts_with("failed")) {
        return failed.clone();
    }
    results.join("; ")
}

async fn rotate_one(
    ctx: &Context,
    thread: &str,
    admin_rc: &Path,
    target: glance_rotate::Target,
    opts: &glance_rotate::RotateOptions,
) -> String {
    let what = match &target {
        glance_rotate::Target::ImageId(id) => format!("image {id}"),
        glance_rotate::Target::Name { name, .. } => format!("image named {name:?}"),
    };
    let attempts = ctx.rotation_backoff.len() + 1;
    let mut last = String::new();
    for attempt in 1..=attempts {
        match rotate_call(admin_rc, target.clone(), opts).await {
            Ok(report) => {
                if let Some(why) = report.skipped {
                    tracing::info!("{thread}: rotation of {what} skipped: {why}");
                    return format!("skipped: {why}");
                }
                let done = format!(
                    "done: {} ({}): archived {}, moved {} member(s), deleted {}",
                    report.name,
                    report.new_image_id,
                    report.archived.len(),
                    report.members_moved.len(),
                    report.deleted.len()
                );
                tracing::info!("{thread}: rotation of {what} {done}");
                return done;
            }
            Err(e) => {
                last = e;
                tracing::warn!("{thread}: rotation of {what} failed (attempt {attempt}/{attempts}): {last}");
                if let Some(pause) = ctx.rotation_backoff.get(attempt - 1) {
                    tokio::select! {
                        _ = tokio::time::sleep(*pause) => {}
                        _ = ctx.stop.cancelled() => break,
                    }
                }
            }
        }
    }
    tracing::error!("{thread}: built, rotation failed for {what}: {last}");
    format!("failed after {attempts} attempt(s): {last}")
}

/// One glance-rotate call: the admin RC file is sourced by bash on the
/// blocking pool (a process and its wait), the HTTP calls run on the runtime.
async fn rotate_call(
    admin_rc: &Path,
    target: glance_rotate::Target,
    opts: &glance_rotate::RotateOptions,
) -> Result<glance_rotate::Report, String> {
    let rc = admin_rc.to_path_buf();
    let creds = tokio::task::spawn_blocking(move || glance_rotate::credentials_from_rc(&rc))
        .await
        .map_err(|e| format!("sourcing {} failed: {e}", admin_rc.display()))?
        .map_err(|e| e.to_string())?;
    glance_rotate::rotate_with_credentials(creds, target, opts)
        .await
        .map_err(|e| e.to_string())
}
