//! What the embedded broker keeps across a daemon restart: retained messages (tree
//! `broker_retained`, topic -> [`RetainedRecord`]) and the kept sessions of clients that asked
//! for one (tree `broker_sessions`, client id -> [`KeptSessionRecord`]).
//!
//! The records are plain data: the broker (`downstream/broker/persist.rs`) turns its own
//! types into them and back, and decides what to keep within its limits. Writes here are not
//! flushed one by one: the broker writes a batch and then asks for one group commit
//! ([`Store::durable`]), so persisting broker state never waits on the telemetry hot path.
//!
//! Encoding: versioned JSON like the other records, payloads and correlation data as base64
//! (JSON would turn bytes into arrays of numbers). Times are Unix milliseconds: a monotonic
//! instant means nothing to the next process.

use serde::{Deserialize, Serialize};

use super::codec::{decode_versioned, encode, insert, remove};
use super::{Store, StoreError};

/// Current version of [`RetainedRecord`] and [`KeptSessionRecord`].
pub const BROKER_RECORD_VERSION: u32 = 1;

/// Tree of retained messages.
pub(super) const BROKER_RETAINED: &str = "broker_retained";
/// Tree of kept sessions.
pub(super) const BROKER_SESSIONS: &str = "broker_sessions";

/// An application message as the broker keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Topic name.
    pub topic: String,
    /// Payload.
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    /// QoS the publisher used.
    pub qos: u8,
    /// Retain flag as published.
    pub retain: bool,
    /// When the message expires (MQTT 5 message expiry), Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// MQTT 5 properties that travel with the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<StoredProperties>,
}

/// MQTT 5 properties of a kept message (see `mqtt/props.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProperties {
    /// 0 unspecified bytes, 1 UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format_indicator: Option<u8>,
    /// MIME type of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Response topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// Correlation data.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "base64_opt_bytes"
    )]
    pub correlation_data: Option<Vec<u8>>,
    /// User properties, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
}

/// A retained message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedRecord {
    /// Record version ([`BROKER_RECORD_VERSION`]).
    pub v: u32,
    /// The message.
    pub message: StoredMessage,
}

/// Who made a kept session: only a client of the same kind (and user) resumes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum StoredOwner {
    /// A broker without rules.
    Anyone,
    /// The gateway's own session.
    Gateway,
    /// A device.
    Device,
    /// The `[[downstream.users]]` entry of this name.
    User(String),
}

/// One subscription of a kept session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    /// The filter as subscribed (`$share/...` included).
    pub filter: String,
    /// Granted QoS.
    pub qos: u8,
    /// MQTT 5 No Local.
    #[serde(default)]
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    #[serde(default)]
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

/// A message on its way to a kept session's client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDelivery {
    /// Packet id while in flight; 0 while queued.
    #[serde(default)]
    pub packet_id: u16,
    /// The message.
    pub message: StoredMessage,
    /// QoS it is delivered with.
    pub qos: u8,
    /// Retain flag to send.
    pub retain: bool,
    /// Sent before.
    #[serde(default)]
    pub dup: bool,
    /// Subscription identifiers it matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscription_ids: Vec<u32>,
    /// QoS 2: the client's PUBREC came; only PUBREL is sent again.
    #[serde(default)]
    pub released: bool,
}

/// A kept session (3.1.1 clean session 0, MQTT 5 session expiry > 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptSessionRecord {
    /// Record version ([`BROKER_RECORD_VERSION`]).
    pub v: u32,
    /// The client id.
    pub client_id: String,
    /// Who made it.
    pub owner: StoredOwner,
    /// When it expires if its client does not come back, Unix milliseconds (for a client that
    /// was connected when this was written: as if it had left then).
    pub expires_at_ms: u64,
    /// How long the session is kept after its connection ends, in seconds.
    pub keep_secs: u64,
    /// Its subscriptions.
    #[serde(default)]
    pub subscriptions: Vec<StoredSubscription>,
    /// Sent and not acknowledged (QoS 1 and 2), in order.
    #[serde(default)]
    pub inflight: Vec<StoredDelivery>,
    /// Waiting to be sent, in order.
    #[serde(default)]
    pub queue: Vec<StoredDelivery>,
    /// The last packet id used.
    #[serde(default)]
    pub last_packet_id: u16,
    /// Packet ids of QoS 2 PUBLISHes from the client received and not yet released.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub awaiting_release: Vec<u16>,
}

impl Store {
    /// Stores (replaces) the retained message of `topic`; durable after the next
    /// [`Store::durable`].
    pub fn put_broker_retained(&self, topic: &str, rec: &RetainedRecord) -> Result<(), StoreError> {
        let value = encode(BROKER_RETAINED, topic, rec)?;
        let (_gate, eng) = self.write_gate()?;
        insert(&eng.broker_retained, BROKER_RETAINED, topic, value)
    }

    /// Removes the retained message of `topic`; true if there was one.
    pub fn remove_broker_retained(&self, topic: &str) -> Result<bool, StoreError> {
        let (_gate, eng) = self.write_gate()?;
        remove(&eng.broker_retained, BROKER_RETAINED, topic)
    }

    /// Every stored retained message, in topic order.
    pub fn broker_retained(&self) -> impl Iterator<Item = Result<RetainedRecord, StoreError>> {
        scan(
            self.engine().map(|e| e.broker_retained.iter()),
            BROKER_RETAINED,
            |r: &RetainedRecord| r.v,
        )
    }

    /// Stores (replaces) the kept session of `rec.client_id`; durable after the next
    /// [`Store::durable`].
    pub fn put_broker_session(&self, rec: &KeptSessionRecord) -> Result<(), StoreError> {
        let value = encode(BROKER_SESSIONS, &rec.client_id, rec)?;
        let (_gate, eng) = self.write_gate()?;
        insert(&eng.broker_sessions, BROKER_SESSIONS, &rec.client_id, value)
    }

    /// Removes the kept session of `client_id`; true if there was one.
    pub fn remove_broker_session(&self, client_id: &str) -> Result<bool, StoreError> {
        let (_gate, eng) = self.write_gate()?;
        remove(&eng.broker_sessions, BROKER_SESSIONS, client_id)
    }

    /// Every stored kept session, in client id order.
    pub fn broker_sessions(&self) -> impl Iterator<Item = Result<KeptSessionRecord, StoreError>> {
        scan(
            self.engine().map(|e| e.broker_sessions.iter()),
            BROKER_SESSIONS,
            |r: &KeptSessionRecord| r.v,
        )
    }

    /// Records and bytes held in the broker's trees: (retained, retained bytes, sessions,
    /// session bytes). What an operator (and the limit tests) look at.
    pub fn broker_state_size(&self) -> Result<(usize, u64, usize, u64), StoreError> {
        let size = |tree: &sled::Tree, name: &'static str| -> Result<(usize, u64), StoreError> {
            let mut n = 0;
            let mut bytes = 0;
            for entry in tree.iter() {
                let (k, v) = entry.map_err(|source| StoreError::Sled {
                    tree: name,
                    op: "scan",
                    source,
                })?;
                n += 1;
                bytes += (k.len() + v.len()) as u64;
            }
            Ok((n, bytes))
        };
        let eng = self.engine()?;
        let (r, rb) = size(&eng.broker_retained, BROKER_RETAINED)?;
        let (s, sb) = size(&eng.broker_sessions, BROKER_SESSIONS)?;
        Ok((r, rb, s, sb))
    }
}

/// The records of `tree`; the error once when there is no open database (a reopen).
fn scan<T: serde::de::DeserializeOwned>(
    tree: Result<sled::Iter, StoreError>,
    name: &'static str,
    version_of: fn(&T) -> u32,
) -> impl Iterator<Item = Result<T, StoreError>> {
    super::scan_entries(tree, name, move |k, v| {
        decode_versioned(
            name,
            &String::from_utf8_lossy(&k),
            &v,
            BROKER_RECORD_VERSION,
            version_of,
        )
    })
}

mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

mod base64_opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::base64_bytes::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::base64_bytes")] Vec<u8>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn message(topic: &str) -> StoredMessage {
        StoredMessage {
            topic: topic.into(),
            payload: vec![0, 159, 146, 150, 255],
            qos: 1,
            retain: true,
            expires_at_ms: Some(1_900_000_000_000),
            properties: Some(StoredProperties {
                content_type: Some("application/octet-stream".into()),
                correlation_data: Some(vec![1, 2, 3]),
                user_properties: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
                ..StoredProperties::default()
            }),
        }
    }

    #[tokio::test]
    async fn broker_records_round_trip_through_a_reopened_store() {
        let dir = tempfile::tempdir().unwrap();
        let session = KeptSessionRecord {
            v: BROKER_RECORD_VERSION,
            client_id: "app-1".into(),
            owner: StoredOwner::User("historian".into()),
            expires_at_ms: 1_800_000_000_000,
            keep_secs: 3600,
            subscriptions: vec![StoredSubscription {
                filter: "$share/g/plant/#".into(),
                qos: 2,
                no_local: false,
                retain_as_published: true,
                id: Some(7),
            }],
            inflight: vec![StoredDelivery {
                packet_id: 9,
                message: message("plant/a"),
                qos: 2,
                retain: false,
                dup: true,
                subscription_ids: vec![7],
                released: true,
            }],
            queue: vec![StoredDelivery {
                packet_id: 0,
                message: message("plant/b"),
                qos: 1,
                retain: false,
                dup: false,
                subscription_ids: Vec::new(),
                released: false,
            }],
            last_packet_id: 9,
            awaiting_release: vec![3],
        };
        let retained = RetainedRecord {
            v: BROKER_RECORD_VERSION,
            message: message("plant/status"),
        };
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            store.put_broker_session(&session).unwrap();
            store
                .put_broker_retained("plant/status", &retained)
                .unwrap();
            store.put_broker_retained("plant/gone", &retained).unwrap();
            assert!(store.remove_broker_retained("plant/gone").unwrap());
            store.durable().await.unwrap();
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let sessions: Vec<_> = store.broker_sessions().map(Result::unwrap).collect();
        assert_eq!(sessions, vec![session]);
        let kept: Vec<_> = store.broker_retained().map(Result::unwrap).collect();
        assert_eq!(kept, vec![retained]);
        let (r, _, s, _) = store.broker_state_size().unwrap();
        assert_eq!((r, s), (1, 1));
        assert!(store.remove_broker_session("app-1").unwrap());
    }

    #[test]
    fn a_newer_record_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let newer = RetainedRecord {
            v: BROKER_RECORD_VERSION + 1,
            message: message("t"),
        };
        store.put_broker_retained("t", &newer).unwrap();
        let err = store.broker_retained().next().unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::NewerRecord {
                    tree: BROKER_RETAINED,
                    ..
                }
            ),
            "{err}"
        );
    }
}
