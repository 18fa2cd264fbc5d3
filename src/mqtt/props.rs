//! MQTT 5 properties of an application message (MQTT 5 §3.3.2.3), carried from the publisher
//! to every subscriber unchanged (MQTT-3.3.2-4, -15, -16, -17, -18, -20): payload format
//! indicator, content type, response topic, correlation data and user properties, in the
//! order the publisher sent them. The message expiry interval travels as a deadline and is
//! sent as what is left of it (MQTT-3.3.2-6); topic aliases and subscription identifiers
//! belong to one connection and are set per delivery, never carried.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5;

/// The properties of a message that travel with it (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageProperties {
    /// 0 unspecified bytes, 1 UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
    /// Where a responder should publish its answer.
    pub response_topic: Option<String>,
    /// Data the requester uses to match the answer.
    pub correlation_data: Option<Bytes>,
    /// Name-value pairs, in order, repeats allowed.
    pub user_properties: Vec<(String, String)>,
}

impl MessageProperties {
    /// True when there is nothing to carry.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// `None` when there is nothing to carry, so a plain message carries no allocation.
    fn non_empty(self) -> Option<Self> {
        (!self.is_empty()).then_some(self)
    }

    /// What a PUBLISH's properties carry, and its expiry interval and topic alias.
    pub fn from_publish(p: v5::PublishProperties) -> (Option<Self>, Option<u32>, Option<u16>) {
        let props = Self {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
        };
        (props.non_empty(), p.message_expiry_interval, p.topic_alias)
    }

    /// What a will's properties carry, and its expiry and delay intervals.
    pub fn from_will(p: v5::LastWillProperties) -> (Option<Self>, Option<u32>, u32) {
        let props = Self {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
        };
        (
            props.non_empty(),
            p.message_expiry_interval,
            p.delay_interval.unwrap_or(0),
        )
    }

    /// The PUBLISH properties of one delivery.
    pub fn to_publish(
        props: Option<&Self>,
        expiry_secs: Option<u32>,
        subscription_ids: &[u32],
    ) -> Option<v5::PublishProperties> {
        if props.is_none() && expiry_secs.is_none() && subscription_ids.is_empty() {
            return None;
        }
        let p = props.cloned().unwrap_or_default();
        Some(v5::PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: expiry_secs,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: subscription_ids.iter().map(|i| *i as usize).collect(),
            content_type: p.content_type,
        })
    }

    /// The properties of a telemetry message as the outbox stores them (name-value pairs:
    /// user properties in order, and IoT Hub's system property names for the others: `$.ct`
    /// content type, `$.cid` correlation data, `$.ce = utf-8` payload format indicator 1),
    /// back as MQTT 5 properties for an MQTT 5 upstream (AWS IoT Core). `None` when there are
    /// none.
    pub fn from_stored(stored: &[(String, String)]) -> Option<Self> {
        if stored.is_empty() {
            return None;
        }
        let mut p = Self::default();
        for (name, value) in stored {
            match name.as_str() {
                STORED_CONTENT_TYPE => p.content_type = Some(value.clone()),
                STORED_CORRELATION_DATA => {
                    p.correlation_data = Some(Bytes::copy_from_slice(value.as_bytes()))
                }
                STORED_BINARY_CORRELATION_DATA => {
                    if let Ok(data) = BASE64.decode(value) {
                        p.correlation_data = Some(Bytes::from(data));
                    }
                }
                STORED_CONTENT_ENCODING if value.eq_ignore_ascii_case("utf-8") => {
                    p.payload_format_indicator = Some(1)
                }
                _ => p.user_properties.push((name.clone(), value.clone())),
            }
        }
        p.non_empty()
    }

    /// These properties under the stored names [`MessageProperties::from_stored`] reads
    /// (correlation data that is not UTF-8 as base64 under its own name); the response topic
    /// has no stored name.
    pub fn to_stored(&self) -> Vec<(String, String)> {
        let mut out = self.user_properties.clone();
        if let Some(ct) = &self.content_type {
            out.push((STORED_CONTENT_TYPE.into(), ct.clone()));
        }
        if let Some(data) = &self.correlation_data {
            match std::str::from_utf8(data) {
                Ok(text) => out.push((STORED_CORRELATION_DATA.into(), text.to_string())),
                Err(_) => out.push((STORED_BINARY_CORRELATION_DATA.into(), BASE64.encode(data))),
            }
        }
        if self.payload_format_indicator == Some(1) {
            out.push((STORED_CONTENT_ENCODING.into(), "utf-8".into()));
        }
        out
    }

    /// Bytes these properties add to a message, for queue accounting.
    pub fn cost(&self) -> usize {
        self.content_type.as_ref().map_or(0, String::len)
            + self.response_topic.as_ref().map_or(0, String::len)
            + self.correlation_data.as_ref().map_or(0, Bytes::len)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
    }
}

/// Stored name of the content type (IoT Hub's `$.ct`).
pub const STORED_CONTENT_TYPE: &str = "$.ct";
/// Stored name of UTF-8 correlation data (IoT Hub's `$.cid`).
pub const STORED_CORRELATION_DATA: &str = "$.cid";
/// Stored name of correlation data that is not UTF-8, base64-encoded. MQTT 5 upstreams get
/// the bytes back; IoT Hub, whose correlation id is a string, does not get it (the property
/// bag leaves it out).
pub const STORED_BINARY_CORRELATION_DATA: &str = "$.cidb64";
/// Stored name of the content encoding (IoT Hub's `$.ce`; `utf-8` for payload format 1).
pub const STORED_CONTENT_ENCODING: &str = "$.ce";

/// When a message published now with `interval` seconds to live expires.
pub fn expiry_deadline(interval: Option<u32>) -> Option<Instant> {
    interval.and_then(|s| Instant::now().checked_add(Duration::from_secs(u64::from(s))))
}

/// What is left of a message's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remaining {
    /// It never expires.
    Forever,
    /// Seconds left, rounded up (a message with time left never goes out as 0).
    Secs(u32),
    /// It has expired: not to be forwarded.
    Expired,
}

impl Remaining {
    /// The expiry interval to send, if any.
    pub fn interval(self) -> Option<u32> {
        match self {
            Remaining::Secs(s) => Some(s),
            Remaining::Forever | Remaining::Expired => None,
        }
    }
}

/// What is left at `now` of a message's life ending at `deadline`.
pub fn remaining(deadline: Option<Instant>, now: Instant) -> Remaining {
    match deadline {
        None => Remaining::Forever,
        Some(at) if at <= now => Remaining::Expired,
        Some(at) => {
            let left = at - now;
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            Remaining::Secs(u32::try_from(secs).unwrap_or(u32::MAX))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_survive_the_round_trip_in_order() {
        let p = v5::PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            topic_alias: Some(3),
            response_topic: Some("r/1".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
            subscription_identifiers: vec![9],
            content_type: Some("application/json".into()),
        };
        let (props, expiry, alias) = MessageProperties::from_publish(p);
        assert_eq!((expiry, alias), (Some(60), Some(3)));
        let out = MessageProperties::to_publish(props.as_ref(), Some(59), &[4, 7]).unwrap();
        assert_eq!(out.user_properties[0].0, "b", "order kept");
        assert_eq!(out.content_type.as_deref(), Some("application/json"));
        assert_eq!(out.correlation_data.as_deref(), Some(&b"c"[..]));
        assert_eq!(out.topic_alias, None, "aliases are per connection");
        assert_eq!(out.subscription_identifiers, vec![4, 7]);
        assert_eq!(out.message_expiry_interval, Some(59));
        assert!(MessageProperties::to_publish(None, None, &[]).is_none());
    }

    #[test]
    fn binary_correlation_data_is_stored_as_base64_and_comes_back_as_bytes() {
        let bytes: &[u8] = &[0x00, 0xff, 0x80, 0x7f];
        let p = MessageProperties {
            correlation_data: Some(Bytes::copy_from_slice(bytes)),
            ..MessageProperties::default()
        };
        let stored = p.to_stored();
        assert_eq!(
            stored,
            vec![("$.cidb64".to_string(), "AP+Afw==".to_string())]
        );
        let back = MessageProperties::from_stored(&stored).unwrap();
        assert_eq!(back.correlation_data.as_deref(), Some(bytes));
    }

    #[test]
    fn stored_properties_come_back_as_mqtt5_properties() {
        let stored = vec![
            ("site".to_string(), "north".to_string()),
            ("$.ct".to_string(), "application/json".to_string()),
            ("site".to_string(), "south".to_string()),
            ("$.cid".to_string(), "req-7".to_string()),
            ("$.ce".to_string(), "utf-8".to_string()),
        ];
        let p = MessageProperties::from_stored(&stored).unwrap();
        assert_eq!(
            p.user_properties,
            vec![
                ("site".into(), "north".into()),
                ("site".into(), "south".into())
            ],
            "order and repeats kept"
        );
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"req-7"[..]));
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(
            p.to_stored(),
            stored
                .iter()
                .filter(|(k, _)| k == "site")
                .chain(stored.iter().filter(|(k, _)| k != "site"))
                .cloned()
                .collect::<Vec<_>>()
        );
        assert!(MessageProperties::from_stored(&[]).is_none());
    }

    #[test]
    fn expiry_counts_down_and_ends() {
        let now = Instant::now();
        assert_eq!(remaining(None, now), Remaining::Forever);
        let at = now + Duration::from_millis(1500);
        assert_eq!(remaining(Some(at), now), Remaining::Secs(2));
        assert_eq!(remaining(Some(at), at), Remaining::Expired);
    }
}
