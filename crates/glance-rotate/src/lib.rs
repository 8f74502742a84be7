//! The rename-old-images step: after a new image is published, older Glance
//! images of exactly the same name (and owner) are archived and their
//! members move to the new image.
//!
//! API contract used by rabbit2packer (keep it stable):
//! - [`Target`]: which new image to rotate for.
//! - [`RotateOptions`]: from `[rabbit2packer]` rotation keys.
//! - [`rotate_with_rc`]: sources an admin RC file, authenticates, rotates.

use std::path::Path;

use packuilon_common::config::RotationConfig;

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
    pub dry_run: bool,
}

impl From<&RotationConfig> for RotateOptions {
    fn from(c: &RotationConfig) -> Self {
        RotateOptions {
            archive_name: c.archive_name.clone(),
            hide_archived: c.hide_archived,
            keep_archives: c.keep_archives,
            dry_run: false,
        }
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
}

/// Why a rotation failed: names the HTTP status and Glance's message, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("{0}")]
    Other(String),
}

/// Sources `admin_rc` with bash, authenticates with Keystone and rotates.
pub async fn rotate_with_rc(admin_rc: &Path, target: Target, opts: &RotateOptions) -> Result<Report, RotateError> {
    let _ = (admin_rc, target, opts);
    Err(RotateError::Other("rotation not implemented yet".into()))
}
