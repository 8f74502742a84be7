//! The rename-old-images step: after a new image is published, older Glance
//! images of exactly the same name (and owner) are archived and their
//! members move to the new image.
//!
//! - [`credentials`]: `OS_*` variables (an RC file or the environment) into typed credentials.
//! - [`keystone`]: tokens (reused until shortly before expiry) and the image endpoint.
//! - [`glance`]: the Glance v2 calls a rotation needs.
//! - [`rotate`](mod@rotate): the plan (what is to be done, read-only) and its execution;
//!   [`preview`] plans for an image not built yet (`plan --rotation`).
//! - [`gate`]: staging, promoting and marking broken (rabbit2packer's test gate).
//! - [`rollback`](mod@rollback): the newest archive of a name takes it back.
//! - [`show`](mod@show): what Glance holds for a name (live, archives, broken).
//!
//! API contract used by rabbit2packer (keep it stable):
//! - [`Target`]: which new image to rotate for.
//! - [`RotateOptions`]: from `[rabbit2packer]` rotation keys.
//! - [`credentials_from_rc`]: sources an admin RC file (a blocking bash run;
//!   rabbit2packer calls it on the blocking pool).
//! - [`rotate_with_credentials`]: authenticates, rotates.
//! - [`RotateError`], [`Report`]: what a rotation failed on, or what it did.
//!
//! Not here: deciding when to rotate (rabbit2packer does, after a build) and
//! retrying a failed rotation later (rabbit2packer's job, with backoff).

pub mod cli;
pub mod credentials;
pub mod gate;
pub mod glance;
pub mod keystone;
pub mod rollback;
pub mod rotate;
pub mod show;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use packuilon_common::config::RotationConfig;
use packuilon_common::rcfile::RcFileError;

pub use credentials::{Credentials, CredentialsError};
pub use glance::Glance;
pub use keystone::Session;
pub use rollback::{rollback, rollback_again, RollbackReport};
pub use rotate::{plan, preview, rotate, Plan};
pub use show::{show, Role, ShownImage};

/// Which image is the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The new image's Glance ID (Packer's openstack artifact).
    ImageId(String),
    /// The newest active image with exactly this name, created at or after
    /// `created_after` (RFC 3339) when given.
    Name {
        name: String,
        created_after: Option<String>,
    },
}

/// How to rotate.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    pub archive_name: String,
    pub hide_archived: bool,
    pub keep_archives: Option<u32>,
    /// BROKEN_NAME: what a rollback renames the image it takes off its name to.
    pub broken_name: String,
    pub dry_run: bool,
}

impl From<&RotationConfig> for RotateOptions {
    fn from(c: &RotationConfig) -> Self {
        RotateOptions {
            archive_name: c.archive_name.clone(),
            hide_archived: c.hide_archived,
            keep_archives: c.keep_archives,
            broken_name: c.broken_name.clone(),
            dry_run: false,
        }
    }
}

impl Default for RotateOptions {
    fn default() -> Self {
        RotateOptions::from(&RotationConfig::default())
    }
}

/// What a rotation did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub new_image_id: String,
    pub name: String,
    /// (image id, old name, archive name)
    pub archived: Vec<(String, String, String)>,
    /// (member project id, from image id, to image id)
    pub members_moved: Vec<(String, String, String)>,
    pub deleted: Vec<String>,
    /// Nothing to rotate (e.g. no image of that name found).
    pub skipped: Option<String>,
    /// Images of that name not touched, and why: (image id, reason).
    pub left_alone: Vec<(String, String)>,
    /// Archives KEEP_ARCHIVES would delete but kept: (image id, reason).
    pub kept: Vec<(String, String)>,
    /// The new image was private and was made `shared` to receive members.
    pub shared_new_image: bool,
    /// This report is a plan: nothing was changed.
    pub dry_run: bool,
    /// HTTP requests made (Keystone and Glance).
    pub http_requests: u64,
}

/// Why a rotation failed: names the HTTP status and Glance's message, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The credentials are incomplete or unusable (a configuration problem).
    #[error("credentials: {0}")]
    Credentials(String),
    /// The admin RC file could not be sourced.
    #[error(transparent)]
    RcFile(#[from] RcFileError),
    /// A request failed: no answer (`status` None) or an error status.
    #[error("{service} {method} {url}: {}{message}", status.map(|s| format!("HTTP {s}: ")).unwrap_or_default())]
    Http {
        service: &'static str,
        method: String,
        url: String,
        status: Option<u16>,
        message: String,
    },
    /// The new image is not usable (not found, not active, no name).
    #[error("{0}")]
    NewImage(String),
    /// A rollback found nothing to roll back, or no active archive to restore
    /// (the message names the image name).
    #[error("{0}")]
    NothingToRollBack(String),
    #[error("{0}")]
    Other(String),
}

impl RotateError {
    pub(crate) fn http(service: &'static str, method: &str, url: &str, status: Option<u16>, message: String) -> Self {
        RotateError::Http {
            service,
            method: method.to_string(),
            url: url.to_string(),
            status,
            message,
        }
    }

    /// The HTTP status of a failed request, if one was answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            RotateError::Http { status, .. } => *status,
            _ => None,
        }
    }

    /// A configuration problem (fix the RC file or config), not a failure of the services.
    pub fn is_config(&self) -> bool {
        matches!(self, RotateError::Credentials(_) | RotateError::RcFile(_))
    }
}

impl From<CredentialsError> for RotateError {
    fn from(e: CredentialsError) -> Self {
        RotateError::Credentials(e.to_string())
    }
}

/// `OS_*` variables from `admin_rc` (sourced by bash) over the process environment's.
pub fn credentials_from_rc(admin_rc: &Path) -> Result<Credentials, RotateError> {
    let mut env: BTreeMap<String, String> = Credentials::process_env();
    env.extend(
        packuilon_common::rcfile::source(admin_rc)?
            .into_iter()
            .filter(|(k, _)| k.starts_with("OS_")),
    );
    Credentials::from_env(&env).map_err(|e| RotateError::Credentials(format!("{}: {e}", admin_rc.display())))
}

/// Authenticates with `creds` and rotates (see [`rotate::rotate`]).
pub async fn rotate_with_credentials(
    creds: Credentials,
    target: Target,
    opts: &RotateOptions,
) -> Result<Report, RotateError> {
    let glance = Glance::new(Arc::new(Session::new(creds)?));
    rotate(&glance, target, opts).await
}

/// Sources `admin_rc` with bash, authenticates with Keystone and rotates.
pub async fn rotate_with_rc(admin_rc: &Path, target: Target, opts: &RotateOptions) -> Result<Report, RotateError> {
    let creds = credentials_from_rc(admin_rc)?;
    rotate_with_credentials(creds, target, opts).await
}

#[cfg(test)]
mod tests {
    /// rabbit2packer runs rotations in spawned tasks.
    #[test]
    fn rotate_with_rc_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let opts = super::RotateOptions::default();
        let fut = super::rotate_with_rc(
            std::path::Path::new("/nonexistent"),
            super::Target::ImageId("x".into()),
            &opts,
        );
        assert_send(&fut);
    }
}
