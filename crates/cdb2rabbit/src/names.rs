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
    // One pass over the bytes (this runs for every entry of the index).
    let (mut nul, mut backslash, mut control) = (false, false, false);
    for &b in name.as_bytes() {
        nul |= b == 0;
        backslash |= b == b'\\';
        control |= b.is_ascii_control();
    }
    if nul {
        return Err("NUL in profile name");
    }
    if backslash {
        return Err("backslash in profile name");
    }
    if !name.is_ascii() {
        control = name.chars().any(char::is_control);
    }
    if control {
        return Err("control character in profile name");
    }
    for segment in name.as_bytes().split(|&b| b == b'/') {
        if segment.is_empty() {
            return Err("empty path segment in profile name");
        }
        if segment == b"." || segment == b".." {
            return Err("'.' or '..' segment in profile name");
        }
        // Keeps profiles clear of cdb2rabbit's own files (the lock, temp files).
        if segment.starts_with(b".") {
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
        // The first problem found, in a fixed order.
        for (bad, problem) in [
            ("a\\b\0/..", "NUL in profile name"),
            ("a\x01/b\\c", "backslash in profile name"),
            ("a/\u{85}b/..", "control character in profile name"),
            ("a\x7f", "control character in profile name"),
            ("a//.b", "empty path segment in profile name"),
            ("a/./.b", "'.' or '..' segment in profile name"),
            ("h\u{e9}/.b", "path segment starting with '.' in profile name"),
        ] {
            assert_eq!(check_name(bad), Err(problem), "{bad:?}");
        }
        for good in [
            "a.json",
            "ns/a.json.gz",
            "host-1.example.org.xml",
            "a..b.json",
            "h\u{e9}.json",
        ] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }
}
