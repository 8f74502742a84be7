//! The index as the broker writes it, read without an XML parser.
//!
//! Aquilon writes `profiles-info.xml` one way only, and [`super::write_cached`]
//! writes the cached index the same way: an XML declaration, `<profiles>`,
//! then one `<profile mtime='N'>NAME</profile>` a line. Reading that layout
//! with a byte scanner instead of quick-xml's event reader takes about a
//! quarter of the CPU (10 ms against 40 ms for 100,000 entries; the two
//! indexes of a run were a third of its CPU). [`scan`] accepts only documents in that layout whose names
//! are printable ASCII without entity or character references, for which
//! it gives exactly what the XML parser would give; anything else (a
//! comment, another attribute, other spacing inside a tag, a reference, a
//! non-ASCII name, gzip, a truncated or malformed document) gives `None`,
//! and the whole document goes to the XML parser, which knows what to
//! accept and what to refuse, and says why.
//!
//! The cached index usually lists the broker's entries in the broker's
//! order: [`mtimes_in_order`] then reads it in step with them, comparing
//! names byte for byte, instead of scanning it into entries of its own
//! (100,000 names allocated, checked and hashed a second time, on another
//! thread that slowed the broker's index down by half while both ran).

use memchr::memchr;

use super::{add_entry, Entry, EntryError};

/// The entries of a document in the broker's layout, or `None` when it is
/// not one (the caller then parses it as XML).
pub(super) fn scan(bytes: &[u8]) -> Option<(Vec<Entry>, Vec<EntryError>)> {
    // Validated once: each name is then a slice of it.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut at = open(bytes)?;
    // An entry takes some 60 bytes of the document.
    let mut entries: Vec<Entry> = Vec::with_capacity((bytes.len() / 64).min(1 << 20));
    let mut problems = Vec::new();
    while let Next::Entry(mtime, name) = next(bytes, &mut at)? {
        if !bytes[name.clone()]
            .iter()
            .all(|&b| (b' '..=b'~').contains(&b) && b != b'&' && b != b']')
        {
            return None;
        }
        add_entry(text[name].to_string(), Some(Ok(mtime)), &mut entries, &mut problems);
    }
    Some((entries, problems))
}

/// The mtimes a cached index gives `entries` when it lists exactly those
/// names, in that order, in the broker's layout (as [`super::write_cached`]
/// writes the index a run ends with, and the broker keeps its order from
/// one index to the next): the usual case, read without parsing the cached
/// index into entries of its own. `None` for anything else, including a
/// name written with a reference or `]` (the caller then parses it).
///
/// What it gives is what parsing the cached index and matching it entry by
/// entry would: each name is compared byte for byte with an entry of the
/// broker's index, which was checked, had its white space trimmed and is
/// listed once; the mtimes are read as [`scan`] reads them.
pub(super) fn mtimes_in_order(entries: &[Entry], cached: &[u8]) -> Option<Vec<u64>> {
    let mut at = open(cached)?;
    let mut mtimes = Vec::with_capacity(entries.len());
    for entry in entries {
        let Next::Entry(mtime, name) = next(cached, &mut at)? else {
            return None;
        };
        let name = &cached[name];
        if name != entry.name.as_bytes() || name.iter().any(|&b| b == b'&' || b == b']') {
            return None;
        }
        mtimes.push(mtime);
    }
    matches!(next(cached, &mut at)?, Next::End).then_some(mtimes)
}

/// Where the entries begin: past the declaration, if any, and `<profiles>`.
fn open(bytes: &[u8]) -> Option<usize> {
    let mut at = bytes.len() - declaration(bytes)?.len();
    at += skip_space(&bytes[at..]);
    Some(at + strip(&bytes[at..], b"<profiles>")?)
}

/// What follows an entry (or `<profiles>`) in the broker's layout.
enum Next {
    /// `<profile mtime='N'>NAME</profile>`: N, and where NAME lies.
    Entry(u64, std::ops::Range<usize>),
    /// `</profiles>`, then only white space.
    End,
}

/// What comes from `*at` on, `*at` moving past it; `None` when it is
/// neither an entry nor the end of the document in the broker's layout.
fn next(bytes: &[u8], at: &mut usize) -> Option<Next> {
    *at += skip_space(&bytes[*at..]);
    if let Some(n) = strip(&bytes[*at..], b"</profiles>") {
        let rest = &bytes[*at + n..];
        return (skip_space(rest) == rest.len()).then_some(Next::End);
    }
    *at += strip(&bytes[*at..], b"<profile mtime=")?;
    let quote = *bytes.get(*at)?;
    if quote != b'\'' && quote != b'"' {
        return None;
    }
    *at += 1;
    let digits = &bytes[*at..*at + memchr(quote, &bytes[*at..])?];
    *at += digits.len() + 1;
    *at += strip(&bytes[*at..], b">")?;
    let mtime = decimal(digits)?;
    let start = *at;
    *at += memchr(b'<', &bytes[*at..])?;
    let name = start..*at;
    *at += strip(&bytes[*at..], b"</profile>")?;
    Some(Next::Entry(mtime, name))
}

/// The value of a non-empty run of ASCII digits; `None` for anything else,
/// or a value too large for a u64 (the XML parser reports it as a bad mtime).
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .flatten()
    })
}

/// The length of `prefix` when `bytes` starts with it.
fn strip(bytes: &[u8], prefix: &[u8]) -> Option<usize> {
    bytes.starts_with(prefix).then_some(prefix.len())
}

/// What follows the XML declaration, if there is one and it says what the
/// broker's does (version 1.0, UTF-8), or the whole document when it has
/// none.
fn declaration(bytes: &[u8]) -> Option<&[u8]> {
    let Some(rest) = bytes.strip_prefix(b"<?xml") else {
        return Some(bytes);
    };
    let end = memchr::memmem::find(rest, b"?>")?;
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    let space = |c: char| c.is_ascii() && is_space(c as u8);
    if !text.starts_with(space) {
        return None;
    }
    let mut version = false;
    for pseudo in text.split(space).filter(|s| !s.is_empty()) {
        let (key, value) = pseudo.split_once('=')?;
        let value = value
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))?;
        match key {
            "version" if value == "1.0" => version = true,
            "encoding" if value.eq_ignore_ascii_case("utf-8") => {}
            "standalone" if value == "yes" || value == "no" => {}
            _ => return None,
        }
    }
    version.then_some(&rest[end + 2..])
}

/// XML's white space.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// The length of the XML white space `bytes` starts with.
fn skip_space(bytes: &[u8]) -> usize {
    bytes.iter().position(|&b| !is_space(b)).unwrap_or(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::super::{parse_any, write_cached};
    use super::*;

    /// What the scanner gives, if anything, is what the XML parser gives.
    fn agree(doc: &[u8]) -> bool {
        let scanned = scan(doc);
        if let Some(scanned) = &scanned {
            let parsed = parse_any(doc).unwrap_or_else(|e| {
                panic!(
                    "the scanner accepted what the XML parser refuses ({e}): {:?}",
                    String::from_utf8_lossy(doc)
                )
            });
            assert_eq!(scanned, &parsed, "{:?}", String::from_utf8_lossy(doc));
        }
        scanned.is_some()
    }

    #[test]
    fn reads_the_brokers_layout_and_the_cached_index() {
        let broker = b"<?xml version='1.0' encoding='utf-8'?>\n<profiles>\n\
            <profile mtime='1486571445'>ci-host1.example.org.json</profile>\n\
            <profile mtime='0012'>ns/sub/host2.example.org.json.gz</profile>\n\
            <profile mtime=\"7\">  spaced.json </profile>\n\
            <profile mtime='8'>../up.json</profile>\n\
            <profile mtime='9'></profile>\n\
            </profiles>\n";
        assert!(agree(broker));
        let (entries, problems) = scan(broker).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].mtime, 12);
        assert_eq!(entries[2].name, "spaced.json");
        assert_eq!(problems.len(), 2);
        let mut cached = Vec::new();
        write_cached(&mut cached, [("a.json", 1), ("ns/b.json", u64::MAX)]).unwrap();
        assert!(agree(&cached));
        for doc in [
            &b"<profiles></profiles>"[..],
            b"<?xml version=\"1.0\"?><profiles>\r\n</profiles>",
            b"<?xml version='1.0' encoding='UTF-8' standalone='yes' ?>\n<profiles/>",
        ] {
            agree(doc);
        }
    }

    #[test]
    fn leaves_anything_else_to_the_xml_parser() {
        for doc in [
            // A reference, a comment, CDATA, another attribute, other spacing, non-ASCII.
            &b"<profiles><profile mtime='1'>a&amp;b.json</profile></profiles>"[..],
            b"<profiles><!-- x --><profile mtime='1'>a.json</profile></profiles>",
            b"<profiles><profile mtime='1'><![CDATA[a.json]]></profile></profiles>",
            b"<profiles><profile mtime='1' x='2'>a.json</profile></profiles>",
            b"<profiles><profile  mtime='1'>a.json</profile></profiles>",
            b"<profiles><profile mtime='1'>h\xc3\xa9.json</profile></profiles>",
            b"<profiles><profile mtime='1'>a\x85.json</profile></profiles>",
            b"<profiles><profile mtime='99999999999999999999'>a.json</profile></profiles>",
            b"<profiles><profile mtime=' 1'>a.json</profile></profiles>",
            b"<profiles><profile>a.json</profile></profiles>",
            // Truncated, a second root, text after it, another version or encoding.
            b"<profiles><profile mtime='1'>a.json</profile>",
            b"<profiles></profiles><profiles></profiles>",
            b"<profiles></profiles>x",
            b"<?xml version='1.1'?><profiles></profiles>",
            b"<?xml version='1.0' encoding='latin-1'?><profiles></profiles>",
            b"<?xml version='1.0'<profiles></profiles>",
            b"\xef\xbb\xbf<profiles></profiles>",
        ] {
            assert!(!agree(doc), "{:?}", String::from_utf8_lossy(doc));
        }
    }

    /// Thousands of small damages to a document in the broker's layout:
    /// whatever the scanner still takes, the XML parser reads the same.
    #[test]
    fn agrees_with_the_xml_parser_on_damaged_documents() {
        let mut doc = Vec::new();
        write_cached(
            &mut doc,
            [("a.json", 1), ("ns/b.json", 22), ("c", 333), ("d.json.gz", 4444)],
        )
        .unwrap();
        let taken = damaged(&doc, 20_000).filter(|d| agree(d)).count();
        // Some damage leaves the layout (spacing, a name's letters): not vacuous.
        assert!(taken > 1000, "only {taken} damaged documents scanned");
    }

    /// A cached index read in step with the broker's gives what parsing it
    /// and matching it would, whatever was done to it.
    #[test]
    fn reading_in_step_agrees_with_parsing_and_matching() {
        let index = super::super::Index {
            entries: [("a.json", 10), ("ns/b.json", 11), ("c", 12)]
                .map(|(name, mtime)| Entry {
                    name: name.into(),
                    mtime,
                })
                .into(),
            problems: Vec::new(),
        };
        let mut cached = Vec::new();
        write_cached(
            &mut cached,
            index.entries.iter().map(|e| (e.name.as_str(), e.mtime * 7)),
        )
        .unwrap();
        let in_step = |doc: &[u8]| {
            let found = mtimes_in_order(&index.entries, doc);
            if let Some(mtimes) = &found {
                let parsed = super::super::parse(doc.to_vec()).unwrap_or_else(|e| {
                    panic!(
                        "read in step what the XML parser refuses ({e}): {:?}",
                        String::from_utf8_lossy(doc)
                    )
                });
                let matched = super::super::match_cached(&index, parsed.entries);
                assert_eq!(
                    (matched.olds, matched.problem_olds.len(), matched.removed.len()),
                    (mtimes.iter().copied().map(Some).collect(), 0, 0),
                    "{:?}",
                    String::from_utf8_lossy(doc)
                );
            }
            found.is_some()
        };
        assert!(in_step(&cached));
        assert_eq!(mtimes_in_order(&index.entries, &cached), Some(vec![70, 77, 84]));
        assert!(in_step(b"<profiles>\n <profile mtime=\"1\">a.json</profile><profile mtime='02'>ns/b.json</profile>\r\n<profile mtime='3'>c</profile></profiles>\n"));
        // Not in step: another order, one more or one less, a name written
        // otherwise (trimmed by the parser, a reference), another layout.
        for doc in [
            &b"<profiles><profile mtime='1'>ns/b.json</profile><profile mtime='1'>a.json</profile><profile mtime='1'>c</profile></profiles>"[..],
            b"<profiles><profile mtime='1'>a.json</profile><profile mtime='1'>ns/b.json</profile></profiles>",
            b"<profiles><profile mtime='1'>a.json</profile><profile mtime='1'>ns/b.json</profile><profile mtime='1'>c</profile><profile mtime='1'>x</profile></profiles>",
            b"<profiles><profile mtime='1'> a.json</profile><profile mtime='1'>ns/b.json</profile><profile mtime='1'>c</profile></profiles>",
            b"<profiles><profile mtime='1'>&#97;.json</profile><profile mtime='1'>ns/b.json</profile><profile mtime='1'>c</profile></profiles>",
            b"<profiles><!-- --><profile mtime='1'>a.json</profile><profile mtime='1'>ns/b.json</profile><profile mtime='1'>c</profile></profiles>",
        ] {
            assert!(!in_step(doc), "{:?}", String::from_utf8_lossy(doc));
        }
        let taken = damaged(&cached, 20_000).filter(|d| in_step(d)).count();
        assert!(taken > 200, "only {taken} damaged documents read in step");
        // Names the broker wrote with references, or with `]`: never read in
        // step (the cached index writes them escaped), always parsed.
        for tricky in [
            &b"<profiles><profile mtime='1'>d&amp;amp;e.json</profile></profiles>"[..],
            b"<profiles><profile mtime='1'>f]].json</profile></profiles>",
        ] {
            let index = super::super::parse(tricky.to_vec()).unwrap();
            assert_eq!(index.entries.len(), 1);
            let mut cached = Vec::new();
            write_cached(&mut cached, index.entries.iter().map(|e| (e.name.as_str(), 2))).unwrap();
            assert_eq!(mtimes_in_order(&index.entries, &cached), None);
            assert_eq!(mtimes_in_order(&index.entries, tricky), None);
        }
    }

    /// `count` copies of `doc`, each with one or two small damages in
    /// random places (the same ones every time).
    fn damaged(doc: &[u8], count: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
        let pieces: [&[u8]; 16] = [
            b"<",
            b">",
            b"'",
            b"\"",
            b"&",
            b"&amp;",
            b"/",
            b" ",
            b"\n",
            b"\r",
            b"]]>",
            b"<!--x-->",
            b"\0",
            b"\xc3",
            b"x",
            b"1",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        (0..count).map(move |_| {
            let mut damaged = doc.to_vec();
            for _ in 0..1 + next(2) {
                let at = next(damaged.len() + 1);
                match next(3) {
                    0 => {
                        damaged.splice(at..at, pieces[next(pieces.len())].iter().copied());
                    }
                    1 if at < damaged.len() => {
                        damaged.remove(at);
                    }
                    _ => {
                        let end = (at + 1 + next(8)).min(damaged.len());
                        damaged.splice(at..end, pieces[next(pieces.len())].iter().copied());
                    }
                }
            }
            damaged
        })
    }
}
