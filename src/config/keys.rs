//! The key paths of the schema, learnt from the schema types themselves so they cannot drift
//! from the structs: [`known_keys`] for the sample check and the "did you mean" hints.
//!
//! serde's derive hands a deserializer the names a type accepts: `deserialize_struct` gets the
//! field names, `deserialize_enum` the variant spellings. A [`Probe`] is a deserializer that
//! follows a key path into [`Config`] and stops with an error carrying those names once it
//! reaches the end of the path. It relies only on that documented part of serde's data
//! model (struct, enum, option, newtype, sequence); the tests below check each of them.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess};
use serde::Deserialize;

use super::Config;

/// What the schema has at a key path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// A section: its keys, in declaration order.
    Section(&'static [&'static str]),
    /// A value (scalar, array, free-form table such as `provision.parameters`). `variants`
    /// are the spellings an enum accepts; empty for anything else.
    Value {
        /// The enum's spellings.
        variants: &'static [&'static str],
    },
}

/// What the schema has at `path` (segments as in an error path: names, and `[i]` for an
/// array element), or `None` when no key has that path.
pub(super) fn shape(path: &[String]) -> Option<Shape> {
    match Config::deserialize(Probe { path }) {
        Err(Stop::Reached(shape)) => Some(shape),
        Err(Stop::Nowhere(_)) | Ok(_) => None,
    }
}

/// Every leaf key path of [`Config`] (e.g. `cloud.aws.sessions`), in declaration order.
///
/// Derived from the serde field lists themselves, so it can never drift from the structs.
pub fn known_keys() -> Vec<String> {
    let mut out = Vec::new();
    collect_keys(&mut Vec::new(), &mut out);
    out
}

/// The spellings the value at `key` (a leaf path such as `admission.mode`) accepts when it is
/// an enum, else nothing: what the generated configuration reference lists as its values.
pub fn key_spellings(key: &str) -> &'static [&'static str] {
    let path: Vec<String> = key.split('.').map(str::to_string).collect();
    match shape(&path) {
        Some(Shape::Value { variants }) => variants,
        _ => &[],
    }
}

fn collect_keys(prefix: &mut Vec<String>, out: &mut Vec<String>) {
    match shape(prefix) {
        Some(Shape::Section(fields)) => {
            for field in fields {
                prefix.push((*field).to_string());
                collect_keys(prefix, out);
                prefix.pop();
            }
        }
        Some(Shape::Value { .. }) => out.push(prefix.join(".")),
        // Every field of a section has a shape; nothing to list if one ever had none.
        None => {}
    }
}

/// Why a [`Probe`] stopped: it always does, since it never produces a value.
#[derive(Debug)]
enum Stop {
    /// The end of the path, and what is there.
    Reached(Shape),
    /// The path leads nowhere (an unknown key, or a key below a value); serde's message.
    Nowhere(String),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Reached(shape) => write!(f, "reached {shape:?}"),
            Stop::Nowhere(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Stop::Nowhere(message.to_string())
    }
}

/// A deserializer that walks `path` into whatever type deserializes from it.
struct Probe<'a> {
    path: &'a [String],
}

impl Probe<'_> {
    /// The type here is a value: the path ends here or leads nowhere.
    fn value(&self, variants: &'static [&'static str]) -> Stop {
        if self.path.is_empty() {
            Stop::Reached(Shape::Value { variants })
        } else {
            Stop::Nowhere(format!("{} is below a value", self.path.join(".")))
        }
    }
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: de::Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        Err(self.value(&[]))
    }

    fn deserialize_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            None => Err(Stop::Reached(Shape::Section(fields))),
            Some((key, rest)) => visitor.visit_map(OneKey {
                key: Some(key),
                rest,
            }),
        }
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        Err(self.value(variants))
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        // An optional key has the shape of its value.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            // Array elements all have the same type: `[i]` is "an element" whatever `i` is.
            Some((index, rest)) if index.starts_with('[') => {
                visitor.visit_seq(OneElement { rest: Some(rest) })
            }
            _ => Err(self.value(&[])),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct tuple tuple_struct map identifier ignored_any
    }
}

/// The one key of a struct the path continues with.
struct OneKey<'a> {
    key: Option<&'a String>,
    rest: &'a [String],
}

impl<'de> MapAccess<'de> for OneKey<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        self.key
            .take()
            .map(|key| seed.deserialize(key.as_str().into_deserializer()))
            .transpose()
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(Probe { path: self.rest })
    }
}

/// The one array element the path continues with.
struct OneElement<'a> {
    rest: Option<&'a [String]>,
}

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = Stop;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Stop> {
        self.rest
            .take()
            .map(|path| seed.deserialize(Probe { path }))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(key: &str) -> Vec<String> {
        key.split('.').map(str::to_string).collect()
    }

    #[test]
    fn known_keys_lists_every_leaf_including_optional_ones() {
        let keys = known_keys();
        for k in [
            "gateway.id",
            "downstream.tls_listen",
            "downstream.password",
            "cloud.provider",
            "cloud.aws.sessions",
            "cloud.azure.id_scope",
            "provision.parameters",
            "telemetry.gateway_inflight",
            "telemetry.identity",
            "log.format",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "cloud" || k == "cloud.aws"));
        // Every section's keys are there, not just a few.
        assert!(keys.len() > 60, "{} keys: {keys:?}", keys.len());
    }

    #[test]
    fn every_key_of_the_sample_is_known() {
        // `#key = value` lines are optional keys commented out; "# " starts an explanation.
        let sample: String = include_str!("../../gateway.toml")
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let sample: toml::Table = sample.parse().expect("gateway.toml parses");
        let keys = known_keys();
        let mut in_sample = Vec::new();
        let mut tables = vec![(String::new(), &sample)];
        while let Some((prefix, table)) = tables.pop() {
            for (name, value) in table {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                match value {
                    // A table that is not itself a key (`provision.parameters` is) is a section.
                    toml::Value::Table(t) if !keys.contains(&key) => tables.push((key, t)),
                    _ => in_sample.push(key),
                }
            }
        }
        for key in &in_sample {
            assert!(keys.contains(key), "gateway.toml: {key} is not a known key");
        }
        assert_eq!(in_sample.len(), keys.len(), "{in_sample:?} vs {keys:?}");
    }

    #[test]
    fn shapes_come_from_structs_enums_options_and_arrays() {
        assert_eq!(
            shape(&path("log")),
            Some(Shape::Section(&["level", "format"]))
        );
        assert_eq!(
            shape(&path("downstream.broker")),
            Some(Shape::Value {
                variants: &["embedded", "external"]
            })
        );
        assert_eq!(
            shape(&path("downstream.tls_listen")),
            Some(Shape::Value { variants: &[] })
        );
        let Some(Shape::Value { variants }) = shape(&path("provision.allowed_csr_key_types.[3]"))
        else {
            panic!("an array element of an enum has its variants");
        };
        assert!(variants.contains(&"rsa-2048"), "{variants:?}");
        assert_eq!(shape(&path("gateway.nope")), None);
        assert_eq!(shape(&path("gateway.id.below")), None);
    }
}
