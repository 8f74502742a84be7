//! `rabbit2packer plan PROFILE.json`: what a build of this profile would
//! do, without building anything: the image key, the templates chosen (and
//! why), the source image, each rendered build file and what `packer
//! validate` says of it; with `--rotation`, what the rotation would archive
//! and which members it would move (read-only Glance calls). The same steps
//! as a job ([`crate::job`]), stopped before packer builds: consumer's
//! profile decoding, the catalog's choice, render's substitution, the test
//! gate's names, glance-rotate's plan.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::catalog::Catalog;
use crate::daemon::Settings;
use crate::render::{self, Values};

/// What `plan` found: the report to print and whether a build would fail.
#[derive(Debug)]
pub struct Plan {
    pub report: String,
    /// Everything would build (exit 0); else the report names what fails (exit 1).
    pub ok: bool,
}

/// A plan that cannot be made: the profile or the catalog cannot be read (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}: cannot read: {source}", .path.display())]
    Profile { path: PathBuf, source: std::io::Error },
    #[error("{}: not a profile rabbit2packer can build: {problem}", .path.display())]
    NotAProfile { path: PathBuf, problem: String },
    /// The template map or the source images (each broken file named).
    #[error("{0}")]
    Catalog(String),
    #[error("{}: cannot write the build file: {source}", .path.display())]
    Out { path: PathBuf, source: std::io::Error },
}

/// Plans the build of the profile in `profile`; with `out`, the rendered
/// build files are written there (else to a temporary directory, for
/// `packer validate`, and removed).
pub fn plan(settings: &Settings, profile: &Path, out: Option<&Path>, rotation: bool) -> Result<Plan, PlanError> {
    let body = std::fs::read(profile).map_err(|source| PlanError::Profile {
        path: profile.to_path_buf(),
        source,
    })?;
    let names = crate::consumer::image_names(&body).map_err(|e| PlanError::NotAProfile {
        path: profile.to_path_buf(),
        problem: e.to_string(),
    })?;
    let cfg = &settings.r2p;
    let catalog =
        Catalog::load(&cfg.packer_template_map, &cfg.images_config).map_err(|e| PlanError::Catalog(e.to_string()))?;
    let key = names.image_key();
    let mut report = String::new();
    let mut ok = true;
    let _ = writeln!(report, "profile: {}", profile.display());
    let _ = writeln!(report, "image key: {key}");
    let _ = writeln!(report, "image name: {}", names.name());

    let Some(choice) = catalog.templates_for(&key) else {
        let _ = writeln!(
            report,
            "FAIL templates: no entry for {key} and no DEFAULT in {}",
            cfg.packer_template_map.display()
        );
        return Ok(Plan { report, ok: false });
    };
    let why = if choice.default {
        format!("the DEFAULT entry of {}", cfg.packer_template_map.display())
    } else {
        format!("its own entry in {}", cfg.packer_template_map.display())
    };
    let _ = writeln!(report, "templates ({why}):");
    for t in &choice.templates {
        let _ = writeln!(report, "  {}", t.display());
    }
    let source_key = names.source_key();
    let Some(source_image) = catalog.source_image(&source_key) else {
        let _ = writeln!(
            report,
            "FAIL source image: no {source_key:?} in {} (IMAGES_CONFIG)",
            cfg.images_config.display()
        );
        return Ok(Plan { report, ok: false });
    };
    let _ = writeln!(report, "source image: {source_image} (entry {source_key:?})");
    let values = Values::new(&names, source_image);

    let scratch;
    let dir = match out {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|source| PlanError::Out {
                path: d.to_path_buf(),
                source,
            })?;
            d.to_path_buf()
        }
        None => {
            scratch = tempfile::tempdir().map_err(|source| PlanError::Out {
                path: std::env::temp_dir(),
                source,
            })?;
            scratch.path().to_path_buf()
        }
    };
    let env = packer_env(settings);
    if let Some(command) = &cfg.gate.test_command {
        let _ = writeln!(
            report,
            "test gate: each new image waits as {:?} while TEST_COMMAND runs (timeout {}): {}",
            glance_rotate::gate::render_name(&cfg.gate.staged_name, &names.name(), chrono::Local::now()),
            crate::job::humanize(cfg.gate.test_timeout),
            packuilon_common::logging::escape_control(command)
        );
    }
    let mut preview = rotation.then(|| Preview::new(settings));
    for template in &choice.templates {
        let _ = writeln!(report, "== {}", template.display());
        let Some(text) = catalog.template_text(template) else {
            let _ = writeln!(report, "FAIL template: not readable when the catalog was loaded");
            ok = false;
            continue;
        };
        let rendered = match render::render(&text, &values) {
            Ok((rendered, json)) => {
                let image = render::image_name(&json, &names.name());
                let _ = writeln!(report, "image: {image}");
                if let Some(p) = preview.as_mut() {
                    ok &= p.report(&image, &mut report);
                }
                rendered
            }
            Err(e) => {
                let _ = writeln!(report, "FAIL render: {e}");
                ok = false;
                continue;
            }
        };
        let build_file = render::build_file_path(&dir, &key, template);
        render::write_atomic(&build_file, &rendered).map_err(|source| PlanError::Out {
            path: build_file.clone(),
            source,
        })?;
        if out.is_some() {
            let _ = writeln!(report, "build file: {}", build_file.display());
        }
        match validate(&cfg.packer_path, &build_file, &dir, &env) {
            Ok(()) => {
                let _ = writeln!(report, "packer validate: ok");
            }
            Err(why) => {
                let _ = writeln!(report, "FAIL packer validate: {why}");
                ok = false;
            }
        }
    }
    Ok(Plan { report, ok })
}

/// `--rotation`: glance-rotate's plan for a new image of a name, made with
/// read-only calls on the rotation's credentials.
struct Preview {
    rt: Option<tokio::runtime::Runtime>,
    glance: Result<glance_rotate::Glance, String>,
    opts: glance_rotate::RotateOptions,
}

impl Preview {
    fn new(settings: &Settings) -> Preview {
        let cfg = &settings.r2p;
        let opts = glance_rotate::RotateOptions {
            dry_run: true,
            ..glance_rotate::RotateOptions::from(&cfg.rotation)
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
        // The rotation's admin credentials; without them (rotation off) the
        // builder's, which see the images of its own project.
        let rc = cfg
            .rotation
            .admin_auth_file
            .clone()
            .unwrap_or_else(|| cfg.packer_auth_file.clone());
        let glance = glance_rotate::credentials_from_rc(&rc)
            .and_then(glance_rotate::Session::new)
            .map(|s| glance_rotate::Glance::new(std::sync::Arc::new(s)))
            .map_err(|e| format!("{}: {e}", rc.display()));
        Preview { rt, glance, opts }
    }

    /// Writes what the rotation would do for a new image named `name`;
    /// false when it cannot be told (named in a FAIL line).
    fn report(&mut self, name: &str, out: &mut String) -> bool {
        let (Some(rt), Ok(glance)) = (&self.rt, &self.glance) else {
            let why = match &self.glance {
                Err(e) => e.clone(),
                Ok(_) => "no async runtime".to_string(),
            };
            let _ = writeln!(out, "FAIL rotation: cannot ask Glance: {why}");
            return false;
        };
        let r = match rt.block_on(glance_rotate::rotate::preview(glance, name, None, &self.opts)) {
            Ok(r) => r,
            Err(e) => {
                let _ = writeln!(out, "FAIL rotation: {e}");
                return false;
            }
        };
        let esc = |s: &str| packuilon_common::logging::escape_control(s).into_owned();
        let _ = writeln!(out, "rotation (read-only preview, as if the new image were made now):");
        if r.archived.is_empty() {
            let _ = writeln!(out, "  nothing to archive: no older image named {:?}", esc(name));
        }
        for (id, old, archive) in &r.archived {
            let _ = writeln!(out, "  would archive {id} {:?} as {:?}", esc(old), esc(archive));
        }
        if r.shared_new_image {
            let _ = writeln!(out, "  would make the new image shared to receive members");
        }
        for (member, from, _) in &r.members_moved {
            let _ = writeln!(out, "  would move member {} from {from} to the new image", esc(member));
        }
        for id in &r.deleted {
            let _ = writeln!(out, "  would delete archive {id} (KEEP_ARCHIVES)");
        }
        for (id, why) in r.kept.iter().chain(&r.left_alone) {
            let _ = writeln!(out, "  would leave {id} alone: {}", esc(why));
        }
        true
    }
}

/// Packer's environment as a build has it, from PACKER_AUTH_FILE's exports
/// when it can be read (a build would fail without them; `validate` mostly
/// does not need them).
fn packer_env(settings: &Settings) -> BTreeMap<String, String> {
    let exports = packuilon_common::rcfile::source(&settings.r2p.packer_auth_file).unwrap_or_default();
    crate::job::packer_env_from(exports, &settings.r2p.state_dir)
}

/// `packer validate` on one build file, in its directory, as a build runs it.
fn validate(packer: &Path, build_file: &Path, dir: &Path, env: &BTreeMap<String, String>) -> Result<(), String> {
    let out = Command::new(packer)
        .arg("validate")
        .arg(build_file)
        .current_dir(dir)
        .envs(env)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", packer.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Bounded, one line: packer's own words, control characters escaped.
    let words: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let words: String = words.chars().take(600).collect();
    let words = packuilon_common::logging::escape_control(&words);
    Err(format!("exit {}: {words}", out.status.code().unwrap_or(-1)))
}
