//! `rabbit2packer rollback IMAGE_KEY`: the rollback of glance-rotate
//! (`rename-old-images --rollback`) for every image an image key's builds
//! make. The names come from the newest profile the journal holds for the
//! key, rendered with each of its templates as a build would render them;
//! the rotation's credentials (PACKER_ADMIN_AUTH_FILE) do the Glance calls.

use std::fmt::Write as _;

use crate::catalog::Catalog;
use crate::daemon::Settings;
use crate::journal::Journal;
use crate::render::{self, Values};

/// Why a rollback could not be tried (exit 2) or failed (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The image key, the journal or the configuration (exit 2).
    #[error("{0}")]
    Setup(String),
    /// A rollback failed; `report` holds what was done before (exit 1).
    #[error("{name:?}: {source}")]
    Failed {
        name: String,
        source: Box<glance_rotate::RotateError>,
        report: String,
    },
}

impl RollbackError {
    pub fn exit_code(&self) -> u8 {
        match self {
            RollbackError::Setup(_) => 2,
            RollbackError::Failed { .. } => 1,
        }
    }
}

/// The live names of `image_key`'s images: its newest journaled profile
/// rendered with each of its templates.
pub fn image_names(settings: &Settings, journal: &Journal, image_key: &str) -> Result<Vec<String>, RollbackError> {
    let setup = RollbackError::Setup;
    let Some((job, _, body)) = journal.last_body(image_key).map_err(|e| setup(e.to_string()))? else {
        let known = journal.image_keys(10).unwrap_or_default();
        return Err(setup(format!(
            "no profile of image {image_key:?} in the journal: its image names are not known{}",
            if known.is_empty() {
                String::new()
            } else {
                format!(" (images with jobs: {})", known.join(", "))
            }
        )));
    };
    let names = crate::consumer::image_names(&body).map_err(|e| setup(format!("the profile of job {job}: {e}")))?;
    let cfg = &settings.r2p;
    let catalog = Catalog::load(&cfg.packer_template_map, &cfg.images_config).map_err(|e| setup(e.to_string()))?;
    let choice = catalog.templates_for(image_key).ok_or_else(|| {
        setup(format!(
            "no template for {image_key} and no DEFAULT in {}",
            cfg.packer_template_map.display()
        ))
    })?;
    // The name does not depend on the source image; a key without one still has names.
    let source = catalog
        .source_image(&names.source_key())
        .unwrap_or("00000000-0000-0000-0000-000000000000");
    let values = Values::new(&names, source);
    let mut out: Vec<String> = Vec::new();
    for template in &choice.templates {
        let text = catalog
            .template_text(template)
            .ok_or_else(|| setup(format!("template {} could not be read", template.display())))?;
        let (_, json) = render::render(&text, &values).map_err(|e| setup(format!("{}: {e}", template.display())))?;
        let name = render::image_name(&json, &values.raw_name);
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Rolls back each image of `image_key` (see [`glance_rotate::rollback`]);
/// returns what was done, as text.
pub fn rollback(
    settings: &Settings,
    journal: &Journal,
    image_key: &str,
    again: bool,
    dry_run: bool,
) -> Result<String, RollbackError> {
    let names = image_names(settings, journal, image_key)?;
    let rotation = &settings.r2p.rotation;
    let Some(rc) = rotation.admin_auth_file.clone() else {
        return Err(RollbackError::Setup(
            "rollback needs the rotation's credentials: set PACKER_ADMIN_AUTH_FILE".into(),
        ));
    };
    let opts = glance_rotate::RotateOptions {
        dry_run,
        ..glance_rotate::RotateOptions::from(rotation)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RollbackError::Setup(format!("cannot start the async runtime: {e}")))?;
    let mut report = String::new();
    for name in names {
        let done = rt.block_on(async {
            let creds = glance_rotate::credentials_from_rc(&rc)?;
            let glance = glance_rotate::Glance::new(std::sync::Arc::new(glance_rotate::Session::new(creds)?));
            if again {
                glance_rotate::rollback_again(&glance, &name, &opts).await
            } else {
                glance_rotate::rollback(&glance, &name, &opts).await
            }
        });
        match done {
            Ok(r) => {
                tracing::info!("rollback of {name:?} ({image_key}): {}", r.text().trim_end());
                report.push_str(&r.text());
            }
            Err(source) => {
                let _ = writeln!(report, "FAIL {name:?}: {source}");
                return Err(RollbackError::Failed {
                    name,
                    source: Box::new(source),
                    report,
                });
            }
        }
    }
    Ok(report)
}
