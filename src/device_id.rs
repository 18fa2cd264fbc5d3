//! The device identifier every other module trusts.
//!
//! A [`DeviceId`] can only be built through [`DeviceId::parse`], which applies the Azure DPS
//! registration-id rules: ASCII alphanumerics and `-` `.` `_` `:`, the last character
//! alphanumeric or `-`, 1 to 128 characters. Ids are case-insensitive, so the canonical form is
//! lower case: `Sensor-1` and `sensor-1` are the same device and share one record.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id the registration-id rules allow.
pub const MAX_LEN: usize = 128;

/// A validated, lower-cased device id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

/// Why a string is not a valid device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("device id is empty")]
    Empty,
    #[error("device id is {0} characters long; at most {MAX_LEN} are allowed")]
    TooLong(usize),
    #[error("device id {id:?} contains {ch:?} at position {pos}; only letters, digits and - . _ : are allowed")]
    InvalidChar { id: String, ch: char, pos: usize },
    #[error("device id {0:?} must end with a letter, a digit or '-'")]
    BadLastChar(String),
}

impl DeviceId {
    /// Validates `raw` against the registration-id rules and returns its canonical form.
    pub fn parse(raw: &str) -> Result<Self, DeviceIdError> {
        if raw.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        let len = raw.chars().count();
        if len > MAX_LEN {
            return Err(DeviceIdError::TooLong(len));
        }
        if let Some((pos, ch)) = raw
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':')))
        {
            return Err(DeviceIdError::InvalidChar {
                id: raw.to_string(),
                ch,
                pos,
            });
        }
        let last = raw.as_bytes()[raw.len() - 1];
        if !(last.is_ascii_alphanumeric() || last == b'-') {
            return Err(DeviceIdError::BadLastChar(raw.to_string()));
        }
        Ok(Self(raw.to_ascii_lowercase()))
    }

    /// The canonical (lower-case) id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet_and_lowercases() {
        let id = DeviceId::parse("Sensor-01.line_2:A").unwrap();
        assert_eq!(id.as_str(), "sensor-01.line_2:a");
        assert_eq!(
            DeviceId::parse("ends-with-dash-").unwrap().as_str(),
            "ends-with-dash-"
        );
        assert_eq!(
            DeviceId::parse(&"a".repeat(128)).unwrap().as_str().len(),
            128
        );
    }

    #[test]
    fn rejects_each_rule_with_a_specific_error() {
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(
            DeviceId::parse(&"a".repeat(129)),
            Err(DeviceIdError::TooLong(129))
        );
        assert!(matches!(
            DeviceId::parse("dev/1"),
            Err(DeviceIdError::InvalidChar {
                ch: '/',
                pos: 3,
                ..
            })
        ));
        assert!(matches!(
            DeviceId::parse("dev+"),
            Err(DeviceIdError::InvalidChar { .. })
        ));
        assert!(matches!(
            DeviceId::parse("dé"),
            Err(DeviceIdError::InvalidChar { .. })
        ));
        assert!(matches!(
            DeviceId::parse("dev."),
            Err(DeviceIdError::BadLastChar(_))
        ));
        assert!(matches!(
            DeviceId::parse("dev:"),
            Err(DeviceIdError::BadLastChar(_))
        ));
        assert!(matches!(
            DeviceId::parse("dev_"),
            Err(DeviceIdError::BadLastChar(_))
        ));
    }

    #[test]
    fn error_messages_name_the_input() {
        let msg = DeviceId::parse("a#b").unwrap_err().to_string();
        assert!(msg.contains("\"a#b\"") && msg.contains("'#'"), "{msg}");
    }

    #[test]
    fn serde_validates() {
        let id: DeviceId = serde_json::from_str("\"ABC\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"abc\"");
        assert!(serde_json::from_str::<DeviceId>("\"a b\"").is_err());
    }
}
