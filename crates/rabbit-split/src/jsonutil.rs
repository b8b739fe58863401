//! JSON objects read entry by entry: `serde_json`'s map keeps only the last of two equal keys,
//! which would let a duplicate tensor name in a header or index silently replace the first.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

/// A JSON object's entries in document order, duplicate keys kept.
#[derive(Debug, Default)]
pub(crate) struct Entries(pub(crate) Vec<(String, serde_json::Value)>);

impl Entries {
    /// The first key that appears more than once.
    pub(crate) fn first_duplicate(&self) -> Option<&str> {
        let mut seen = std::collections::HashSet::with_capacity(self.0.len());
        self.0
            .iter()
            .map(|(k, _)| k.as_str())
            .find(|k| !seen.insert(*k))
    }
}

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entries, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Entries, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(entry) = a.next_entry::<String, serde_json::Value>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_kept_and_found() {
        let e: Entries = serde_json::from_str(r#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert_eq!(e.0.len(), 3);
        assert_eq!(e.first_duplicate(), Some("a"));
        let e: Entries = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap();
        assert_eq!(e.first_duplicate(), None);
        assert!(serde_json::from_str::<Entries>("[1]").is_err());
    }
}
