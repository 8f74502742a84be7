//! `rename-old-images --show NAME`: what Glance holds for a name, read-only.
//! The live image(s) (visible images named exactly NAME, any status), its
//! archives (`packuilon_archive_of=NAME`, hidden ones included) and its
//! broken images (`packuilon_broken_of=NAME`: failed their test, or taken
//! off the name by a rollback), each with its state and the provenance
//! properties ([`gate::PROVENANCE_PROPERTIES`]) it carries. Images staged
//! for a test are not listed: only rabbit2packer knows STAGED_NAME.

use std::collections::BTreeMap;

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::gate::{self, BROKEN_AT, BROKEN_OF};
use crate::glance::{Glance, Hidden, Image};
use crate::rollback::{RESTORED_FROM, ROLLED_BACK_TO};
use crate::rotate::{ARCHIVED_AT, ARCHIVE_OF};
use crate::RotateError;

/// What an image is to the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Live,
    Archive,
    Broken,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Live => "live",
            Role::Archive => "archive",
            Role::Broken => "broken",
        }
    }
}

/// One image of a name, as `--show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShownImage {
    pub role: Role,
    pub id: String,
    pub name: String,
    pub owner: Option<String>,
    pub status: String,
    pub visibility: String,
    pub os_hidden: bool,
    pub created_at: String,
    pub archived_at: Option<String>,
    pub broken_at: Option<String>,
    /// Member projects (only a shared image has any).
    pub members: usize,
    /// A restored image: the image it took the name back from.
    pub restored_from: Option<String>,
    /// An image a rollback took off the name: the image restored instead.
    pub rolled_back_to: Option<String>,
    /// The provenance properties it has.
    pub properties: BTreeMap<String, String>,
}

/// Requests in flight at once for member counts.
const CONCURRENCY: usize = 4;

/// Live images of `name` (newest first), then its archives (newest archived
/// first), then its broken images (newest first). Empty: Glance knows none.
pub async fn show(glance: &Glance, name: &str) -> Result<Vec<ShownImage>, RotateError> {
    if name.trim().is_empty() {
        return Err(RotateError::NewImage("empty image name".into()));
    }
    let mut found: Vec<(Role, Image)> = Vec::new();
    for img in glance.list_named(name, Hidden::No, &[]).await? {
        found.push((Role::Live, img));
    }
    for img in glance.list_visible_and_hidden(&[(ARCHIVE_OF, name)]).await? {
        if img.property(ARCHIVE_OF) == Some(name) {
            found.push((Role::Archive, img));
        }
    }
    for img in glance.list_visible_and_hidden(&[(BROKEN_OF, name)]).await? {
        if img.property(BROKEN_OF) == Some(name) {
            found.push((Role::Broken, img));
        }
    }
    // One row per image, the first role found (live, archive, broken).
    let mut seen = std::collections::HashSet::new();
    found.retain(|(_, img)| seen.insert(img.id.clone()));
    let when = |role: Role, img: &Image| -> String {
        match role {
            Role::Live => img.created_at.clone(),
            Role::Archive => img.property(ARCHIVED_AT).unwrap_or(&img.created_at).to_string(),
            Role::Broken => img.property(BROKEN_AT).unwrap_or(&img.created_at).to_string(),
        }
    };
    // RFC 3339 UTC with whole seconds: newest first by text is by time.
    found.sort_by(|(ra, a), (rb, b)| {
        ra.cmp(rb)
            .then_with(|| when(*rb, b).cmp(&when(*ra, a)))
            .then_with(|| b.created_at.cmp(&a.created_at))
            .then_with(|| b.id.cmp(&a.id))
    });

    let counts: Vec<_> = found.iter().map(|(_, img)| member_count(glance, img)).collect();
    let counts: Vec<usize> = stream::iter(counts).buffered(CONCURRENCY).try_collect().await?;
    Ok(found
        .into_iter()
        .zip(counts)
        .map(|((role, img), members)| ShownImage {
            role,
            id: img.id.clone(),
            name: img.name().to_string(),
            owner: img.owner.clone(),
            status: img.status.clone(),
            visibility: img.visibility.clone(),
            os_hidden: img.os_hidden,
            created_at: img.created_at.clone(),
            archived_at: img.property(ARCHIVED_AT).map(str::to_string),
            broken_at: img.property(BROKEN_AT).map(str::to_string),
            members,
            restored_from: img.property(RESTORED_FROM).map(str::to_string),
            rolled_back_to: img.property(ROLLED_BACK_TO).map(str::to_string),
            properties: gate::PROVENANCE_PROPERTIES
                .iter()
                .filter_map(|k| img.property(k).map(|v| (k.to_string(), v.to_string())))
                .collect(),
        })
        .collect())
}

async fn member_count(glance: &Glance, img: &Image) -> Result<usize, RotateError> {
    if img.visibility == "shared" {
        Ok(glance.members(&img.id).await?.len())
    } else {
        Ok(0)
    }
}
