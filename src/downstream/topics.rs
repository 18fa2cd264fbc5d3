//! The device topic contract of docs/architecture.md, "Device contract".
//!
//! Devices publish provisioning requests on `{p}/{id}/provision/{json|cbor}` and telemetry on
//! `{p}/{id}/telemetry[/sub/topic]`; the gateway answers on `/accepted`, `/rejected`, the retained
//! `{p}/{id}/status` and forwards cloud-to-device messages to `{p}/{id}/commands[/...]`.
//! [`DeviceTopic::parse`] is the single place that turns an inbound topic into a validated
//! [`DeviceId`]; the builders on [`TopicPrefix`] are the single place outbound topics and the
//! gateway's subscription filters are spelled.
//!
//! Ids in topics are written in their canonical (lower-case) form. MQTT topics are case-sensitive
//! while device ids are not, so a device publishing under `Sensor-1` would never see answers the
//! gateway sends to `sensor-1`; such topics are refused with [`TopicError::NonCanonicalId`] and
//! answered on the topic the device used (see [`rejected_for_request_topic`]).

use std::fmt;
use std::str::FromStr;

use crate::device_id::{DeviceId, DeviceIdError};

/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "fleetgw";

/// Why a topic, prefix or sub-topic does not fit the device contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic prefix {prefix:?} is invalid: {reason}")]
    InvalidPrefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("topic {topic:?} is not under the prefix {prefix:?}")]
    OutsidePrefix { topic: String, prefix: String },
    #[error("topic {topic:?}: {source}")]
    InvalidDeviceId {
        topic: String,
        #[source]
        source: DeviceIdError,
    },
    #[error("topic {topic:?}: device id {id:?} must be written in lower case in topics: use {canonical:?}")]
    NonCanonicalId {
        topic: String,
        id: String,
        canonical: String,
    },
    #[error("topic {topic:?}: unknown payload format {format:?}; expected \"json\" or \"cbor\"")]
    UnknownFormat { topic: String, format: String },
    #[error("topic {topic:?} is not a device request: expected {{prefix}}/{{id}}/provision/{{json|cbor}} or {{prefix}}/{{id}}/telemetry[/...]")]
    NotDeviceInput { topic: String },
    #[error("sub-topic {subtopic:?} is invalid: {reason}")]
    InvalidSubtopic {
        subtopic: String,
        reason: &'static str,
    },
}

pub use crate::cloud::codec::PayloadFormat;

/// A validated topic prefix: one or more non-empty levels, no wildcards, not a `$` system topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TopicPrefix(String);

impl Default for TopicPrefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.to_string())
    }
}

impl TopicPrefix {
    /// Validates `prefix` (e.g. `fleetgw` or `site-3/fleetgw`).
    pub fn new(prefix: &str) -> Result<Self, TopicError> {
        let bad = |reason| TopicError::InvalidPrefix {
            prefix: prefix.to_string(),
            reason,
        };
        if prefix.is_empty() {
            return Err(bad("it is empty"));
        }
        if prefix.starts_with('$') {
            return Err(bad(
                "it starts with '$', which brokers reserve for system topics",
            ));
        }
        if prefix.contains(['+', '#']) {
            return Err(bad("it contains an MQTT wildcard ('+' or '#')"));
        }
        if prefix.contains('\0') {
            return Err(bad("it contains a NUL character"));
        }
        if prefix.split('/').any(str::is_empty) {
            return Err(bad(
                "it has an empty level (leading, trailing or double '/')",
            ));
        }
        Ok(Self(prefix.to_string()))
    }

    /// The prefix as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `{p}/{id}/provision/{fmt}`: where a device sends its provisioning request.
    pub fn provision_request(&self, id: &DeviceId, fmt: PayloadFormat) -> String {
        format!("{}/{}/provision/{}", self.0, id, fmt)
    }

    /// `{p}/{id}/provision/{fmt}/accepted`: the final provisioning result.
    pub fn accepted(&self, id: &DeviceId, fmt: PayloadFormat) -> String {
        format!("{}/accepted", self.provision_request(id, fmt))
    }

    /// `{p}/{id}/provision/{fmt}/rejected`: a refused or failed request.
    pub fn rejected(&self, id: &DeviceId, fmt: PayloadFormat) -> String {
        format!("{}/rejected", self.provision_request(id, fmt))
    }

    /// `{p}/{id}/status`: the retained current state of the device.
    pub fn status(&self, id: &DeviceId) -> String {
        format!("{}/{}/status", self.0, id)
    }

    /// `{p}/{id}/telemetry[/{subtopic}]`: where a device publishes telemetry.
    pub fn telemetry(&self, id: &DeviceId, subtopic: Option<&str>) -> Result<String, TopicError> {
        self.with_subtopic(format!("{}/{}/telemetry", self.0, id), subtopic)
    }

    /// `{p}/{id}/commands[/{subtopic}]`: cloud-to-device messages.
    pub fn commands(&self, id: &DeviceId, subtopic: Option<&str>) -> Result<String, TopicError> {
        self.with_subtopic(format!("{}/{}/commands", self.0, id), subtopic)
    }

    /// `{p}/+/provision/+`: the gateway's filter for provisioning requests of every device.
    pub fn provision_filter(&self) -> String {
        format!("{}/+/provision/+", self.0)
    }

    /// `{p}/+/telemetry/#`: the gateway's filter for telemetry of every device.
    ///
    /// `/#` also matches the parent level (`{p}/{id}/telemetry`, MQTT 3.1.1 §4.7.1.2), so no
    /// second filter is subscribed: overlapping subscriptions make mosquitto 2 deliver a
    /// message once per matching filter.
    pub fn telemetry_filter(&self) -> String {
        format!("{}/+/telemetry/#", self.0)
    }

    fn with_subtopic(&self, base: String, subtopic: Option<&str>) -> Result<String, TopicError> {
        match subtopic {
            None => Ok(base),
            Some(sub) => {
                validate_subtopic(sub)?;
                Ok(format!("{base}/{sub}"))
            }
        }
    }
}

impl fmt::Display for TopicPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TopicPrefix {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

fn validate_subtopic(sub: &str) -> Result<(), TopicError> {
    let bad = |reason| TopicError::InvalidSubtopic {
        subtopic: sub.to_string(),
        reason,
    };
    if sub.contains(['+', '#']) {
        return Err(bad("it contains an MQTT wildcard ('+' or '#')"));
    }
    if sub.contains('\0') {
        return Err(bad("it contains a NUL character"));
    }
    if sub.split('/').any(str::is_empty) {
        return Err(bad(
            "it has an empty level (leading, trailing or double '/')",
        ));
    }
    Ok(())
}

/// An inbound device topic, parsed and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceTopic {
    /// `{p}/{id}/provision/{fmt}`
    ProvisionRequest {
        /// The requesting device.
        device: DeviceId,
        /// Encoding of the request; the answer uses the same.
        format: PayloadFormat,
    },
    /// `{p}/{id}/telemetry[/{subtopic}]`
    Telemetry {
        /// The publishing device.
        device: DeviceId,
        /// The levels after `telemetry`, if any (`a/b` for `.../telemetry/a/b`).
        subtopic: Option<String>,
    },
}

impl DeviceTopic {
    /// Parses an inbound topic; anything but a provisioning request or telemetry is an error.
    pub fn parse(prefix: &TopicPrefix, topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::OutsidePrefix {
                topic: topic.to_string(),
                prefix: prefix.as_str().to_string(),
            })?;
        let not_input = || TopicError::NotDeviceInput {
            topic: topic.to_string(),
        };
        let (raw_id, kind) = rest.split_once('/').ok_or_else(not_input)?;
        let (verb, tail) = match kind.split_once('/') {
            Some((verb, tail)) => (verb, Some(tail)),
            None => (kind, None),
        };
        // The shape is checked before the id so an unrelated topic is reported as such rather
        // than as a bad id.
        match (verb, tail) {
            ("provision", Some(fmt)) if !fmt.contains('/') => {
                let device = parse_id(topic, raw_id)?;
                let format = fmt.parse().map_err(|_| TopicError::UnknownFormat {
                    topic: topic.to_string(),
                    format: fmt.to_string(),
                })?;
                Ok(DeviceTopic::ProvisionRequest { device, format })
            }
            ("telemetry", subtopic) => {
                let device = parse_id(topic, raw_id)?;
                if let Some(sub) = subtopic {
                    validate_subtopic(sub)?;
                }
                Ok(DeviceTopic::Telemetry {
                    device,
                    subtopic: subtopic.map(str::to_string),
                })
            }
            _ => Err(not_input()),
        }
    }

    /// The device the topic belongs to.
    pub fn device(&self) -> &DeviceId {
        match self {
            DeviceTopic::ProvisionRequest { device, .. }
            | DeviceTopic::Telemetry { device, .. } => device,
        }
    }
}

fn parse_id(topic: &str, raw: &str) -> Result<DeviceId, TopicError> {
    let id = DeviceId::parse(raw).map_err(|source| TopicError::InvalidDeviceId {
        topic: topic.to_string(),
        source,
    })?;
    if id.as_str() != raw {
        return Err(TopicError::NonCanonicalId {
            topic: topic.to_string(),
            id: raw.to_string(),
            canonical: id.as_str().to_string(),
        });
    }
    Ok(id)
}

/// For a topic shaped like a provisioning request (`{p}/{anything}/provision/{json|cbor}`) whose
/// id did not validate, the `/rejected` topic the device listens on and the format to answer in.
///
/// This is how a device with a bad id still learns why it is refused.
pub fn rejected_for_request_topic(
    prefix: &TopicPrefix,
    topic: &str,
) -> Option<(String, PayloadFormat)> {
    let rest = topic.strip_prefix(prefix.as_str())?.strip_prefix('/')?;
    let mut levels = rest.split('/');
    let (id, verb, fmt) = (levels.next()?, levels.next()?, levels.next()?);
    if levels.next().is_some() || id.is_empty() || verb != "provision" {
        return None;
    }
    let fmt: PayloadFormat = fmt.parse().ok()?;
    Some((format!("{topic}/rejected"), fmt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> TopicPrefix {
        TopicPrefix::default()
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn parses_provision_requests_in_both_formats() {
        assert_eq!(
            DeviceTopic::parse(&p(), "fleetgw/sensor-1/provision/json").unwrap(),
            DeviceTopic::ProvisionRequest {
                device: id("sensor-1"),
                format: PayloadFormat::Json
            }
        );
        assert_eq!(
            DeviceTopic::parse(&p(), "fleetgw/plc:7.a_b/provision/cbor").unwrap(),
            DeviceTopic::ProvisionRequest {
                device: id("plc:7.a_b"),
                format: PayloadFormat::Cbor
            }
        );
    }

    #[test]
    fn parses_telemetry_with_and_without_subtopic() {
        assert_eq!(
            DeviceTopic::parse(&p(), "fleetgw/s1/telemetry").unwrap(),
            DeviceTopic::Telemetry {
                device: id("s1"),
                subtopic: None
            }
        );
        let t = DeviceTopic::parse(&p(), "fleetgw/s1/telemetry/line/3").unwrap();
        assert_eq!(
            t,
            DeviceTopic::Telemetry {
                device: id("s1"),
                subtopic: Some("line/3".into())
            }
        );
        assert_eq!(t.device().as_str(), "s1");
    }

    #[test]
    fn multi_level_prefix_works() {
        let prefix = TopicPrefix::new("site-3/fleetgw").unwrap();
        assert_eq!(
            DeviceTopic::parse(&prefix, "site-3/fleetgw/a/provision/json").unwrap(),
            DeviceTopic::ProvisionRequest {
                device: id("a"),
                format: PayloadFormat::Json
            }
        );
        assert_eq!(prefix.provision_filter(), "site-3/fleetgw/+/provision/+");
    }

    #[test]
    fn rejects_topics_outside_the_prefix() {
        for topic in [
            "other/a/provision/json",
            "fleetgwx/a/provision/json",
            "fleetgw",
        ] {
            assert!(
                matches!(
                    DeviceTopic::parse(&p(), topic),
                    Err(TopicError::OutsidePrefix { .. })
                ),
                "{topic}"
            );
        }
    }

    #[test]
    fn rejects_everything_that_is_not_device_input() {
        for topic in [
            "fleetgw/a",
            "fleetgw/a/provision",
            "fleetgw/a/provision/json/accepted",
            "fleetgw/a/provision/json/rejected",
            "fleetgw/a/status",
            "fleetgw/a/commands/reboot",
            "fleetgw/a/telemetryx",
            "fleetgw/a/b/provision/json",
        ] {
            let err = DeviceTopic::parse(&p(), topic).unwrap_err();
            assert!(
                matches!(err, TopicError::NotDeviceInput { .. }),
                "{topic}: {err:?}"
            );
            assert!(err.to_string().contains(topic), "{err}");
        }
    }

    #[test]
    fn rejects_unknown_formats() {
        let err = DeviceTopic::parse(&p(), "fleetgw/a/provision/xml").unwrap_err();
        assert_eq!(
            err,
            TopicError::UnknownFormat {
                topic: "fleetgw/a/provision/xml".into(),
                format: "xml".into()
            }
        );
        assert!(err.to_string().contains("\"xml\""));
    }

    #[test]
    fn rejects_invalid_ids_naming_the_id_and_the_rule() {
        let err = DeviceTopic::parse(&p(), "fleetgw/dev./provision/json").unwrap_err();
        assert!(matches!(
            err,
            TopicError::InvalidDeviceId {
                source: DeviceIdError::BadLastChar(_),
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("\"dev.\"") && msg.contains("must end with"),
            "{msg}"
        );

        let err = DeviceTopic::parse(&p(), "fleetgw/a b/telemetry").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"a b\"") && msg.contains("' '"), "{msg}");

        let long = "a".repeat(129);
        let err = DeviceTopic::parse(&p(), &format!("fleetgw/{long}/telemetry")).unwrap_err();
        assert!(matches!(
            err,
            TopicError::InvalidDeviceId {
                source: DeviceIdError::TooLong(129),
                ..
            }
        ));
        let err = DeviceTopic::parse(&p(), "fleetgw//provision/json").unwrap_err();
        assert!(matches!(
            err,
            TopicError::InvalidDeviceId {
                source: DeviceIdError::Empty,
                ..
            }
        ));
    }

    #[test]
    fn rejects_upper_case_ids_and_names_the_canonical_form() {
        let err = DeviceTopic::parse(&p(), "fleetgw/Sensor-1/provision/json").unwrap_err();
        assert_eq!(
            err,
            TopicError::NonCanonicalId {
                topic: "fleetgw/Sensor-1/provision/json".into(),
                id: "Sensor-1".into(),
                canonical: "sensor-1".into()
            }
        );
        assert!(err.to_string().contains("use \"sensor-1\""));
    }

    #[test]
    fn rejects_empty_telemetry_levels() {
        for topic in ["fleetgw/a/telemetry/", "fleetgw/a/telemetry/x//y"] {
            assert!(
                matches!(
                    DeviceTopic::parse(&p(), topic),
                    Err(TopicError::InvalidSubtopic { .. })
                ),
                "{topic}"
            );
        }
    }

    #[test]
    fn builds_outbound_topics_and_filters() {
        let d = id("sensor-1");
        let p = p();
        assert_eq!(
            p.provision_request(&d, PayloadFormat::Cbor),
            "fleetgw/sensor-1/provision/cbor"
        );
        assert_eq!(
            p.accepted(&d, PayloadFormat::Json),
            "fleetgw/sensor-1/provision/json/accepted"
        );
        assert_eq!(
            p.rejected(&d, PayloadFormat::Cbor),
            "fleetgw/sensor-1/provision/cbor/rejected"
        );
        assert_eq!(p.status(&d), "fleetgw/sensor-1/status");
        assert_eq!(p.commands(&d, None).unwrap(), "fleetgw/sensor-1/commands");
        assert_eq!(
            p.commands(&d, Some("reboot/now")).unwrap(),
            "fleetgw/sensor-1/commands/reboot/now"
        );
        assert_eq!(
            p.telemetry(&d, Some("t")).unwrap(),
            "fleetgw/sensor-1/telemetry/t"
        );
        assert_eq!(p.provision_filter(), "fleetgw/+/provision/+");
        assert_eq!(p.telemetry_filter(), "fleetgw/+/telemetry/#");
        for bad in ["a/+", "#", "a//b", "/a", "a/"] {
            assert!(
                matches!(
                    p.commands(&d, Some(bad)),
                    Err(TopicError::InvalidSubtopic { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn built_topics_parse_back() {
        let d = id("x-1");
        let p = p();
        for fmt in [PayloadFormat::Json, PayloadFormat::Cbor] {
            assert_eq!(
                DeviceTopic::parse(&p, &p.provision_request(&d, fmt)).unwrap(),
                DeviceTopic::ProvisionRequest {
                    device: d.clone(),
                    format: fmt
                }
            );
        }
        assert_eq!(
            DeviceTopic::parse(&p, &p.telemetry(&d, Some("a/b")).unwrap()).unwrap(),
            DeviceTopic::Telemetry {
                device: d,
                subtopic: Some("a/b".into())
            }
        );
    }

    #[test]
    fn validates_prefixes() {
        assert_eq!(TopicPrefix::default().as_str(), "fleetgw");
        assert!(TopicPrefix::new("a/b").is_ok());
        for bad in ["", "$SYS", "a/+", "a/#", "/a", "a/", "a//b"] {
            let err = TopicPrefix::new(bad).unwrap_err();
            assert!(matches!(err, TopicError::InvalidPrefix { .. }), "{bad}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn finds_the_reply_topic_for_requests_with_bad_ids() {
        assert_eq!(
            rejected_for_request_topic(&p(), "fleetgw/Bad./provision/cbor"),
            Some((
                "fleetgw/Bad./provision/cbor/rejected".into(),
                PayloadFormat::Cbor
            ))
        );
        assert_eq!(
            rejected_for_request_topic(&p(), "fleetgw/a/telemetry"),
            None
        );
        assert_eq!(
            rejected_for_request_topic(&p(), "fleetgw/a/provision/xml"),
            None
        );
        assert_eq!(
            rejected_for_request_topic(&p(), "fleetgw//provision/json"),
            None
        );
        assert_eq!(rejected_for_request_topic(&p(), "x/a/provision/json"), None);
    }
}
