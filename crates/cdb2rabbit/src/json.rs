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
        ];
        for a in docs {
            for b in docs {
                let values = serde_json::from_str::<Value>(a)
                    .ok()
                    .zip(serde_json::from_str::<Value>(b).ok());
                let trees = parse(a.as_bytes()).ok().zip(parse(b.as_bytes()).ok());
                match (values, trees) {
                    (Some((va, vb)), Some((ja, jb))) => assert_eq!(va == vb, ja == jb, "{a} vs {b}"),
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
        }
    }
}
