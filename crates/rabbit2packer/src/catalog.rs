//! The catalog: `template-map.json`, `source-images.json` and the templates
//! they name, validated as a whole.
//!
//! Loaded and checked at start-up (a problem is fatal there: one error naming
//! the file and the key). Afterwards the files are re-read when their
//! modification stamps change — checked when a job starts and on SIGHUP — so
//! an edit needs no restart. An edit that does not validate is logged once,
//! naming the file, and the last good catalog stays in use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::Value;

use crate::render::{self, Values};

/// The template map key used for images without an entry of their own.
pub(crate) const DEFAULT_KEY: &str = "DEFAULT";

/// A problem with one of the catalog's files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{problem}", key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct CatalogError {
    /// The template map, the source images or a template.
    pub file: PathBuf,
    /// The entry of the file the problem is in, if one.
    pub key: Option<String>,
    pub problem: String,
}

impl CatalogError {
    fn new(file: &Path, key: Option<&str>, problem: impl Into<String>) -> Self {
        CatalogError {
            file: file.to_path_buf(),
            key: key.map(str::to_string),
            problem: problem.into(),
        }
    }
}

/// Everything wrong with one version of the catalog's files: each broken
/// file is named (both JSON files may be broken at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub errors: Vec<CatalogError>,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

impl From<CatalogError> for LoadError {
    fn from(e: CatalogError) -> LoadError {
        LoadError { errors: vec![e] }
    }
}

/// Identifies one version of a file (modification time, size, inode).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino()))
}

/// One validated version of the three kinds of files.
#[derive(Debug, Clone)]
pub(crate) struct Catalog {
    map_file: PathBuf,
    images_file: PathBuf,
    map: BTreeMap<String, Vec<PathBuf>>,
    source_images: BTreeMap<String, String>,
    templates: BTreeMap<PathBuf, Arc<str>>,
    stamps: Vec<(PathBuf, Stamp)>,
}

/// Templates chosen for an image.
#[derive(Debug, Clone)]
pub(crate) struct Choice {
    pub(crate) templates: Vec<PathBuf>,
    /// No entry of its own: DEFAULT was used.
    pub(crate) default: bool,
}

impl Catalog {
    /// Reads and validates everything; the error names every broken file.
    pub(crate) fn load(map_file: &Path, images_file: &Path) -> Result<Catalog, LoadError> {
        let mut stamps = vec![
            (map_file.to_path_buf(), stamp(map_file)),
            (images_file.to_path_buf(), stamp(images_file)),
        ];
        let map = load_map(map_file);
        let source_images = load_images(images_file);
        let (map, source_images) = match (map, source_images) {
            (Ok(m), Ok(i)) => (m, i),
            (m, i) => {
                let errors = [m.err(), i.err()].into_iter().flatten().collect();
                return Err(LoadError { errors });
            }
        };

        let sample = Values::sample();
        let mut templates = BTreeMap::new();
        let mut errors = Vec::new();
        for (key, paths) in &map {
            for path in paths {
                if templates.contains_key(path) || errors.iter().any(|e: &CatalogError| e.file == *path) {
                    continue;
                }
                stamps.push((path.clone(), stamp(path)));
                let text = match std::fs::read_to_string(path) {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push(CatalogError::new(
                            map_file,
                            Some(key),
                            format!("template {}: cannot read: {e}", path.display()),
                        ));
                        continue;
                    }
                };
                if let Err(e) = render::render(&text, &sample) {
                    errors.push(CatalogError::new(
                        path,
                        None,
                        format!("template (listed under {key} in {}): {e}", map_file.display()),
                    ));
                    continue;
                }
                templates.insert(path.clone(), Arc::from(text));
            }
        }
        if !errors.is_empty() {
            return Err(LoadError { errors });
        }
        Ok(Catalog {
            map_file: map_file.to_path_buf(),
            images_file: images_file.to_path_buf(),
            map,
            source_images,
            templates,
            stamps,
        })
    }

    /// The image's own entry, else DEFAULT.
    pub(crate) fn templates_for(&self, image_key: &str) -> Option<Choice> {
        if let Some(t) = self.map.get(image_key) {
            return Some(Choice {
                templates: t.clone(),
                default: false,
            });
        }
        self.map.get(DEFAULT_KEY).map(|t| Choice {
            templates: t.clone(),
            default: true,
        })
    }

    pub(crate) fn source_image(&self, source_key: &str) -> Option<&str> {
        self.source_images.get(source_key).map(String::as_str)
    }

    /// The text of a template named by the map (read when the catalog was loaded).
    pub(crate) fn template_text(&self, path: &Path) -> Option<Arc<str>> {
        self.templates.get(path).cloned()
    }

    pub(crate) fn map_file(&self) -> &Path {
        &self.map_file
    }

    /// IMAGES_CONFIG's entries: `<os><version>-<arch>` -> source image ID.
    pub(crate) fn source_images(&self) -> &BTreeMap<String, String> {
        &self.source_images
    }

    pub(crate) fn images_file(&self) -> &Path {
        &self.images_file
    }

    fn stamps_now(&self) -> Vec<(PathBuf, Stamp)> {
        self.stamps.iter().map(|(p, _)| (p.clone(), stamp(p))).collect()
    }

    /// Has any file changed since this version was read?
    pub(crate) fn changed(&self) -> bool {
        self.stamps.iter().any(|(p, s)| stamp(p) != *s)
    }
}

/// template-map.json: image key -> template paths (relative to the map's directory).
fn load_map(map_file: &Path) -> Result<BTreeMap<String, Vec<PathBuf>>, CatalogError> {
    let entries = read_object(map_file, "image key -> list of template paths")?;
    let base = map_file.parent().unwrap_or(Path::new("/"));
    let mut map = BTreeMap::new();
    for (key, value) in entries {
        let list = value
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| CatalogError::new(map_file, Some(&key), "must be a non-empty list of template paths"))?;
        let mut paths = Vec::new();
        for item in list {
            let p = item
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| CatalogError::new(map_file, Some(&key), format!("{item} is not a template path")))?;
            // Relative paths are taken from the map's directory, not the daemon's cwd.
            let path = base.join(p);
            let name = render::template_name(&path);
            // Build files and logs are named after the file name alone.
            if paths.iter().any(|q: &PathBuf| render::template_name(q) == name) {
                return Err(CatalogError::new(
                    map_file,
                    Some(&key),
                    format!("two templates named {name}: build files and logs would collide"),
                ));
            }
            paths.push(path);
        }
        map.insert(key, paths);
    }
    Ok(map)
}

/// source-images.json: `<os><version>-<arch>` -> image ID.
pub(crate) fn load_images(images_file: &Path) -> Result<BTreeMap<String, String>, CatalogError> {
    let images = read_object(images_file, "\"<os><version>-<arch>\" -> image ID")?;
    let mut source_images = BTreeMap::new();
    for (key, value) in images {
        let id = value
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CatalogError::new(images_file, Some(&key), "must be an image ID (a non-empty string)"))?;
        source_images.insert(key, id.to_string());
    }
    Ok(source_images)
}

fn read_json(file: &Path) -> Result<Value, CatalogError> {
    let text = std::fs::read_to_string(file).map_err(|e| CatalogError::new(file, None, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| CatalogError::new(file, None, format!("not valid JSON: {e}")))
}

/// A JSON file that must hold an object; `what` says what it maps.
fn read_object(file: &Path, what: &str) -> Result<serde_json::Map<String, Value>, CatalogError> {
    match read_json(file)? {
        Value::Object(entries) => Ok(entries),
        _ => Err(CatalogError::new(file, None, format!("must be a JSON object: {what}"))),
    }
}

/// The catalog in use, replaced when its files change and validate.
#[derive(Debug)]
pub(crate) struct LiveCatalog {
    state: Mutex<Live>,
}

#[derive(Debug)]
struct Live {
    current: Arc<Catalog>,
    /// Stamps of an edit already reported as broken (reported once), and what was wrong.
    rejected: Option<(Vec<(PathBuf, Stamp)>, String)>,
}

impl LiveCatalog {
    pub(crate) fn new(catalog: Catalog) -> LiveCatalog {
        LiveCatalog {
            state: Mutex::new(Live {
                current: Arc::new(catalog),
                rejected: None,
            }),
        }
    }

    /// The catalog to use now: re-read first if any file changed. A broken
    /// edit is reported once (this runs at every job start).
    pub(crate) fn refresh(&self) -> Arc<Catalog> {
        self.check(false)
    }

    /// SIGHUP: re-read what changed, and always say what was found; a
    /// broken edit already reported is named again (the operator asked).
    pub(crate) fn reload(&self) -> Arc<Catalog> {
        self.check(true)
    }

    fn check(&self, asked: bool) -> Arc<Catalog> {
        let mut live = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !live.current.changed() {
            if asked {
                tracing::info!(
                    "{}, {} and the templates are unchanged",
                    live.current.map_file.display(),
                    live.current.images_file.display()
                );
            }
            return live.current.clone();
        }
        let now = live.current.stamps_now();
        if let Some((stamps, error)) = &live.rejected {
            if *stamps == now {
                if asked {
                    tracing::error!(
                        "{error}; the last good version of the templates and source images is still in use"
                    );
                }
                return live.current.clone();
            }
        }
        match Catalog::load(&live.current.map_file, &live.current.images_file) {
            Ok(new) => {
                tracing::info!(
                    "Reloaded {} and {} (changed on disk)",
                    new.map_file.display(),
                    new.images_file.display()
                );
                live.current = Arc::new(new);
                live.rejected = None;
            }
            Err(e) => {
                tracing::error!("{e}; keeping the last good version of the templates and source images");
                live.rejected = Some((now, e.to_string()));
            }
        }
        live.current.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(dir: &Path) -> (PathBuf, PathBuf) {
        std::fs::write(dir.join("t.json"), r#"{"builders": [{"type": "null", "x": "$NAME"}]}"#).unwrap();
        let map = dir.join("template-map.json");
        std::fs::write(&map, r#"{"DEFAULT": ["t.json"]}"#).unwrap();
        let img = dir.join("source-images.json");
        std::fs::write(&img, r#"{"sl7x-x86_64": "abc"}"#).unwrap();
        (map, img)
    }

    #[test]
    fn broken_template_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (map, img) = site(dir.path());
        std::fs::write(dir.path().join("t.json"), r#"{"a": { $METADATA }, }"#).unwrap();
        let e = Catalog::load(&map, &img).unwrap_err().errors.remove(0);
        assert_eq!(e.file, dir.path().join("t.json"));
        assert!(e.to_string().contains("listed under DEFAULT"), "{e}");
        std::fs::write(&map, r#"{"DEFAULT": ["missing.json"]}"#).unwrap();
        let e = Catalog::load(&map, &img).unwrap_err().errors.remove(0);
        assert_eq!(e.key.as_deref(), Some("DEFAULT"));
        assert!(e.to_string().contains("missing.json"), "{e}");
    }

    #[test]
    fn templates_of_one_image_need_distinct_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let (map, img) = site(dir.path());
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::copy(dir.path().join("t.json"), dir.path().join("b/t.json")).unwrap();
        std::fs::write(&map, r#"{"DEFAULT": ["t.json", "b/t.json"]}"#).unwrap();
        let e = Catalog::load(&map, &img).unwrap_err().errors.remove(0);
        assert_eq!(e.key.as_deref(), Some("DEFAULT"));
        assert!(e.problem.contains("two templates named t.json"), "{e}");
    }

    #[test]
    fn broken_edit_keeps_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let (map, img) = site(dir.path());
        let live = LiveCatalog::new(Catalog::load(&map, &img).unwrap());
        std::fs::write(&img, r#"{"sl7x-x86_64": "abc", "sl6x-x86_64": "def"}"#).unwrap();
        assert_eq!(live.refresh().source_image("sl6x-x86_64"), Some("def"));
        std::fs::write(&img, r#"{"sl7x-x86_64": "#).unwrap();
        assert_eq!(live.refresh().source_image("sl6x-x86_64"), Some("def"));
    }
}
