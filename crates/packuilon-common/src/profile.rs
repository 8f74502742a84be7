//! The parts of a compiled Quattor profile that name an image.
//!
//! A profile (the JSON cdb2rabbit publishes) says which personality, OS and
//! architecture the CI host runs and which domain or sandbox it was compiled
//! from. From those come every name operators know (`../shared/ORIGINAL.md`):
//!
//! | what | format | example |
//! |---|---|---|
//! | image key | `<personality>-<os><ver>-<arch>` | `inventory-sl7x-x86_64` |
//! | source image key | `<os><ver>-<arch>` | `sl7x-x86_64` |
//! | `$NAME` | `<os><ver>-<arch> <personality>` | `sl7x-x86_64 inventory` |
//!
//! The image key ends up in file names, so the fields it is made of are
//! checked here: a profile cannot name a path outside the build directories.

use std::fmt;

use serde_json::Value;

/// Why a profile cannot be turned into image names. Names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("profile is not valid JSON: {0}")]
    NotJson(String),
    #[error("profile lacks field {0}")]
    Missing(&'static str),
    #[error("profile field {field} must be a string")]
    NotAString { field: &'static str },
    #[error("profile field {field} has an unsafe value {} (allowed: 1 to {MAX_NAME_LEN} characters, each a letter, digit, '.', '_', '-' or '+'; not starting with '.' or '-')", shown(value))]
    Unsafe { field: &'static str, value: String },
}

/// Where the profile was compiled from: `metadata.template.branch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Branch {
    Domain(String),
    Sandbox(String),
}

/// The naming fields of one profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageNames {
    pub personality: String,
    pub archetype: String,
    pub os: String,
    pub os_version: String,
    pub arch: String,
    pub branch: Branch,
}

/// Field paths, as operators would look them up in the profile.
const PERSONALITY: &str = "system.personality.name";
const ARCHETYPE: &str = "system.archetype.name";
const OS: &str = "system.os.distribution.name";
const OS_VERSION: &str = "system.os.version.name";
const ARCH: &str = "system.os.architecture";
const BRANCH_NAME: &str = "metadata.template.branch.name";
const BRANCH_TYPE: &str = "metadata.template.branch.type";

/// The domain assumed when a profile does not say (the original's only value).
pub const DEFAULT_DOMAIN: &str = "prod";

impl ImageNames {
    /// Parses profile bytes (as published) and extracts the names.
    pub fn from_slice(body: &[u8]) -> Result<Self, ProfileError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| ProfileError::NotJson(e.to_string()))?;
        Self::from_json(&v)
    }

    /// Extracts the names from a parsed profile.
    pub fn from_json(v: &Value) -> Result<Self, ProfileError> {
        let personality = safe(PERSONALITY, string_at(v, PERSONALITY)?)?;
        let archetype = string_at(v, ARCHETYPE)?.to_string();
        let os = safe(OS, string_at(v, OS)?)?;
        let os_version = safe(OS_VERSION, string_at(v, OS_VERSION)?)?;
        let arch = safe(ARCH, string_at(v, ARCH)?)?;
        let branch = match lookup(v, BRANCH_NAME) {
            None | Some(Value::Null) => Branch::Domain(DEFAULT_DOMAIN.to_string()),
            Some(Value::String(name)) => match lookup(v, BRANCH_TYPE).and_then(Value::as_str) {
                Some("sandbox") => Branch::Sandbox(name.clone()),
                _ => Branch::Domain(name.clone()),
            },
            Some(_) => return Err(ProfileError::NotAString { field: BRANCH_NAME }),
        };
        Ok(ImageNames {
            personality,
            archetype,
            os,
            os_version,
            arch,
            branch,
        })
    }

    /// `<personality>-<os><ver>-<arch>`: template map key, file names, log lines.
    pub fn image_key(&self) -> String {
        format!("{}-{}", self.personality, self.source_key())
    }

    /// `<os><ver>-<arch>`: the key of `source-images.json`.
    pub fn source_key(&self) -> String {
        format!("{}{}-{}", self.os, self.os_version, self.arch)
    }

    /// `$NAME`: `<os><ver>-<arch> <personality>`.
    pub fn name(&self) -> String {
        format!("{} {}", self.source_key(), self.personality)
    }

    /// `$METADATA`: the JSON fragment pasted inside braces in templates,
    /// every value JSON-escaped.
    pub fn metadata_fragment(&self) -> String {
        self.metadata_pairs()
            .iter()
            .map(|(k, v)| format!("\"{k}\": {}", json_string(v)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The pairs of `$METADATA`, in its order: `AQ_PERSONALITY`, `AQ_OS`,
    /// `AQ_OSVERSION`, `AQ_DOMAIN` or `AQ_SANDBOX`, `AQ_ARCHETYPE` (also
    /// the images' provenance properties, in lower case).
    pub fn metadata_pairs(&self) -> [(&'static str, String); 5] {
        let (branch_key, branch) = match &self.branch {
            Branch::Domain(d) => ("AQ_DOMAIN", d),
            Branch::Sandbox(s) => ("AQ_SANDBOX", s),
        };
        [
            ("AQ_PERSONALITY", self.personality.clone()),
            ("AQ_OS", self.os.clone()),
            ("AQ_OSVERSION", format!("{}-{}", self.os_version, self.arch)),
            (branch_key, branch.clone()),
            ("AQ_ARCHETYPE", self.archetype.clone()),
        ]
    }
}

impl fmt::Display for ImageNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.image_key())
    }
}

/// `s` as a quoted JSON string.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a str always serialises")
}

/// `s` JSON-escaped without the quotes: for pasting inside a JSON string.
pub fn json_escape(s: &str) -> String {
    let quoted = json_string(s);
    quoted[1..quoted.len() - 1].to_string()
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn string_at<'a>(v: &'a Value, path: &'static str) -> Result<&'a str, ProfileError> {
    match lookup(v, path) {
        None | Some(Value::Null) => Err(ProfileError::Missing(path)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ProfileError::NotAString { field: path }),
    }
}

/// The longest name part: file names of build files and logs are made of them.
pub const MAX_NAME_LEN: usize = 128;

/// A value as an error shows it: quoted, cut after 40 characters (a profile
/// may hold megabytes in a field; a log line must not).
fn shown(value: &str) -> String {
    const SHOWN: usize = 40;
    let n = value.chars().count();
    if n <= SHOWN {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(SHOWN).collect();
    format!("{head:?}... ({n} characters)")
}

fn safe(field: &'static str, value: &str) -> Result<String, ProfileError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && !value.starts_with(['.', '-'])
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'));
    if ok {
        Ok(value.to_string())
    } else {
        Err(ProfileError::Unsafe {
            field,
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile(personality: &str, branch: Value) -> Value {
        json!({
            "system": {
                "personality": {"name": personality},
                "archetype": {"name": "ral-tier1"},
                "os": {"distribution": {"name": "sl"}, "version": {"name": "7x"}, "architecture": "x86_64"}
            },
            "metadata": {"template": {"branch": branch}}
        })
    }

    #[test]
    fn names_as_the_original() {
        let n = ImageNames::from_json(&profile("inventory", json!({"name": "prod", "type": "domain"}))).unwrap();
        assert_eq!(n.image_key(), "inventory-sl7x-x86_64");
        assert_eq!(n.source_key(), "sl7x-x86_64");
        assert_eq!(n.name(), "sl7x-x86_64 inventory");
        assert_eq!(
            n.metadata_fragment(),
            r#""AQ_PERSONALITY": "inventory", "AQ_OS": "sl", "AQ_OSVERSION": "7x-x86_64", "AQ_DOMAIN": "prod", "AQ_ARCHETYPE": "ral-tier1""#
        );
    }

    #[test]
    fn sandbox_and_escaping() {
        let mut p = profile("inventory", json!({"name": "alice/fix \"quotes\"", "type": "sandbox"}));
        p["system"]["archetype"]["name"] = json!("tier\\1");
        let n = ImageNames::from_json(&p).unwrap();
        let frag = n.metadata_fragment();
        assert!(frag.contains(r#""AQ_SANDBOX": "alice/fix \"quotes\"""#), "{frag}");
        assert!(frag.contains(r#""AQ_ARCHETYPE": "tier\\1""#), "{frag}");
        let parsed: Value = serde_json::from_str(&format!("{{{frag}}}")).unwrap();
        assert_eq!(parsed["AQ_SANDBOX"], "alice/fix \"quotes\"");
    }

    #[test]
    fn no_branch_means_prod() {
        let mut p = profile("x", Value::Null);
        p.as_object_mut().unwrap().remove("metadata");
        let n = ImageNames::from_json(&p).unwrap();
        assert_eq!(n.branch, Branch::Domain("prod".into()));
    }

    #[test]
    fn missing_field_is_named() {
        let mut p = profile("x", json!({"name": "prod", "type": "domain"}));
        p["system"]["os"].as_object_mut().unwrap().remove("architecture");
        assert_eq!(
            ImageNames::from_json(&p),
            Err(ProfileError::Missing("system.os.architecture"))
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in ["../../etc", "a/b", "", ".hidden", "a b", "x\0y"] {
            let e = ImageNames::from_json(&profile(bad, json!(null))).unwrap_err();
            assert!(
                matches!(
                    e,
                    ProfileError::Unsafe {
                        field: "system.personality.name",
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
        }
    }
}
