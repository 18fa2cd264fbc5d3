//! The emulated IoT Hub's data and what every front end shares ([`Context`]): the telemetry
//! log, message properties as the hub reads them, cloud-to-device delivery, counters and the
//! recent refusals `GET /stats` shows (so a refused client can learn why even where MQTT 3.1.1
//! has no room for a reason).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use percent_encoding::percent_decode_str;
use serde::Serialize;
use tokio::sync::{broadcast, Notify};

use super::auth::Groups;
use super::dps::Dps;
use super::registry::Registry;
use crate::emulator::faults::Faults;
use crate::emulator::messages::{LoggedMessage, MessageLog};

/// IoT Hub's device-to-cloud message size limit (256 KB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Refusal reasons kept for `/stats`.
const RECENT_REFUSALS: usize = 32;
/// Cloud-to-device messages a slow connection may fall behind by.
const C2D_BACKLOG: usize = 1024;

/// Which transport a message came over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// MQTT.
    Mqtt,
    /// HTTPS.
    Https,
}

/// A device-to-cloud message as the hub received it.
#[derive(Clone, Debug)]
pub struct HubMessage {
    /// The device id as registered.
    pub device_id: String,
    /// MQTT or HTTPS.
    pub transport: Transport,
    /// Payload.
    pub payload: Bytes,
    /// Application and system properties, decoded (`$.mid`, `$.ct`, `a b/c`, ...).
    pub properties: BTreeMap<String, String>,
}

impl LoggedMessage for HubMessage {
    fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// A cloud-to-device message queued by `POST /devices/{id}/messages`.
#[derive(Clone, Debug)]
pub struct CloudToDevice {
    /// Lower-case device id it is for.
    pub device: String,
    /// `devices/{id}/messages/devicebound/{properties}`.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
}

/// A refused client, for `/stats`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// `dpsMqtt`, `dpsHttps`, `hubMqtt` or `hubHttps`.
    pub listener: &'static str,
    /// Client address.
    pub peer: String,
    /// Why.
    pub reason: String,
}

/// Counters behind `/stats`.
#[derive(Default)]
pub struct Counters {
    /// Connections accepted (TCP).
    pub connections_total: AtomicU64,
    /// Connections refused (TLS, CONNECT, outage).
    pub connections_refused: AtomicU64,
    /// Connections closed for a protocol or policy violation.
    pub closed_by_policy: AtomicU64,
    /// DPS register requests.
    pub registrations: AtomicU64,
    /// DPS operation status polls.
    pub polls: AtomicU64,
    /// DPS 429 answers.
    pub throttled: AtomicU64,
    /// DPS answers dropped by the `dropResponses` fault.
    pub dropped_responses: AtomicU64,
    /// Cloud-to-device messages delivered.
    pub c2d_delivered: AtomicU64,
}

impl Counters {
    /// Adds one.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads one.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Everything the front ends and the API share.
pub struct Context {
    /// The DPS service.
    pub dps: Arc<Dps>,
    /// Enrollment groups.
    pub groups: Arc<Groups>,
    /// Assigned devices.
    pub registry: Arc<Registry>,
    /// The hub's host name.
    pub hub_host: String,
    /// Device-to-cloud messages.
    pub messages: MessageLog<HubMessage>,
    /// Counters.
    pub counters: Counters,
    /// Injected faults.
    pub faults: Faults,
    refusals: Mutex<VecDeque<Refusal>>,
    c2d: broadcast::Sender<Arc<CloudToDevice>>,
    /// Device id (lower case) -> (connection number, close signal) of its hub MQTT connection.
    sessions: Mutex<HashMap<String, (u64, Arc<Notify>)>>,
    next_connection: AtomicU64,
}

impl Context {
    /// A context around the services.
    pub fn new(
        dps: Arc<Dps>,
        groups: Arc<Groups>,
        registry: Arc<Registry>,
        hub_host: String,
        max_messages: usize,
    ) -> Self {
        Self {
            dps,
            groups,
            registry,
            hub_host,
            messages: MessageLog::new(max_messages),
            counters: Counters::default(),
            faults: Faults::new(),
            refusals: Mutex::new(VecDeque::new()),
            c2d: broadcast::channel(C2D_BACKLOG).0,
            sessions: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
        }
    }

    /// Notes a refused connection (counted, logged and kept for `/stats`).
    pub fn refuse(&self, listener: &'static str, peer: std::net::SocketAddr, reason: String) {
        Counters::bump(&self.counters.connections_refused);
        self.note_refusal(listener, peer, reason);
    }

    /// Notes a refused request on a connection that stays open (logged and kept for `/stats`).
    pub fn note_refusal(&self, listener: &'static str, peer: std::net::SocketAddr, reason: String) {
        tracing::info!(listener, %peer, %reason, "Azure emulator refused a client");
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if refusals.len() == RECENT_REFUSALS {
            refusals.pop_front();
        }
        refusals.push_back(Refusal {
            listener,
            peer: peer.to_string(),
            reason,
        });
    }

    /// The most recent refusals, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Hands a cloud-to-device message to the connections (the device's one delivers it).
    pub fn send_to_device(&self, message: CloudToDevice) {
        // No receiver means no connection at all: like an offline device's, it is dropped.
        let _ = self.c2d.send(Arc::new(message));
    }

    /// Whether `device` has a hub MQTT connection now.
    pub fn has_session(&self, device: &str) -> bool {
        self.sessions
            .lock()
            .map(|s| s.contains_key(&device.to_ascii_lowercase()))
            .unwrap_or(false)
    }

    /// A receiver of cloud-to-device messages (each connection filters by device).
    pub fn c2d_receiver(&self) -> broadcast::Receiver<Arc<CloudToDevice>> {
        self.c2d.subscribe()
    }

    /// A new connection number.
    pub fn connection_number(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes connection `number` the device's hub session, closing the one that held it.
    pub fn take_over(&self, device: &str, number: u64, close: Arc<Notify>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, previous)) = sessions.insert(device.to_ascii_lowercase(), (number, close)) {
            previous.notify_one();
        }
    }

    /// Ends connection `number`'s hold on the device.
    pub fn release(&self, device: &str, number: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let key = device.to_ascii_lowercase();
        if sessions.get(&key).is_some_and(|(n, _)| *n == number) {
            sessions.remove(&key);
        }
    }

    /// Devices connected to the hub over MQTT now.
    pub fn hub_sessions(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// The properties of `devices/{id}/messages/events/{properties}`: `k=v` pairs joined by `&`,
/// keys and values percent-encoded (`%24.mid=1&%24.ct=application%2Fjson&a%20b=c`). A pair
/// without `=` is a property with an empty value, as IoT Hub reads it.
pub fn parse_properties(encoded: &str) -> Result<BTreeMap<String, String>, String> {
    let mut properties = BTreeMap::new();
    for pair in encoded.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|e| {
                    format!(
                        "property {:?} is not UTF-8 once decoded: {e}",
                        super::dps::short(s)
                    )
                })
        };
        let key = decode(key)?;
        if key.is_empty() {
            return Err(format!(
                "property with an empty name in {:?}",
                super::dps::short(encoded)
            ));
        }
        properties.insert(key, decode(value)?);
    }
    Ok(properties)
}

/// Percent-encodes properties for a devicebound topic, as the hub does.
pub fn encode_properties(properties: &BTreeMap<String, String>) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const SET: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let set = SET;
    properties
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, set),
                utf8_percent_encode(v, set)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_decode_as_the_sdk_encodes_them() {
        let p =
            parse_properties("%24.mid=m-1&%24.ct=application%2Fjson&a%20b%2Fc=d%26e&flag").unwrap();
        assert_eq!(p["$.mid"], "m-1");
        assert_eq!(p["$.ct"], "application/json");
        assert_eq!(p["a b/c"], "d&e");
        assert_eq!(p["flag"], "");
        assert!(parse_properties("").unwrap().is_empty());
        assert!(parse_properties("=x").is_err());
        assert!(parse_properties("%ff=1").is_err());
        let round = encode_properties(&p);
        assert_eq!(parse_properties(&round).unwrap(), p);
    }
}
