//! The simulated fleet's counterpart for the fleet tests: the gateway's embedded broker and a
//! small in-test gateway stand-in (the responder) that issues certificates with a test CA as
//! the gateway's contract says (own CSR -> certificate only; no CSR -> certificate and private
//! key), runs the real admission code on every request, and misbehaves for the device numbers
//! a [`Script`] names.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgw::admission::{Admission, Decision};
use fleetgw::device_id::DeviceId;
use fleetgw::downstream::contract::{
    self, AcceptedResponse, PayloadFormat, ProvisionRequest, RejectedResponse,
};
use fleetgw::downstream::{EmbeddedBroker, EmbeddedBrokerOptions};
use fleetgw::identity::{CertificateAuthority, KeyType};
use fleetgw::sim::FleetOptions;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The gateway's embedded broker on a free loopback port (it lives until the test process ends).
pub async fn embedded_broker() -> EmbeddedBroker {
    EmbeddedBroker::start(&EmbeddedBrokerOptions {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        ..EmbeddedBrokerOptions::default()
    })
    .await
    .unwrap()
}

/// How the responder misbehaves for particular device numbers.
#[derive(Default, Clone)]
pub struct Script {
    /// Permanent rejection (400).
    pub reject: BTreeSet<u32>,
    /// Certificate for a key the device does not hold.
    pub wrong_key: BTreeSet<u32>,
    /// Certificate from a CA the device does not trust.
    pub foreign_ca: BTreeSet<u32>,
    /// First request answered with 503 ServiceUnavailable.
    pub transient_first: bool,
    /// First request not answered at all (as if the gateway had not subscribed yet).
    pub ignore_first: bool,
    /// Requests recorded, never answered.
    pub silent: bool,
    /// Admission mode checked with the real admission code.
    pub admission: Option<Arc<Admission>>,
}

/// What the responder saw, per device id.
#[derive(Default)]
pub struct Seen {
    pub requests: BTreeMap<String, Vec<(String, bool)>>, // (format, had csr)
}

pub fn device_number(id: &str) -> u32 {
    id.rsplit('-').next().unwrap().parse().unwrap()
}

/// Subscribes to every provisioning request and answers as the script says. Returns once
/// subscribed.
pub async fn start_responder(
    broker: SocketAddr,
    ca: Arc<CertificateAuthority>,
    script: Script,
) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    static RESPONDERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let client_id = format!(
        "responder-{}",
        RESPONDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut opts = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    opts.set_max_packet_size(1 << 20, 1 << 20)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    client
        .subscribe("fleetgw/+/provision/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let foreign = Arc::new(CertificateAuthority::generate("foreign CA").unwrap());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let event = match eventloop.poll().await {
                Ok(event) => event,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let levels: Vec<&str> = p.topic.split('/').collect();
                    let id = DeviceId::parse(levels[1]).unwrap();
                    let fmt: PayloadFormat = levels[3].parse().unwrap();
                    let request = ProvisionRequest::decode(fmt, &p.payload).unwrap();
                    let attempt = {
                        let mut seen = seen2.lock().unwrap();
                        let list = seen.requests.entry(id.to_string()).or_default();
                        list.push((fmt.to_string(), request.csr.is_some()));
                        list.len()
                    };
                    if script.silent || (script.ignore_first && attempt == 1) {
                        continue;
                    }
                    let (topic, payload) =
                        match answer(&script, &ca, &foreign, &id, request, attempt) {
                            Ok(accepted) => (
                                format!("{}/accepted", p.topic),
                                contract::encode(fmt, &accepted),
                            ),
                            Err(rejected) => (
                                format!("{}/rejected", p.topic),
                                contract::encode(fmt, &rejected),
                            ),
                        };
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("responder subscribed")
        .unwrap();
    seen
}

pub fn answer(
    script: &Script,
    ca: &CertificateAuthority,
    foreign: &CertificateAuthority,
    id: &DeviceId,
    request: ProvisionRequest,
    attempt: usize,
) -> Result<AcceptedResponse, RejectedResponse> {
    let n = device_number(id.as_str());
    if script.transient_first && attempt == 1 {
        return Err(RejectedResponse::new(
            503,
            "ServiceUnavailable",
            "try again",
        ));
    }
    if script.reject.contains(&n) {
        return Err(RejectedResponse::new(
            400,
            "InvalidCsr",
            "CSR signature does not verify",
        ));
    }
    if let Some(admission) = &script.admission {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        match admission.decide(id, &request.attestation, now) {
            Decision::Admit => {}
            Decision::Reject {
                error_code,
                error_message,
            } => return Err(RejectedResponse::new(403, error_code, error_message)),
            Decision::NeedsApproval => {
                return Err(RejectedResponse::new(403, "NeedsApproval", "approval"))
            }
        }
    }
    let issuer = if script.foreign_ca.contains(&n) {
        foreign
    } else {
        ca
    };
    let wrong_key = script.wrong_key.contains(&n);
    let new_key = || {
        issuer
            .issue_client(id.as_str(), KeyType::EcdsaP256, 30)
            .unwrap()
    };
    let (certificate_pem, private_key) = match request.csr {
        Some(csr) if !wrong_key => (issuer.issue_from_csr(&csr, 30).unwrap(), None),
        Some(_) => (new_key().0, None),
        None => {
            let (cert, key) = new_key();
            let key = if wrong_key { new_key().1 } else { key };
            (cert, key.to_pkcs8_pem().expose_str().map(str::to_string))
        }
    };
    Ok(AcceptedResponse {
        device_id: id.clone(),
        certificate_id: format!("cert-{n}"),
        certificate_pem,
        private_key,
        thing_name: format!("thing-{id}"),
        device_configuration: BTreeMap::new(),
        assigned_hub: None,
    })
}

pub fn options(broker: SocketAddr, devices: u32, run: &str) -> FleetOptions {
    let mut opts = FleetOptions::new(broker.ip().to_string(), broker.port(), devices);
    opts.run = run.to_string();
    opts.timeout = Duration::from_secs(20);
    opts
}
