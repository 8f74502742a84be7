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

use memchr::memchr;

use super::{add_entry, Entry, EntryError};

/// The entries of a document in the broker's layout, or `None` when it is
/// not one (the caller then parses it as XML).
pub(super) fn scan(bytes: &[u8]) -> Option<(Vec<Entry>, Vec<EntryError>)> {
    // Validated once: each name is then a slice of it.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut at = text.len() - declaration(bytes)?.len();
    at += skip_space(&bytes[at..]);
    at += strip(&bytes[at..], b"<profiles>")?;
    // An entry takes some 60 bytes of the document.
    let mut entries: Vec<Entry> = Vec::with_capacity((bytes.len() / 64).min(1 << 20));
    let mut problems = Vec::new();
    loop {
        at += skip_space(&bytes[at..]);
        if let Some(n) = strip(&bytes[at..], b"</profiles>") {
            at += n;
            return (skip_space(&bytes[at..]) == bytes.len() - at).then_some((entries, problems));
        }
        at += strip(&bytes[at..], b"<profile mtime=")?;
        let quote = *bytes.get(at)?;
        if quote != b'\'' && quote != b'"' {
            return None;
        }
        at += 1;
        let digits = &bytes[at..at + memchr(quote, &bytes[at..])?];
        at += digits.len() + 1;
        at += strip(&bytes[at..], b">")?;
        let mtime = decimal(digits)?;
        let start = at;
        at += memchr(b'<', &bytes[at..])?;
        let name = &bytes[start..at];
        if !name
            .iter()
            .all(|&b| (b' '..=b'~').contains(&b) && b != b'&' && b != b']')
        {
            return None;
        }
        at += strip(&bytes[at..], b"</profile>")?;
        add_entry(
            text[start..start + name.len()].to_string(),
            Some(Ok(mtime)),
            &mut entries,
            &mut problems,
        );
    }
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
        let mut taken = 0;
        for _ in 0..20_000 {
            let mut damaged = doc.clone();
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
            taken += usize::from(agree(&damaged));
        }
        // Some damage leaves the layout (spacing, a name's letters): not vacuous.
        assert!(taken > 1000, "only {taken} damaged documents scanned");
    }
}
