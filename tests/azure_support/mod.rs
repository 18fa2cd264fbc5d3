//! Clients for the Azure emulator tests: an MQTT 3.1.1 client (rumqttc over rustls) that reports
//! its events into a channel, an HTTPS/1.1 client (hyper over tokio-rustls) with optional client
//! certificate, and the credentials devices use (SAS tokens from the group key, certificates
//! from the X.509 group CA).
#![allow(dead_code)]

pub mod flows;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use fleetgw::admission::sas;
use fleetgw::emulator::azure::AzureEmulatorHandle;
use fleetgw::identity::{self, CertificateAuthority, KeyType, PrivateKey};

/// Upper bound for one exchange on loopback.
pub const LIMIT: Duration = Duration::from_secs(15);

/// Unix seconds now.
pub fn now() -> i64 {
    fleetgw::clock::unix_secs()
}

/// The device key derived from the emulator's primary group key.
pub fn device_key(emu: &AzureEmulatorHandle, registration_id: &str) -> Vec<u8> {
    let group = BASE64.decode(emu.primary_key()).unwrap();
    sas::derive_device_key(&group, registration_id)
}

/// A DPS SAS token as the SDK makes it (no `skn`).
pub fn dps_sas(emu: &AzureEmulatorHandle, registration_id: &str, expiry: i64) -> String {
    let uri = format!("{}/registrations/{registration_id}", emu.id_scope());
    sas::generate_sas(&uri, &device_key(emu, registration_id), expiry, None)
}

/// An IoT Hub SAS token, `sr={hub}/devices/{id}`.
pub fn hub_sas(emu: &AzureEmulatorHandle, device_id: &str, key_of: &str, expiry: i64) -> String {
    let uri = format!("{}/devices/{device_id}", emu.endpoints().hub_host);
    sas::generate_sas(&uri, &device_key(emu, key_of), expiry, None)
}

/// A device certificate chain (leaf + group CA) with CN = `cn` and its key, issued by the
/// X.509 group CA in DIR.
pub fn device_cert(emu: &AzureEmulatorHandle, cn: &str) -> (String, PrivateKey) {
    let ca = CertificateAuthority::from_pem(
        &std::fs::read_to_string(emu.group_ca_cert_path()).unwrap(),
        &std::fs::read_to_string(emu.group_ca_key_path()).unwrap(),
    )
    .unwrap();
    let (pem, key) = ca.issue_client(cn, KeyType::EcdsaP256, 30).unwrap();
    (format!("{pem}{}", ca.cert_pem()), key)
}

/// TLS trusting the emulator's CA, with a client certificate when given.
pub fn tls(
    emu: &AzureEmulatorHandle,
    client: Option<&(String, PrivateKey)>,
) -> Arc<rustls::ClientConfig> {
    identity::tls::client_config(emu.ca_pem(), client.map(|(c, k)| (c.as_str(), k))).unwrap()
}

/// What the test sees of an MQTT connection.
#[derive(Debug)]
pub enum Ev {
    /// CONNACK accepted.
    ConnAck,
    /// SUBACK.
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    /// PUBACK.
    PubAck,
    /// PUBLISH.
    Publish(String, Bytes),
    /// The connection ended (error text).
    Closed(String),
}

/// A rumqttc MQTT 3.1.1 client whose event loop reports into a channel and stops at the first
/// error.
pub struct Mqtt {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Ev>,
}

impl Mqtt {
    /// Connects to `addr` (host = its IP, as the SDK does) with the given identity.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        username: &str,
        password: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Mqtt, String> {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_credentials(username, password);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ev::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish(p.topic, p.payload),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let mut mqtt = Mqtt { client, events };
        match mqtt.next().await {
            Ev::ConnAck => Ok(mqtt),
            Ev::Closed(e) => Err(e),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// The next event.
    pub async fn next(&mut self) -> Ev {
        timeout(LIMIT, self.events.recv())
            .await
            .expect("an MQTT event in time")
            .expect("event loop alive")
    }

    /// Subscribes at QoS 1 and returns the SUBACK codes.
    pub async fn subscribe(&mut self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next().await {
                Ev::SubAck(codes) => return codes,
                Ev::Closed(e) => panic!("closed while subscribing to {filter}: {e}"),
                _ => {}
            }
        }
    }

    /// Publishes at QoS 1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
    }

    /// The next PUBLISH received (skipping acks).
    pub async fn next_publish(&mut self) -> (String, Bytes) {
        loop {
            match self.next().await {
                Ev::Publish(t, p) => return (t, p),
                Ev::Closed(e) => panic!("closed while waiting for a publish: {e}"),
                _ => {}
            }
        }
    }

    /// Waits for the next PUBACK.
    pub async fn puback(&mut self) {
        loop {
            match self.next().await {
                Ev::PubAck => return,
                Ev::Closed(e) => panic!("closed while waiting for a PUBACK: {e}"),
                _ => {}
            }
        }
    }

    /// Waits until the server closes the connection.
    pub async fn closed(&mut self) -> String {
        loop {
            if let Ev::Closed(e) = self.next().await {
                return e;
            }
        }
    }
}

/// A DPS MQTT answer: status, query parameters of the topic, JSON body.
#[derive(Debug)]
pub struct DpsAnswer {
    pub status: u16,
    pub rid: String,
    pub retry_after: Option<u64>,
    pub body: Value,
}

/// Parses `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`.
pub fn dps_answer(topic: &str, payload: &[u8]) -> DpsAnswer {
    let rest = topic
        .strip_prefix("$dps/registrations/res/")
        .unwrap_or_else(|| panic!("not a DPS response topic: {topic}"));
    let (status, query) = rest.split_once("/?").expect("status/?query");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
    };
    DpsAnswer {
        status: status.parse().unwrap(),
        rid: param("$rid").expect("$rid"),
        retry_after: param("retry-after").map(|s| s.parse().unwrap()),
        body: serde_json::from_slice(payload).unwrap(),
    }
}

/// A DPS MQTT username as the SDK sends it (extra parameters after the api-version).
pub fn dps_username(scope: &str, registration_id: &str) -> String {
    format!(
        "{scope}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-devicesdk%2F2.14.0"
    )
}

/// An IoT Hub MQTT username as the SDK sends it.
pub fn hub_username(hub: &str, device_id: &str) -> String {
    format!("{hub}/{device_id}/?api-version=2019-10-01&DeviceClientType=azure-iot-device-python%2F2.14.0")
}

/// An HTTPS answer: status, headers, body bytes.
pub struct HttpsAnswer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl HttpsAnswer {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
}

/// One HTTPS request to `addr` (server name = its IP, no SNI).
pub async fn https(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<HttpsAnswer, String> {
    let body = body.into();
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let stream = TlsConnector::from(tls)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string());
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = sender
            .send_request(request.body(Full::new(body)).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(HttpsAnswer {
            status,
            headers,
            body,
        })
    };
    timeout(LIMIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within {LIMIT:?}"))
}
