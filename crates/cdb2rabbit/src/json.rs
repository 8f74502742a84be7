//! Comparing two profiles as JSON, cheaply.
//!
//! A changed profile is compared with its cached copy as JSON (so a
//! re-serialisation with other key order or spacing is not a change).
//! Parsing both into `serde_json::Value` allocated every key and an IndexMap
//! per object, and was the largest CPU cost of a run after the connections.
//! [`Json`] is the same tree borrowing its strings from the bytes, with the
//! same equality as `Value`: objects compare as maps (key order ignored, a
//! repeated key keeps its last value), numbers as `serde_json::Number`
//! (so `1` and `1.0` differ, as they do for `Value`). It is parsed by
//! serde_json itself, so what is valid JSON, and the error messages, do not
//! change.
//!
//! Most profiles compared differ: their mtime changed because their
//! content did. [`same`] first reduces each document to a [digest](digest)
//! that equal documents share, in one pass that builds no tree; different
//! digests prove a change, and only equal ones (or a document with a
//! repeated key, which the digest cannot weigh) are compared as trees.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

/// A JSON document whose strings borrow from the input where they can.
#[derive(Debug, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Sorted by key, one entry per key (the last one given): equal as a
    /// `Vec` exactly when equal as maps.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

/// Whether `new` and `old` are the same JSON document ([`Json`] equality):
/// `Err` when `new` is not JSON, `false` when only `old` is not.
pub fn same(new: &[u8], old: &[u8]) -> Result<bool, serde_json::Error> {
    let new_digest = digest(new)?;
    let Ok(old_digest) = digest(old) else {
        return Ok(false);
    };
    match (new_digest, old_digest) {
        (Some(a), Some(b)) if a != b => Ok(false),
        _ => Ok(parse(old).is_ok_and(|old| parse(new).is_ok_and(|new| new == old))),
    }
}

/// A digest of the document in `bytes` that every equal document (as
/// [`Json`]: any key order, spacing or escaping) shares; `None` when an
/// object repeats a key (the last one counts, which a digest of the
/// entries cannot tell). Different digests mean different documents.
pub fn digest(bytes: &[u8]) -> Result<Option<u64>, serde_json::Error> {
    serde_json::from_slice::<Digest>(bytes).map(|d| d.0)
}

/// A document's digest, `None` for one with a repeated key.
struct Digest(Option<u64>);

/// Mixes `value` into `state` (splitmix64's finaliser over the pair).
fn mix(state: u64, value: u64) -> u64 {
    let mut z = state.rotate_left(23) ^ value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn digest_str(kind: u64, s: &str) -> u64 {
    use std::hash::BuildHasher;
    mix(kind, foldhash::quality::FixedState::with_seed(kind).hash_one(s))
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DigestVisitor)
    }
}

struct DigestVisitor;

// The kinds of value, kept apart in the digest.
const NULL: u64 = 1;
const BOOL: u64 = 2;
const UINT: u64 = 3;
const NEG_INT: u64 = 4;
const FLOAT: u64 = 5;
const STRING: u64 = 6;
const ARRAY: u64 = 7;
const OBJECT: u64 = 8;
const KEY: u64 = 9;

impl<'de> Visitor<'de> for DigestVisitor {
    type Value = Digest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Digest, E> {
        Ok(Digest(Some(mix(BOOL, v.into()))))
    }

    // Numbers as `Json` holds them: non-negative integers are one kind
    // whichever way they were read, and -0.0 equals 0.0.
    fn visit_i64<E>(self, v: i64) -> Result<Digest, E> {
        Ok(Digest(Some(match u64::try_from(v) {
            Ok(u) => mix(UINT, u),
            Err(_) => mix(NEG_INT, v as u64),
        })))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Digest, E> {
        Ok(Digest(Some(mix(UINT, v))))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Digest, E> {
        Ok(Digest(Some(match Number::from_f64(v) {
            Some(_) if v == 0.0 => mix(FLOAT, 0),
            Some(_) => mix(FLOAT, v.to_bits()),
            None => mix(NULL, 0),
        })))
    }

    fn visit_str<E>(self, v: &str) -> Result<Digest, E> {
        Ok(Digest(Some(digest_str(STRING, v))))
    }

    fn visit_none<E>(self) -> Result<Digest, E> {
        Ok(Digest(Some(mix(NULL, 0))))
    }

    fn visit_unit<E>(self) -> Result<Digest, E> {
        Ok(Digest(Some(mix(NULL, 0))))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Digest, D::Error> {
        Digest::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Digest, A::Error> {
        let (mut state, mut known) = (ARRAY, true);
        while let Some(Digest(item)) = seq.next_element()? {
            match item {
                Some(d) if known => state = mix(state, d),
                _ => known = false,
            }
        }
        Ok(Digest(known.then_some(state)))
    }

    /// The entries' digests summed, so that their order does not count;
    /// the keys' own digests, sorted, show a repeated key.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Digest, A::Error> {
        let (mut sum, mut count, mut known) = (0u64, 0u64, true);
        let mut keys = Keys::default();
        while let Some(KeyDigest(key)) = map.next_key()? {
            let Digest(value) = map.next_value()?;
            match value {
                Some(v) if known => {
                    sum = sum.wrapping_add(mix(key, v));
                    count += 1;
                    keys.push(key);
                }
                _ => known = false,
            }
        }
        Ok(Digest((known && !keys.repeats()).then(|| mix(mix(OBJECT, count), sum))))
    }
}

/// The key digests of one object, on the stack while they are few.
#[derive(Default)]
struct Keys {
    few: [u64; 8],
    len: usize,
    more: Vec<u64>,
}

impl Keys {
    fn push(&mut self, key: u64) {
        if self.len < self.few.len() {
            self.few[self.len] = key;
        } else {
            if self.more.is_empty() {
                self.more.extend_from_slice(&self.few);
            }
            self.more.push(key);
        }
        self.len += 1;
    }

    /// Whether a key digest comes twice (a repeated key, or two keys
    /// sharing a digest: either way the trees are compared).
    fn repeats(&mut self) -> bool {
        let keys = if self.len <= self.few.len() {
            &mut self.few[..self.len]
        } else {
            &mut self.more[..]
        };
        keys.sort_unstable();
        keys.windows(2).any(|w| w[0] == w[1])
    }
}

/// An object key's digest.
struct KeyDigest(u64);

impl<'de> Deserialize<'de> for KeyDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyDigest;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_str<E>(self, v: &str) -> Result<KeyDigest, E> {
                Ok(KeyDigest(digest_str(KEY, v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Parses `bytes` as one JSON document (trailing data is an error, as for
/// `serde_json::from_slice`).
pub fn parse(bytes: &[u8]) -> Result<Json<'_>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    // The conversions serde_json's own Value visitor makes.
    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Json<'de>, D::Error> {
        Json::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut entries: Vec<(Cow<'de, str>, Json<'de>)> = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(Key(key)) = map.next_key()? {
            let value = map.next_value()?;
            entries.push((key, value));
        }
        // Stable: of entries with the same key, the last given comes last and is kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut unique: Vec<(Cow<'de, str>, Json<'de>)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match unique.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => unique.push(entry),
            }
        }
        Ok(Json::Object(unique))
    }
}

/// An object key, borrowed when it has no escapes (serde's own `Cow<str>`
/// always copies).
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// `Json` equality must be `Value` equality, whatever the pair.
    #[test]
    fn equality_is_that_of_serde_json_values() {
        let docs = [
            r#"{"a": 1, "b": [1, 2, {"c": "x"}]}"#,
            r#"{"b": [1, 2, {"c": "x"}], "a": 1}"#,
            r#"{ "a" : 1 , "b" : [ 1 , 2 , { "c" : "\u0078" } ] }"#,
            r#"{"a": 1.0, "b": [1, 2, {"c": "x"}]}"#,
            r#"{"a": 1, "b": [2, 1, {"c": "x"}]}"#,
            r#"{"a": 1, "a": 2, "b": [1, 2, {"c": "x"}]}"#,
            r#"{"a": 2, "b": [1, 2, {"c": "x"}]}"#,
            r#"{"a": 2, "b": [1, 2, {"c": "x"}], "a": 1}"#,
            r#"{"a\u0000": 1}"#,
            r#"{"a": 1}"#,
            r#"{"a": -1}"#,
            r#"{"a": -0}"#,
            r#"{"a": 0}"#,
            r#"{"a": -0.0}"#,
            r#"{"a": 0.0}"#,
            r#"{"a": 18446744073709551615}"#,
            r#"{"a": 18446744073709551616}"#,
            r#"{"a": 1e2}"#,
            r#"{"a": 100}"#,
            r#"{"a": null}"#,
            r#"{"a": false}"#,
            r#"{"a": "1"}"#,
            r#"{"a": "\n"}"#,
            r#"{"a": "
"}"#,
            r#"{}"#,
            r#"[]"#,
            r#"[{}]"#,
            r#"null"#,
            r#""x""#,
            r#""\u0078""#,
            r#"{"k1": 1, "k2": 2, "k3": 3, "k4": 4, "k5": 5, "k6": 6, "k7": 7, "k8": 8, "k9": 9, "k10": [10]}"#,
            r#"{"k10": [10], "k9": 9, "k8": 8, "k7": 7, "k6": 6, "k5": 5, "k4": 4, "k3": 3, "k2": 2, "k1": 1}"#,
            r#"{"k1": 1, "k2": 2, "k3": 3, "k4": 4, "k5": 5, "k6": 6, "k7": 7, "k8": 8, "k9": 9, "k10": [11]}"#,
            r#"{"k1": 1, "k2": 2, "k3": 3, "k4": 4, "k5": 5, "k6": 6, "k7": 7, "k8": 8, "k9": 0, "k10": [10], "k9": 9}"#,
            r#"[{"a": {"b": 1, "b": 2}}, 3]"#,
            r#"[{"a": {"b": 2}}, 3]"#,
            r#"[3, {"a": {"b": 2}}]"#,
            r#"{"a": [1, 2], "b": [2, 1]}"#,
            r#"{"a": [2, 1], "b": [1, 2]}"#,
            r#"{"a": "b"}"#,
            r#"{"b": "a"}"#,
        ];
        for a in docs {
            for b in docs {
                let values = serde_json::from_str::<Value>(a)
                    .ok()
                    .zip(serde_json::from_str::<Value>(b).ok());
                let trees = parse(a.as_bytes()).ok().zip(parse(b.as_bytes()).ok());
                match (values, trees) {
                    (Some((va, vb)), Some((ja, jb))) => {
                        assert_eq!(va == vb, ja == jb, "{a} vs {b}");
                        assert_eq!(same(a.as_bytes(), b.as_bytes()).unwrap(), va == vb, "{a} vs {b}");
                        // Equal documents share a digest (unless a key repeats).
                        if let (Ok(Some(da)), Ok(Some(db))) = (digest(a.as_bytes()), digest(b.as_bytes())) {
                            assert!(va != vb || da == db, "{a} vs {b}: equal, digests differ");
                        }
                    }
                    (None, None) => {}
                    (v, j) => panic!("{a} / {b}: Value parsed {}, Json parsed {}", v.is_some(), j.is_some()),
                }
            }
        }
    }

    #[test]
    fn what_serde_json_refuses_is_refused_with_its_message() {
        for bad in [&b"{\"a\": 1"[..], b"{\"a\": 1} x", b"", b"{\"a\": 1e400}", b"\xff"] {
            let value = serde_json::from_slice::<Value>(bad).unwrap_err().to_string();
            let tree = parse(bad).unwrap_err().to_string();
            assert_eq!(value, tree, "{}", String::from_utf8_lossy(bad));
            assert_eq!(value, same(bad, b"{}").unwrap_err().to_string());
            assert!(!same(b"{}", bad).unwrap(), "an old copy that is not JSON is a change");
        }
    }
}
