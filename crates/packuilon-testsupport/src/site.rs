//! An Aquilon broker's site as the end-to-end tests need it: a CI host's
//! compiled profile and `profiles-info.xml` in the broker's own format.

use std::path::Path;

use serde_json::{json, Value};

/// A compiled profile of a host of `personality` on sl7x-x86_64 (domain
/// `prod`, archetype `ral-tier1`) with these packages.
pub fn profile(personality: &str, packages: &[&str]) -> Value {
    let packages: serde_json::Map<String, Value> = packages.iter().map(|p| (p.to_string(), json!({}))).collect();
    json!({
        "metadata": {"template": {"branch": {"name": "prod", "type": "domain"}}},
        "system": {
            "archetype": {"name": "ral-tier1"},
            "personality": {"name": personality},
            "os": {"distribution": {"name": "sl"}, "version": {"name": "7x"}, "architecture": "x86_64"}
        },
        "software": {"packages": packages}
    })
}

/// Writes `site/profiles-info.xml` as the broker's `build_index` does: one
/// `<profile mtime='N'>NAME</profile>` a line. Names go in as given, so a
/// test may write character references (`&#10;`) into one.
pub fn write_index(site: &Path, entries: &[(&str, u64)]) {
    let mut xml = String::from("<?xml version='1.0' encoding='utf-8'?>\n<profiles>");
    for (name, mtime) in entries {
        xml.push_str(&format!("\n<profile mtime='{mtime}'>{name}</profile>"));
    }
    xml.push_str("\n</profiles>");
    std::fs::write(site.join("profiles-info.xml"), xml).unwrap();
}
