//! Python `ConfigParser` as the original's `config.ini` was written for,
//! on top of rust-ini: comment and continuation rules, a byte order mark,
//! sections and keys given twice, `[DEFAULT]` and `%`-interpolation. What
//! comes out is an [`IniFile`] whose sections the parent module reads into
//! typed structs; nothing here knows a key of Packuilon's.

use std::fmt;
use std::path::{Path, PathBuf};

use ini::Ini;

use super::{ConfigError, Result};

/// A loaded `config.ini`, not yet validated: ask it for the sections you need.
pub struct IniFile {
    pub(super) path: PathBuf,
    pub(super) ini: Ini,
    /// Keys set twice in a section: `(section, KEY, warning)`.
    pub(super) duplicates: Duplicates,
}

impl fmt::Debug for IniFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IniFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl IniFile {
    /// Reads and parses the file. A missing or unreadable file is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, None, None, format!("cannot read: {e}")))?;
        Self::parse(path, &text)
    }

    /// Parses `text` as if read from `path` (for error messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        // A UTF-8 byte order mark (editors on other systems add one) is not
        // part of the first section header.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let (text, duplicates) = check_lines(path, text)?;
        let opt = ini::ParseOption {
            // ConfigParser keeps quotes and backslashes as they are.
            enabled_quote: false,
            enabled_escape: false,
            ..Default::default()
        };
        let mut ini = Ini::load_from_str_opt(&text, opt)
            .map_err(|e| ConfigError::new(path, None, None, format!("not a valid INI file: {e}")))?;
        interpolate_all(path, &mut ini)?;
        Ok(IniFile {
            duplicates,
            path: path.to_path_buf(),
            ini,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// ConfigParser's section whose keys every other section inherits.
pub(super) const DEFAULT_SECTION: &str = "DEFAULT";

/// Keys set twice, per section: `(section, KEY, warning)`.
pub(super) type Duplicates = Vec<(String, String, String)>;

/// What `ini` would get wrong silently, checked line by line: a line that is
/// neither a section, a comment nor `key = value` (ini would glue it to the
/// next key, swallowing a section header) and a section given twice (ini
/// would ignore the second) are errors. A key given twice in a section is
/// a warning, returned as `(section, key, warning)`: the last one wins, as
/// in the original's Python 2 days and as an operator appending an
/// override expects (ini alone would keep the first).
///
/// Returns the text for ini with comment lines blanked and lines
/// left-trimmed: ini takes an indented comment for the start of a key and
/// glues it to the next line.
fn check_lines(path: &Path, text: &str) -> Result<(String, Duplicates)> {
    let mut duplicates = Vec::new();
    let mut normalised = String::with_capacity(text.len());
    let mut sections: Vec<(String, usize)> = Vec::new();
    let mut keys: Vec<(String, usize)> = Vec::new();
    let mut section: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            normalised.push('\n');
            continue;
        }
        if let Some(header) = t.strip_prefix('[') {
            // As ConfigParser: the header runs to the last `]` (`[global] ; x`).
            let Some(name) = header.rfind(']').map(|end| &header[..end]) else {
                return Err(ConfigError::new(
                    path,
                    None,
                    None,
                    format!("line {n}: unclosed section header {t:?}"),
                ));
            };
            let name = name.trim().to_string();
            if let Some((_, first)) = sections.iter().find(|(s, _)| s.eq_ignore_ascii_case(&name)) {
                return Err(ConfigError::new(
                    path,
                    None,
                    None,
                    format!("line {n}: section [{name}] appears again (first on line {first}); merge them"),
                ));
            }
            normalised.push_str(&format!("[{name}]\n"));
            sections.push((name.clone(), n));
            section = Some(name);
            keys.clear();
            continue;
        }
        normalised.push_str(line.trim_start());
        normalised.push('\n');
        let Some(at) = t.find(['=', ':']) else {
            let hint = if line.starts_with([' ', '\t']) {
                " (continuation lines are not supported)"
            } else {
                ""
            };
            return Err(ConfigError::new(
                path,
                section.as_deref(),
                None,
                format!("line {n}: {t:?} is not `KEY = value`, a [section] or a comment{hint}"),
            ));
        };
        let key = t[..at].trim().to_ascii_uppercase();
        if section.is_none() {
            return Err(ConfigError::new(
                path,
                None,
                Some(&key),
                format!("line {n}: key before any [section] header"),
            ));
        }
        let section = section.clone().unwrap_or_default();
        if let Some((_, first)) = keys.iter().find(|(k, _)| *k == key) {
            let warning = format!(
                "{}: [{section}] {key}: set on line {first} and again on line {n}; the last one is used",
                path.display()
            );
            duplicates.push((section, key.clone(), warning));
        }
        keys.push((key, n));
    }
    Ok((normalised, duplicates))
}

/// ConfigParser's interpolation, which the original's files were written
/// for: `%%` is a `%` and `%(key)s` the value of `key` in the same section
/// or `[DEFAULT]`. A `%` followed by anything else is kept as it is (the
/// original refused such a file, so no working file depends on it).
fn interpolate_all(path: &Path, ini: &mut Ini) -> Result<()> {
    let snapshot = ini.clone();
    let defaults = snapshot.section(Some(DEFAULT_SECTION));
    for (name, props) in ini.iter_mut() {
        let own = snapshot.section(name);
        for (key, value) in props.iter_mut() {
            if !value.contains('%') {
                continue;
            }
            let lookup = |k: &str| {
                own.and_then(|p| p.get_all(k).last())
                    .or_else(|| defaults.and_then(|p| p.get_all(k).last()))
            };
            *value = interpolate(value, &lookup, 0)
                .map_err(|problem| ConfigError::new(path, name, Some(&key.to_ascii_uppercase()), problem))?;
        }
    }
    Ok(())
}

fn interpolate<'v>(
    value: &str,
    lookup: &dyn Fn(&str) -> Option<&'v str>,
    depth: usize,
) -> std::result::Result<String, String> {
    // ConfigParser's limit, which also ends reference loops.
    if depth > 10 {
        return Err("%(...)s references nest too deep (a loop?)".to_string());
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('%') {
            out.push('%');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(').and_then(|r| r.split_once(")s")) {
            let (name, tail) = reference;
            let target = lookup(name.trim()).ok_or_else(|| format!("%({name})s refers to a key that is not set"))?;
            out.push_str(&interpolate(target.trim(), lookup, depth + 1)?);
            rest = tail;
        } else {
            out.push('%');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}
