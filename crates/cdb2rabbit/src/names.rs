//! Profile names: which names from the broker's index cdb2rabbit accepts.
//! A name becomes a path below CACHE_DIR and below PROFILE_DIR_URL, so a
//! hostile or broken one must never reach outside them, nor onto the files
//! cdb2rabbit keeps there for itself.

/// The cached index, as the original named it (the one file of
/// cdb2rabbit's own in CACHE_DIR without a leading dot).
pub const CACHED_INDEX: &str = "cached_info.xml";

/// Why a profile name cannot be used as a path below CACHE_DIR and the
/// profiles URL. Names are relative paths with `/` between namespaces.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty profile name");
    }
    if name.starts_with('/') {
        return Err("absolute profile name");
    }
    if name.contains('\0') {
        return Err("NUL in profile name");
    }
    if name.contains('\\') {
        return Err("backslash in profile name");
    }
    let control = if name.is_ascii() {
        name.bytes().any(|b| b.is_ascii_control())
    } else {
        name.chars().any(char::is_control)
    };
    if control {
        return Err("control character in profile name");
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Err("empty path segment in profile name");
        }
        if segment == "." || segment == ".." {
            return Err("'.' or '..' segment in profile name");
        }
        // Keeps profiles clear of cdb2rabbit's own files (the lock, temp files).
        if segment.starts_with('.') {
            return Err("path segment starting with '.' in profile name");
        }
    }
    if name == CACHED_INDEX {
        return Err("profile name collides with the cached index file");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names() {
        for bad in [
            "",
            "/x",
            "a/../b",
            "..",
            "a/./b",
            "a/",
            "a\0b",
            "a\\b",
            ".cdb2rabbit.lock",
            "cached_info.xml",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a.json", "ns/a.json.gz", "host-1.example.org.xml", "a..b.json"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }
}
