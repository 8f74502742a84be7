//! `profiles-info.xml`: the Aquilon broker's index of compiled profiles, and
//! the same document as cdb2rabbit caches it (`CACHE_DIR/cached_info.xml`).
//!
//! The broker writes `<profiles>` holding one `<profile mtime='N'>NAME</profile>`
//! per profile, in no particular order. The document is parsed as XML (never
//! line by line), gzip is recognised by its magic bytes whatever the file is
//! called, and a document that is not well-formed or ends before
//! `</profiles>` is refused as a whole. Problems that concern one entry only
//! (no mtime, a non-numeric one, a hostile or duplicated name) are kept
//! beside the good entries, so the caller can fail that profile alone and
//! still process the others.
//!
//! [`write_cached`] produces the broker's own format, so a cache directory
//! shared with the original tool (or read by people) stays familiar.

use std::hash::BuildHasher;
use std::io::{Read, Write};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::names::check_name;

mod plain;

/// Largest index accepted, after decompression. A 100,000-profile index is
/// about 6 MB; this only stops a runaway or hostile document.
pub const INDEX_LIMIT: u64 = 256 * 1024 * 1024;

/// The whole document is unusable: nothing of it may be trusted.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("not valid gzip: {0}")]
    Gzip(std::io::Error),
    #[error("larger than {INDEX_LIMIT} bytes once decompressed")]
    TooLarge,
    #[error("not well-formed XML at byte {position}: {message}")]
    Xml { position: u64, message: String },
    #[error("the document ends before </profiles> (truncated?)")]
    Truncated,
    #[error("root element is <{0}>, expected <profiles>")]
    WrongRoot(String),
    #[error("unexpected element <{element}> inside <profile> at byte {position}")]
    Nested { element: String, position: u64 },
}

/// One profile of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the profiles directory, with its suffix (`.json`, `.json.gz`, ...).
    pub name: String,
    /// As the generator wrote it: seconds (Aquilon) or milliseconds (panc). Only compared for equality.
    pub mtime: u64,
}

/// An entry that cannot be processed. The run fails that profile alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("index entry {name:?} has no mtime attribute")]
    NoMtime { name: String },
    #[error("index entry {name:?} has a non-numeric mtime {mtime:?}")]
    BadMtime { name: String, mtime: String },
    #[error("index entry {name:?} is listed more than once")]
    Duplicate { name: String },
    #[error("index entry {name:?}: {problem}")]
    HostileName { name: String, problem: &'static str },
    /// `x.json` and `x.json/y.json`: the second one's cached copy would
    /// need a directory where the first one's copy is a file.
    #[error("index entry {name:?} cannot be cached: it would need the cached copy of {other:?} to be a directory")]
    Clash { name: String, other: String },
}

impl EntryError {
    /// The profile the problem is about (its cached state is left alone).
    pub fn name(&self) -> &str {
        match self {
            EntryError::NoMtime { name }
            | EntryError::BadMtime { name, .. }
            | EntryError::Duplicate { name }
            | EntryError::HostileName { name, .. }
            | EntryError::Clash { name, .. } => name,
        }
    }
}

/// A parsed index: the usable entries (unique names, in document order) and
/// the entries that were not usable.
#[derive(Debug, Default, Clone)]
pub struct Index {
    pub entries: Vec<Entry>,
    pub problems: Vec<EntryError>,
}

impl Index {
    /// name -> mtime of the usable entries.
    pub fn mtimes(&self) -> HashMap<&str, u64> {
        self.entries.iter().map(|e| (e.name.as_str(), e.mtime)).collect()
    }
}

/// Decompresses `bytes` when they start with the gzip magic, up to `limit`
/// bytes of output. JSON and XML never start with 0x1f, so sniffing is safe.
pub fn gunzip_if_gzip(bytes: Vec<u8>, limit: u64) -> Result<Vec<u8>, GunzipError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() * 4);
    flate2::read::MultiGzDecoder::new(bytes.as_slice())
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(GunzipError::Corrupt)?;
    if out.len() as u64 > limit {
        return Err(GunzipError::TooLarge);
    }
    // The buffer grew by doubling: up to twice the profile, held as long as
    // the profile is (until its copy is written).
    if out.capacity() - out.len() > out.len() / 8 {
        out.shrink_to_fit();
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum GunzipError {
    #[error("not valid gzip: {0}")]
    Corrupt(std::io::Error),
    #[error("too large once decompressed")]
    TooLarge,
}

/// Parses an index (plain or gzip).
pub fn parse(bytes: Vec<u8>) -> Result<Index, IndexError> {
    let bytes = gunzip_if_gzip(bytes, INDEX_LIMIT).map_err(|e| match e {
        GunzipError::Corrupt(e) => IndexError::Gzip(e),
        GunzipError::TooLarge => IndexError::TooLarge,
    })?;
    if bytes.len() as u64 > INDEX_LIMIT {
        return Err(IndexError::TooLarge);
    }
    parse_xml(&bytes)
}

/// Where the parser is in the document.
enum State {
    BeforeRoot,
    InRoot,
    /// Inside `<profile>`: the mtime attribute (None when absent; Err keeps a
    /// non-numeric value for the message), the name so far.
    InProfile {
        mtime: Option<Result<u64, String>>,
        name: String,
    },
    /// Inside some other element below the root, `depth` levels deep (ignored, as a
    /// later broker might add elements we do not know).
    InOther {
        depth: usize,
    },
    AfterRoot,
}

fn parse_xml(bytes: &[u8]) -> Result<Index, IndexError> {
    let (mut entries, mut problems) = match plain::scan(bytes) {
        Some(found) => found,
        None => parse_any(bytes)?,
    };
    drop_duplicates(&mut entries, &mut problems);
    drop_clashes(&mut entries, &mut problems);
    Ok(Index { entries, problems })
}

/// A profile's entry as the document gives it (the name unescaped, the
/// mtime attribute if any), checked and added to `entries`, or to
/// `problems` when it cannot be used.
fn add_entry(
    mut name: String,
    mtime: Option<Result<u64, String>>,
    entries: &mut Vec<Entry>,
    problems: &mut Vec<EntryError>,
) {
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        name = name.trim().to_string();
    }
    if let Err(problem) = check_name(&name) {
        problems.push(EntryError::HostileName { name, problem });
        return;
    }
    match mtime {
        None => problems.push(EntryError::NoMtime { name }),
        Some(Ok(mtime)) => entries.push(Entry { name, mtime }),
        Some(Err(m)) => problems.push(EntryError::BadMtime { name, mtime: m }),
    }
}

/// The entries and the entries' problems of any well-formed index, read
/// with an XML parser (duplicates and clashes not yet looked for).
fn parse_any(bytes: &[u8]) -> Result<(Vec<Entry>, Vec<EntryError>), IndexError> {
    let mut reader = Reader::from_reader(bytes);
    reader.config_mut().check_end_names = true;
    let xml_err = |reader: &Reader<&[u8]>, e: &dyn std::fmt::Display| IndexError::Xml {
        position: reader.error_position(),
        message: e.to_string(),
    };
    let mut state = State::BeforeRoot;
    // An entry takes some 60 bytes of the document.
    let mut entries: Vec<Entry> = Vec::with_capacity((bytes.len() / 64).min(1 << 20));
    let mut problems = Vec::new();
    loop {
        let event = reader.read_event().map_err(|e| xml_err(&reader, &e))?;
        match (&mut state, event) {
            (_, Event::Eof) => break,
            (State::BeforeRoot, Event::Start(e)) => {
                if e.name().as_ref() != b"profiles" {
                    return Err(IndexError::WrongRoot(
                        String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                    ));
                }
                state = State::InRoot;
            }
            (State::BeforeRoot, Event::Empty(e)) => {
                if e.name().as_ref() != b"profiles" {
                    return Err(IndexError::WrongRoot(
                        String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                    ));
                }
                state = State::AfterRoot;
            }
            (State::InRoot, Event::Start(e)) if e.name().as_ref() == b"profile" => {
                let mtime = match e.try_get_attribute("mtime").map_err(|err| xml_err(&reader, &err))? {
                    Some(a) => {
                        let v = a.unescape_value().map_err(|err| xml_err(&reader, &err))?;
                        Some(v.trim().parse::<u64>().map_err(|_| v.into_owned()))
                    }
                    None => None,
                };
                state = State::InProfile {
                    mtime,
                    name: String::new(),
                };
            }
            (State::InRoot, Event::Empty(e)) if e.name().as_ref() == b"profile" => {
                problems.push(EntryError::HostileName {
                    name: String::new(),
                    problem: "empty profile name",
                });
            }
            (State::InRoot, Event::Start(_)) => state = State::InOther { depth: 1 },
            (State::InRoot, Event::End(_)) => state = State::AfterRoot,
            (State::InProfile { name, .. }, Event::Text(t)) => {
                let text = t.xml_content().map_err(|err| xml_err(&reader, &err))?;
                if name.is_empty() {
                    *name = text.into_owned();
                } else {
                    name.push_str(&text);
                }
            }
            (State::InProfile { name, .. }, Event::CData(t)) => {
                name.push_str(&t.xml_content().map_err(|err| xml_err(&reader, &err))?);
            }
            (State::InProfile { name, .. }, Event::GeneralRef(r)) => {
                let resolved = match r.resolve_char_ref().map_err(|err| xml_err(&reader, &err))? {
                    Some(c) => c.to_string(),
                    None => {
                        let entity = r.decode().map_err(|err| xml_err(&reader, &err))?;
                        quick_xml::escape::resolve_xml_entity(&entity)
                            .ok_or_else(|| IndexError::Xml {
                                position: reader.buffer_position(),
                                message: format!("unknown entity &{entity};"),
                            })?
                            .to_string()
                    }
                };
                name.push_str(&resolved);
            }
            (State::InProfile { .. }, Event::Start(e) | Event::Empty(e)) => {
                return Err(IndexError::Nested {
                    element: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                    position: reader.buffer_position(),
                })
            }
            (State::InProfile { mtime, name }, Event::End(_)) => {
                let (name, mtime) = (std::mem::take(name), mtime.take());
                state = State::InRoot;
                add_entry(name, mtime, &mut entries, &mut problems);
            }
            (State::InOther { depth }, Event::Start(_)) => *depth += 1,
            (State::InOther { depth }, Event::End(_)) => {
                *depth -= 1;
                if *depth == 0 {
                    state = State::InRoot;
                }
            }
            (State::AfterRoot, Event::Start(e) | Event::Empty(e)) => {
                return Err(IndexError::Xml {
                    position: reader.buffer_position(),
                    message: format!("second root element <{}>", String::from_utf8_lossy(e.name().as_ref())),
                })
            }
            (State::BeforeRoot | State::AfterRoot, Event::Text(t)) if !t.iter().all(u8::is_ascii_whitespace) => {
                return Err(IndexError::Xml {
                    position: reader.buffer_position(),
                    message: "text outside the root element".into(),
                });
            }
            // Declarations, comments, processing instructions, whitespace between entries.
            _ => {}
        }
    }
    if !matches!(state, State::AfterRoot) {
        return Err(IndexError::Truncated);
    }
    Ok((entries, problems))
}

/// Removes every entry whose name is listed more than once (which of them
/// is right cannot be known: the profile fails), keeping document order.
fn drop_duplicates(entries: &mut Vec<Entry>, problems: &mut Vec<EntryError>) {
    // The names' hashes first (a set of u64 is quicker to fill than one of
    // names): when no two share a hash, no name is repeated. Only otherwise
    // are the names themselves compared.
    let hasher = foldhash::fast::FixedState::default();
    let mut hashes: HashSet<u64> = HashSet::with_capacity(entries.len());
    if entries.iter().all(|e| hashes.insert(hasher.hash_one(&e.name))) {
        return;
    }
    let mut seen: HashSet<&str> = HashSet::with_capacity(entries.len());
    let mut twice: HashSet<&str> = HashSet::new();
    for e in entries.iter() {
        if !seen.insert(&e.name) {
            twice.insert(&e.name);
        }
    }
    if twice.is_empty() {
        return;
    }
    let mut duplicated: Vec<String> = twice.into_iter().map(str::to_string).collect();
    duplicated.sort();
    let set: HashSet<&str> = duplicated.iter().map(String::as_str).collect();
    entries.retain(|e| !set.contains(e.name.as_str()));
    problems.extend(duplicated.into_iter().map(|name| EntryError::Duplicate { name }));
}

/// Removes every entry below another one (`x.json/y.json` below
/// `x.json`): its cached copy would need a directory where the other's copy
/// is a file, so it could never be cached and would be published on every
/// run. It fails as a bad entry; the other is kept.
fn drop_clashes(entries: &mut Vec<Entry>, problems: &mut Vec<EntryError>) {
    if !entries.iter().any(|e| e.name.contains('/')) {
        return;
    }
    let names: HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let clashes: Vec<(String, String)> = entries
        .iter()
        .filter_map(|e| {
            let parent = e
                .name
                .match_indices('/')
                .map(|(i, _)| &e.name[..i])
                .find(|p| names.contains(p))?;
            Some((e.name.clone(), parent.to_string()))
        })
        .collect();
    if clashes.is_empty() {
        return;
    }
    let below: HashSet<&str> = clashes.iter().map(|(n, _)| n.as_str()).collect();
    entries.retain(|e| !below.contains(e.name.as_str()));
    problems.extend(
        clashes
            .into_iter()
            .map(|(name, other)| EntryError::Clash { name, other }),
    );
}

/// The broker's index set against the cached one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Matched<'a> {
    /// The cached mtime of each of `index.entries`, in the same order.
    pub olds: Vec<Option<u64>>,
    /// Bad entries of the index that the cache knows, with their cached mtime.
    pub problem_olds: Vec<(&'a str, u64)>,
    /// Cached profiles the index no longer lists.
    pub removed: Vec<String>,
}

/// Finds each entry of `index` in `cached`. The cached index is written in
/// the broker's order, so the two usually agree entry for entry and are
/// walked side by side; from the first difference on, the rest of the cache
/// is looked up by name. Linear either way.
pub fn match_cached(index: &Index, cached: Vec<Entry>) -> Matched<'_> {
    let mut olds = Vec::with_capacity(index.entries.len());
    let same = index
        .entries
        .iter()
        .zip(&cached)
        .take_while(|(new, old)| new.name == old.name)
        .count();
    olds.extend(cached[..same].iter().map(|e| Some(e.mtime)));
    let mut rest: HashMap<String, u64> = HashMap::with_capacity(cached.len() - same);
    rest.extend(cached.into_iter().skip(same).map(|e| (e.name, e.mtime)));
    olds.extend(index.entries[same..].iter().map(|e| rest.remove(&e.name)));
    let problem_olds = index
        .problems
        .iter()
        .filter_map(|p| rest.remove(p.name()).map(|old| (p.name(), old)))
        .collect();
    Matched {
        olds,
        problem_olds,
        removed: rest.into_keys().collect(),
    }
}

/// [`match_cached`] against the cached index as read from disk. In the
/// usual case it lists the broker's entries in the broker's order (the
/// index a run records is the broker's, with a few mtimes held back), and
/// it is then read in step with them instead of being parsed into entries
/// of its own; otherwise it is parsed. `Err` when it has to be parsed and
/// cannot be.
pub fn match_cached_document(index: &Index, cached: Vec<u8>) -> Result<Matched<'_>, IndexError> {
    if cached.len() as u64 <= INDEX_LIMIT {
        if let Some(mtimes) = plain::mtimes_in_order(&index.entries, &cached) {
            return Ok(Matched {
                olds: mtimes.into_iter().map(Some).collect(),
                ..Matched::default()
            });
        }
    }
    Ok(match_cached(index, parse(cached)?.entries))
}

/// Writes `entries` in the broker's own format (one entry a line).
pub fn write_cached<'a, W: Write>(
    out: &mut W,
    entries: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::io::Result<()> {
    out.write_all(b"<?xml version='1.0' encoding='utf-8'?>\n<profiles>\n")?;
    for (name, mtime) in entries {
        out.write_all(b"<profile mtime='")?;
        out.write_all(decimal(mtime, &mut [0; 20]))?;
        out.write_all(b"'>")?;
        out.write_all(quick_xml::escape::escape(name).as_bytes())?;
        out.write_all(b"</profile>\n")?;
    }
    out.write_all(b"</profiles>")?;
    Ok(())
}

/// `n` in decimal, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER: &str = "<?xml version='1.0' encoding='utf-8'?>\n<profiles>\n\
        <profile mtime='1486571445'>ci-host1.example.org.json</profile>\n\
        <profile mtime='1486571446'>ns/sub/host2.example.org.json.gz</profile>\n\
        </profiles>";

    fn entries(pairs: &[(&str, u64)]) -> Vec<Entry> {
        pairs
            .iter()
            .map(|(n, m)| Entry {
                name: n.to_string(),
                mtime: *m,
            })
            .collect()
    }

    #[test]
    fn matching_the_cache_gives_the_same_answer_in_any_order() {
        let index = Index {
            entries: entries(&[("a", 2), ("b", 1), ("new", 5), ("c", 3)]),
            problems: vec![
                EntryError::Duplicate { name: "dup".into() },
                EntryError::NoMtime { name: "fresh".into() },
            ],
        };
        let want_olds = vec![Some(1), Some(1), None, Some(3)];
        // Same order, reordered, shorter, longer, empty.
        for cached in [
            vec![("a", 1), ("b", 1), ("c", 3), ("dup", 7), ("gone", 9)],
            vec![("gone", 9), ("c", 3), ("dup", 7), ("b", 1), ("a", 1)],
            vec![("a", 1), ("b", 1), ("dup", 7), ("c", 3), ("gone", 9)],
        ] {
            let m = match_cached(&index, entries(&cached));
            assert_eq!(m.olds, want_olds, "{cached:?}");
            assert_eq!(m.problem_olds, vec![("dup", 7)], "{cached:?}");
            assert_eq!(m.removed, vec!["gone".to_string()], "{cached:?}");
        }
        let m = match_cached(&index, entries(&[("a", 1)]));
        assert_eq!(m.olds, vec![Some(1), None, None, None]);
        assert!(m.removed.is_empty() && m.problem_olds.is_empty());
        let m = match_cached(&index, Vec::new());
        assert_eq!(m.olds, vec![None; 4]);
        let everything = match_cached(&index, entries(&[("a", 2), ("b", 1), ("new", 5), ("c", 3), ("x", 1)]));
        assert_eq!(everything.olds, vec![Some(2), Some(1), Some(5), Some(3)]);
        assert_eq!(everything.removed, vec!["x".to_string()]);
    }

    #[test]
    fn a_cached_document_gives_what_its_entries_give() {
        let index = Index {
            entries: entries(&[("a", 2), ("b&c", 1), ("new", 5), ("d", 3)]),
            problems: vec![EntryError::Duplicate { name: "dup".into() }],
        };
        let document = |pairs: &[(&str, u64)]| {
            let mut doc = Vec::new();
            write_cached(&mut doc, pairs.iter().copied()).unwrap();
            doc
        };
        // In the broker's order (read in step), and every other way (parsed).
        for cached in [
            &[("a", 1), ("b&c", 1), ("new", 5), ("d", 3)][..],
            &[("a", 1), ("b&c", 1), ("new", 5), ("d", 3), ("dup", 7)],
            &[("d", 3), ("a", 1)],
            &[("a", 1), ("b&c", 1), ("gone", 9)],
            &[],
        ] {
            let want = match_cached(&index, entries(cached));
            assert_eq!(
                match_cached_document(&index, document(cached)).unwrap(),
                want,
                "{cached:?}"
            );
        }
        let in_step = Index {
            entries: entries(&[("a", 2), ("new", 5)]),
            problems: Vec::new(),
        };
        let m = match_cached_document(&in_step, document(&[("a", 1), ("new", 5)])).unwrap();
        assert_eq!(m.olds, vec![Some(1), Some(5)]);
        assert!(matches!(
            match_cached_document(&index, b"<profiles><profile mtime='1'>a</profile>".to_vec()),
            Err(IndexError::Truncated)
        ));
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 1486571445, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn reads_the_brokers_format() {
        let idx = parse(BROKER.as_bytes().to_vec()).unwrap();
        assert_eq!(
            idx.entries,
            vec![
                Entry {
                    name: "ci-host1.example.org.json".into(),
                    mtime: 1486571445
                },
                Entry {
                    name: "ns/sub/host2.example.org.json.gz".into(),
                    mtime: 1486571446
                },
            ]
        );
        assert!(idx.problems.is_empty());
    }

    #[test]
    fn layout_and_quoting_do_not_matter() {
        let doc = r#"<profiles><profile
            mtime="12">a&amp;b.json</profile><!-- c --><profile mtime='13'><![CDATA[c.json]]></profile></profiles>"#;
        let idx = parse(doc.as_bytes().to_vec()).unwrap();
        let names: Vec<_> = idx.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a&b.json", "c.json"]);
    }

    #[test]
    fn gzip_is_recognised_by_magic() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(BROKER.as_bytes()).unwrap();
        let idx = parse(enc.finish().unwrap()).unwrap();
        assert_eq!(idx.entries.len(), 2);
    }

    #[test]
    fn truncated_or_invalid_documents_are_refused() {
        for cut in [12, 20, 40] {
            let doc = &BROKER[..BROKER.len() - cut];
            let err = parse(doc.as_bytes().to_vec()).unwrap_err();
            assert!(matches!(err, IndexError::Truncated | IndexError::Xml { .. }), "{err}");
        }
        let doc = &BROKER[..BROKER.len() - 12];
        assert!(matches!(parse(doc.as_bytes().to_vec()), Err(IndexError::Truncated)));
        assert!(matches!(
            parse(b"<profiles><profile mtime='1'>a</profil></profiles>".to_vec()),
            Err(IndexError::Xml { .. })
        ));
        assert!(matches!(
            parse(b"<html>nope</html>".to_vec()),
            Err(IndexError::WrongRoot(_))
        ));
        assert!(matches!(parse(Vec::new()), Err(IndexError::Truncated)));
    }

    #[test]
    fn bad_entries_are_named_and_others_kept() {
        let doc = "<profiles><profile>nomtime.json</profile><profile mtime='soon'>bad.json</profile>\
            <profile mtime='1'>dup.json</profile><profile mtime='2'>dup.json</profile><profile mtime='3'>dup.json</profile>\
            <profile mtime='1'>../etc/passwd</profile><profile mtime='1'>/abs.json</profile>\
            <profile mtime='1'>a//b.json</profile><profile mtime='1'>a\\b.json</profile>\
            <profile mtime='1'>good.json</profile></profiles>";
        let idx = parse(doc.as_bytes().to_vec()).unwrap();
        assert_eq!(
            idx.entries,
            vec![Entry {
                name: "good.json".into(),
                mtime: 1
            }]
        );
        let named: Vec<_> = idx.problems.iter().map(|p| p.name().to_string()).collect();
        assert_eq!(
            named,
            [
                "nomtime.json",
                "bad.json",
                "../etc/passwd",
                "/abs.json",
                "a//b.json",
                "a\\b.json",
                "dup.json"
            ]
        );
        assert_eq!(
            idx.problems[1].to_string(),
            "index entry \"bad.json\" has a non-numeric mtime \"soon\""
        );
    }

    #[test]
    fn a_name_below_another_is_a_bad_entry() {
        let doc = "<profiles><profile mtime='1'>x.json/y.json</profile><profile mtime='1'>x.json</profile>\
            <profile mtime='1'>ns/a.json</profile><profile mtime='1'>x.json/z/w.json</profile></profiles>";
        let idx = parse(doc.as_bytes().to_vec()).unwrap();
        let names: Vec<_> = idx.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["x.json", "ns/a.json"]);
        assert_eq!(
            idx.problems,
            [
                EntryError::Clash {
                    name: "x.json/y.json".into(),
                    other: "x.json".into()
                },
                EntryError::Clash {
                    name: "x.json/z/w.json".into(),
                    other: "x.json".into()
                },
            ]
        );
    }

    #[test]
    fn cached_format_round_trips() {
        let mut out = Vec::new();
        write_cached(&mut out, [("a&b<c>.json", 5u64), ("ns/d.json", 1486571445)]).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("<?xml version='1.0' encoding='utf-8'?>\n<profiles>\n<profile mtime='5'>"));
        let idx = parse(out).unwrap();
        assert_eq!(idx.entries[0].name, "a&b<c>.json");
        assert_eq!(idx.entries[1].mtime, 1486571445);
    }
}
