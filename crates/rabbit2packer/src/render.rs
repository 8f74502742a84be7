//! Turning a template into a build file: `$NAME`, `$IMAGE` and `$METADATA`
//! replaced (every value JSON-escaped, so a hostile profile cannot break the
//! JSON), the result checked to be JSON, written atomically to
//! `BUILD_FILE_DIR/<image key>.<template file name>.json`.
//!
//! Also reads back from a rendered template the Glance image name it will
//! create, for the rotation step when Packer reports no image ID.

use std::io::Write;
use std::path::{Path, PathBuf};

use packuilon_common::profile::{json_escape, Branch, ImageNames};
use serde_json::Value;

/// The values pasted into a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Values {
    /// `$NAME`, escaped for use inside a JSON string.
    pub(crate) name: String,
    /// `$IMAGE`, escaped for use inside a JSON string.
    pub(crate) image: String,
    /// `$METADATA`: the JSON fragment (already escaped).
    pub(crate) metadata: String,
    /// `$NAME` as it is (for rotation by name).
    pub(crate) raw_name: String,
}

impl Values {
    pub(crate) fn new(names: &ImageNames, source_image: &str) -> Values {
        Values {
            name: json_escape(&names.name()),
            image: json_escape(source_image),
            metadata: names.metadata_fragment(),
            raw_name: names.name(),
        }
    }

    /// What start-up validation renders every template with.
    pub(crate) fn sample() -> Values {
        let names = ImageNames {
            personality: "sample".into(),
            archetype: "sample-archetype".into(),
            os: "sl".into(),
            os_version: "7x".into(),
            arch: "x86_64".into(),
            branch: Branch::Domain("prod".into()),
        };
        Values::new(&names, "00000000-0000-0000-0000-000000000000")
    }
}

/// A rendered template that is not JSON.
#[derive(Debug, thiserror::Error)]
#[error("rendered template is not valid JSON: {0}")]
pub(crate) struct RenderError(pub String);

/// Replaces the placeholders in one pass (so a value containing `$NAME`
/// is never substituted again). A placeholder followed by a letter, digit
/// or `_` is some other name (`$IMAGE_NAME` in a script) and stays.
pub(crate) fn substitute(template: &str, v: &Values) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        // `$IMAGE_NAME` in a shell-local script is the script's own variable.
        let placeholder = |p: &str| {
            tail.starts_with(p)
                && !tail[p.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let (value, len) = if placeholder("$METADATA") {
            (v.metadata.as_str(), "$METADATA".len())
        } else if placeholder("$NAME") {
            (v.name.as_str(), "$NAME".len())
        } else if placeholder("$IMAGE") {
            (v.image.as_str(), "$IMAGE".len())
        } else {
            ("$", 1)
        };
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Renders and checks that the result parses as JSON.
pub(crate) fn render(template: &str, v: &Values) -> Result<(String, Value), RenderError> {
    let text = substitute(template, v);
    let json: Value = serde_json::from_str(&text).map_err(|e| RenderError(e.to_string()))?;
    Ok((text, json))
}

/// `<template file name>`: the name build files and logs are known by.
pub(crate) fn template_name(template: &Path) -> String {
    template
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| template.display().to_string())
}

/// `BUILD_FILE_DIR/<image key>.<template file name>.json`.
pub(crate) fn build_file_path(dir: &Path, image_key: &str, template: &Path) -> PathBuf {
    dir.join(format!("{image_key}.{}.json", template_name(template)))
}

/// Writes `text` to `path` atomically: a reader (or a packer started
/// earlier) sees the old file or the new one, never half of one. No fsync:
/// a build file is rendered again for every run, so it need not survive a
/// power cut (the journal, which must, is synced).
pub(crate) fn write_atomic(path: &Path, text: impl AsRef<[u8]>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".rendering-").tempfile_in(dir)?;
    tmp.write_all(text.as_ref())?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The Glance image name a rendered template creates: its builder's
/// `image_name` (with `{{user `x`}}` filled from its variables), else its
/// user variable `image_name`, else `$NAME`.
pub(crate) fn image_name(rendered: &Value, name: &str) -> String {
    let vars = rendered.get("variables");
    let from_builder = rendered
        .get("builders")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|b| b.get("image_name").and_then(Value::as_str))
        .map(|n| fill_user_vars(n, vars))
        .find(|n| !n.contains("{{"));
    if let Some(n) = from_builder {
        return n;
    }
    if let Some(n) = vars.and_then(|v| v.get("image_name")).and_then(Value::as_str) {
        if !n.contains("{{") {
            return n.to_string();
        }
    }
    name.to_string()
}

fn fill_user_vars(s: &str, vars: Option<&Value>) -> String {
    let mut out = s.to_string();
    let Some(vars) = vars.and_then(Value::as_object) else {
        return out;
    };
    for (k, v) in vars {
        if let Some(v) = v.as_str() {
            for pat in [format!("{{{{user `{k}`}}}}"), format!("{{{{ user `{k}` }}}}")] {
                out = out.replace(&pat, v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(branch: Branch, archetype: &str) -> ImageNames {
        ImageNames {
            personality: "inventory".into(),
            archetype: archetype.into(),
            os: "sl".into(),
            os_version: "7x".into(),
            arch: "x86_64".into(),
            branch,
        }
    }

    const TEMPLATE: &str = r#"{"builders": [{"type": "openstack", "image_name": "$NAME AQ", "source_image": "$IMAGE",
        "instance_metadata": { $METADATA }}], "note": "cost $5 $IMAGE_NAME $NAMES"}"#;

    #[test]
    fn placeholders_are_replaced_and_escaped() {
        let v = Values::new(&names(Branch::Sandbox("alice/\"x\"".into()), "tier\\1 $NAME"), "img-1");
        let (_, json) = render(TEMPLATE, &v).unwrap();
        let b = &json["builders"][0];
        assert_eq!(b["image_name"], "sl7x-x86_64 inventory AQ");
        assert_eq!(b["source_image"], "img-1");
        assert_eq!(b["instance_metadata"]["AQ_SANDBOX"], "alice/\"x\"");
        assert_eq!(b["instance_metadata"]["AQ_ARCHETYPE"], "tier\\1 $NAME");
        assert!(b["instance_metadata"].get("AQ_DOMAIN").is_none());
        assert_eq!(json["note"], "cost $5 $IMAGE_NAME $NAMES");
    }

    #[test]
    fn broken_template_is_an_error() {
        assert!(render("{ \"a\": $METADATA }", &Values::sample()).is_err());
    }

    #[test]
    fn image_name_comes_from_builder_then_variables_then_name() {
        let n = "sl7x-x86_64 inventory";
        assert_eq!(image_name(&json!({"builders": [{"image_name": "x AQ"}]}), n), "x AQ");
        assert_eq!(
            image_name(
                &json!({"variables": {"image_name": "v"}, "builders": [{"image_name": "{{user `image_name`}} AQ"}]}),
                n
            ),
            "v AQ"
        );
        assert_eq!(
            image_name(
                &json!({"variables": {"image_name": "v"}, "builders": [{"image_name": "{{timestamp}}"}]}),
                n
            ),
            "v"
        );
        assert_eq!(image_name(&json!({"builders": [{"type": "null"}]}), n), n);
    }

    #[test]
    fn build_file_is_named_after_key_and_template() {
        assert_eq!(
            build_file_path(Path::new("/b"), "inventory-sl7x-x86_64", Path::new("/t/managed.json")),
            PathBuf::from("/b/inventory-sl7x-x86_64.managed.json.json")
        );
    }
}
