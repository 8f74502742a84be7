//! The Glance side of rabbit2packer's test gate and of provenance: a new
//! image is staged (renamed STAGED_NAME, private) while it is tested, then
//! promoted (its live name back, ready for the rotation) or marked broken
//! (BROKEN_NAME, private, tagged with the name it failed for). Every step
//! sets a state, so running it again changes nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Local};
use serde_json::json;

use crate::glance::{Glance, Image, PatchOp};
use crate::RotateError;

/// Property of a broken image: the live name it failed for (or lost in a rollback).
pub const BROKEN_OF: &str = "packuilon_broken_of";
/// Property of a broken image: when it was taken off its name (RFC 3339, UTC).
pub const BROKEN_AT: &str = "packuilon_broken_at";

/// Where an image came from, as properties the build sets on it (when known):
/// the Aquilon names of its profile, its image key, the profile and template
/// it was built from (with their SHA-256), its source image, the rabbit2packer
/// job and build host, Packer's version and the build date.
/// `rename-old-images --show` prints them.
pub const PROVENANCE_PROPERTIES: &[&str] = &[
    "aq_personality",
    "aq_os",
    "aq_osversion",
    "aq_archetype",
    "aq_domain",
    "aq_sandbox",
    "packuilon_image_key",
    "packuilon_profile",
    "packuilon_profile_sha256",
    "packuilon_template",
    "packuilon_template_sha256",
    "packuilon_source_image",
    "packuilon_job",
    "packuilon_builder_host",
    "packuilon_packer_version",
    "image_build_date",
];

/// Glance keeps at most 255 characters of a property value.
pub const MAX_PROPERTY_LEN: usize = 255;

/// STAGED_NAME or BROKEN_NAME for `name` (same placeholders as ARCHIVE_NAME).
pub fn render_name(template: &str, name: &str, now: DateTime<Local>) -> String {
    crate::rotate::archive_name(template, name, now)
}

/// `value` cut to what Glance keeps (on a character boundary).
pub fn bounded(value: &str) -> String {
    if value.len() <= MAX_PROPERTY_LEN {
        return value.to_string();
    }
    let mut end = MAX_PROPERTY_LEN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_string()
}

fn set(image: &Image, key: &str, value: serde_json::Value) -> PatchOp {
    let exists = match key {
        "name" | "visibility" | "os_hidden" => true,
        k => image.extra.contains_key(k),
    };
    PatchOp::Set {
        path: format!("/{key}"),
        value,
        exists,
    }
}

/// Applies the `ops` that change something (none: no request).
async fn patch_changed(
    glance: &Glance,
    image: Image,
    ops: Vec<(&str, serde_json::Value)>,
) -> Result<Image, RotateError> {
    let changed: Vec<PatchOp> = ops
        .into_iter()
        .filter(|(k, v)| match *k {
            "name" => image.name.as_deref() != v.as_str(),
            "visibility" => Some(image.visibility.as_str()) != v.as_str(),
            "os_hidden" => Some(image.os_hidden) != v.as_bool(),
            k => image.extra.get(k) != Some(v),
        })
        .map(|(k, v)| set(&image, k, v))
        .collect();
    if changed.is_empty() {
        return Ok(image);
    }
    glance.patch(&image.id, &changed).await
}

/// Renames image `id` to `staged_name` and makes it private, so nobody boots
/// it by its live name while it is tested.
pub async fn stage(glance: &Glance, id: &str, staged_name: &str) -> Result<Image, RotateError> {
    let image = glance.image(id).await?;
    let image = patch_changed(
        glance,
        image,
        vec![("name", json!(staged_name)), ("visibility", json!("private"))],
    )
    .await?;
    tracing::info!("Staged image {id} as {staged_name:?} (private) for its test");
    Ok(image)
}

/// Gives image `id` its live name back (the rotation then runs for it).
pub async fn promote(glance: &Glance, id: &str, live_name: &str) -> Result<Image, RotateError> {
    let image = glance.image(id).await?;
    let image = patch_changed(glance, image, vec![("name", json!(live_name))]).await?;
    tracing::info!("Image {id} passed its test and takes the name {live_name:?}");
    Ok(image)
}

/// Renames image `id` to `broken_name`, makes it private and tags it with
/// the live name it was for.
pub async fn mark_broken(glance: &Glance, id: &str, broken_name: &str, live_name: &str) -> Result<Image, RotateError> {
    let image = glance.image(id).await?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let at = image.property(BROKEN_AT).map(str::to_string).unwrap_or(now);
    let image = patch_changed(
        glance,
        image,
        vec![
            ("name", json!(broken_name)),
            ("visibility", json!("private")),
            (BROKEN_OF, json!(bounded(live_name))),
            (BROKEN_AT, json!(at)),
        ],
    )
    .await?;
    tracing::info!("Image {id} renamed {broken_name:?} (private): it is not used for {live_name:?}");
    Ok(image)
}

/// Sets string properties on image `id` (values cut to 255 characters).
pub async fn set_properties(glance: &Glance, id: &str, props: &BTreeMap<String, String>) -> Result<Image, RotateError> {
    let image = glance.image(id).await?;
    let ops = props.iter().map(|(k, v)| (k.as_str(), json!(bounded(v)))).collect();
    patch_changed(glance, image, ops).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_values_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("abc"), "abc");
        let long = "é".repeat(200);
        let b = bounded(&long);
        assert!(b.len() <= MAX_PROPERTY_LEN && b.len() >= MAX_PROPERTY_LEN - 1);
        assert!(long.starts_with(&b));
    }
}
