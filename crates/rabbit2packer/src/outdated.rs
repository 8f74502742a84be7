//! Outdated images: an image is outdated when the source image its newest
//! succeeded build was made from (recorded in the journal, and on the image
//! as `packuilon_source_image`) is no longer IMAGES_CONFIG's entry for its
//! `<os><version>-<arch>`. `status`, the API and the page mark them;
//! `rebuild --outdated` (or REBUILD_OUTDATED, when the file changes) queues
//! a build of each with its last profile.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::journal::{Journal, JournalError};

/// One outdated image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outdated {
    pub image_key: String,
    /// Its newest succeeded job.
    pub job: i64,
    /// The source image that job built from.
    pub built_from: String,
    /// IMAGES_CONFIG's entry now.
    pub current: String,
}

/// The source images of IMAGES_CONFIG (`<os><version>-<arch>` -> ID).
pub fn read_source_images(images_file: &Path) -> Result<BTreeMap<String, String>, String> {
    crate::catalog::load_images(images_file).map_err(|e| e.to_string())
}

/// The `<os><version>-<arch>` of an image key (`<personality>-<os><version>-<arch>`)
/// among `keys`: the longest one the image key ends with.
fn source_key_of<'a>(image_key: &str, keys: impl Iterator<Item = &'a String>) -> Option<&'a String> {
    keys.filter(|k| {
        image_key.len() > k.len() + 1
            && image_key.ends_with(k.as_str())
            && image_key.as_bytes()[image_key.len() - k.len() - 1] == b'-'
    })
    .max_by_key(|k| k.len())
}

/// The outdated images, by image key. An image whose `<os><version>-<arch>`
/// has no entry now is not outdated (nothing to build it from).
pub fn find(journal: &Journal, source_images: &BTreeMap<String, String>) -> Result<Vec<Outdated>, JournalError> {
    Ok(among(journal.built_from()?, source_images))
}

/// [`find`] on the site journal (STATE_DB): whichever daemon built them.
pub async fn find_on_site(
    site: &crate::site_journal::SiteJournal,
    source_images: &BTreeMap<String, String>,
) -> Result<Vec<Outdated>, crate::site_journal::SiteJournalError> {
    Ok(among(site.built_from().await?, source_images))
}

/// The outdated ones among the newest builds of each image (image key,
/// job, source image).
fn among(built_from: Vec<(String, i64, String)>, source_images: &BTreeMap<String, String>) -> Vec<Outdated> {
    built_from
        .into_iter()
        .filter_map(|(image_key, job, built_from)| {
            let key = source_key_of(&image_key, source_images.keys())?;
            let current = &source_images[key];
            (*current != built_from).then(|| Outdated {
                image_key,
                job,
                built_from,
                current: current.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_key_is_the_longest_suffix_after_a_dash() {
        let keys: Vec<String> = ["7x-x86_64", "sl7x-x86_64", "x86_64"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            source_key_of("inventory-sl7x-x86_64", keys.iter()).map(String::as_str),
            Some("sl7x-x86_64")
        );
        assert_eq!(
            source_key_of("sl7x-x86_64", keys.iter()).map(String::as_str),
            Some("x86_64")
        );
        assert_eq!(
            source_key_of("web-el9x-x86_64", keys.iter()).map(String::as_str),
            Some("x86_64")
        );
        assert_eq!(source_key_of("web-el9x-aarch64", keys.iter()), None);
    }
}
