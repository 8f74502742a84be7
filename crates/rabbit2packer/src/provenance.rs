//! Provenance: the Glance properties every new image gets after its build,
//! so that an operator (or `rename-old-images --show`) can tell where an
//! image came from: the profile's `$METADATA` (`aq_*`), the job, the
//! profile and the rendered build file with their SHA-256, the source
//! image, the builder host and packer's version, and `image_build_date`
//! (the property other OpenStack image tools set). Values come from
//! profiles and files: they are bounded to what Glance keeps (255
//! characters) and sent as JSON strings, never pasted into anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use packuilon_common::profile::ImageNames;
use sha2::{Digest, Sha256};

/// What the properties are made from.
#[derive(Debug)]
pub(crate) struct Origin<'a> {
    pub(crate) names: &'a ImageNames,
    pub(crate) image_key: &'a str,
    /// The message's `profile` header (the profile's file name on the broker).
    pub(crate) profile: Option<&'a str>,
    pub(crate) body: &'a [u8],
    pub(crate) template: &'a Path,
    /// The rendered build file's text.
    pub(crate) build_file_text: &'a str,
    pub(crate) source_image: &'a str,
    pub(crate) job: i64,
    pub(crate) packer_version: &'a str,
}

/// sha256 of `bytes`, hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The properties for an image built from `o`, at `now`.
pub(crate) fn properties(o: &Origin<'_>, now: chrono::DateTime<chrono::Utc>) -> BTreeMap<String, String> {
    let mut p: BTreeMap<String, String> = o
        .names
        .metadata_pairs()
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let mut set = |k: &str, v: String| {
        p.insert(k.to_string(), v);
    };
    set("packuilon_image_key", o.image_key.to_string());
    if let Some(profile) = o.profile {
        set("packuilon_profile", profile.to_string());
    }
    set("packuilon_profile_sha256", sha256_hex(o.body));
    set("packuilon_template", o.template.display().to_string());
    set("packuilon_template_sha256", sha256_hex(o.build_file_text.as_bytes()));
    set("packuilon_source_image", o.source_image.to_string());
    set("packuilon_job", o.job.to_string());
    set("packuilon_builder_host", packuilon_common::config::host_name());
    set("packuilon_packer_version", o.packer_version.to_string());
    set("image_build_date", now.format("%Y-%m-%d").to_string());
    p
}

/// `packer version` of PACKER_PATH (`1.6.6`), asked once per binary and
/// remembered; `unknown` when it cannot be told.
pub(crate) async fn packer_version(packer: &Path) -> String {
    static SEEN: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());
    if let Some(v) = SEEN.lock().unwrap_or_else(|p| p.into_inner()).get(packer) {
        return v.clone();
    }
    let run = tokio::process::Command::new(packer)
        .arg("version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let version = match tokio::time::timeout(Duration::from_secs(20), run).await {
        Ok(Ok(out)) if out.status.success() => parse_version(&String::from_utf8_lossy(&out.stdout)),
        _ => None,
    };
    let Some(version) = version else {
        return "unknown".to_string();
    };
    SEEN.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(packer.to_path_buf(), version.clone());
    version
}

/// `Packer v1.6.6` (first line of `packer version`) -> `1.6.6`.
fn parse_version(out: &str) -> Option<String> {
    let first = out.lines().next()?.trim();
    let v = first.strip_prefix("Packer v").unwrap_or(first).trim();
    let ok = !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || ".-+_ ".contains(c));
    ok.then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use packuilon_common::profile::Branch;

    #[test]
    fn properties_name_the_profile_the_build_file_and_the_builder() {
        let names = ImageNames {
            personality: "inventory".into(),
            archetype: "ral-tier1".into(),
            os: "sl".into(),
            os_version: "7x".into(),
            arch: "x86_64".into(),
            branch: Branch::Sandbox("alice-test".into()),
        };
        let o = Origin {
            names: &names,
            image_key: "inventory-sl7x-x86_64",
            profile: Some("inventory-sl-7x-x86-64.ci.example.org.json"),
            body: b"{}",
            template: Path::new("/etc/packer-utils/templates/base.json"),
            build_file_text: "{\"builders\": []}",
            source_image: "0b10e583",
            job: 42,
            packer_version: "1.6.6",
        };
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-02T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let p = properties(&o, now);
        assert_eq!(p["aq_personality"], "inventory");
        assert_eq!(p["aq_os"], "sl");
        assert_eq!(p["aq_osversion"], "7x-x86_64");
        assert_eq!(p["aq_sandbox"], "alice-test");
        assert!(!p.contains_key("aq_domain"));
        assert_eq!(p["aq_archetype"], "ral-tier1");
        assert_eq!(p["packuilon_profile_sha256"], sha256_hex(b"{}"));
        assert_eq!(p["packuilon_template_sha256"], sha256_hex(b"{\"builders\": []}"));
        assert_eq!(p["packuilon_job"], "42");
        assert_eq!(p["image_build_date"], "2026-12-02");
        for k in glance_rotate::gate::PROVENANCE_PROPERTIES {
            if *k != "aq_domain" {
                assert!(p.contains_key(*k), "{k} missing");
            }
        }
        assert_eq!(p.len(), glance_rotate::gate::PROVENANCE_PROPERTIES.len() - 1);
    }

    #[test]
    fn packer_versions_are_read_from_the_first_line_and_checked() {
        assert_eq!(parse_version("Packer v1.6.6\n").as_deref(), Some("1.6.6"));
        assert_eq!(
            parse_version("Packer v1.9.4\n\nYour version is out of date").as_deref(),
            Some("1.9.4")
        );
        assert_eq!(parse_version("").as_deref(), None);
        assert_eq!(parse_version("Packer v1.0;rm -rf /").as_deref(), None);
    }
}
