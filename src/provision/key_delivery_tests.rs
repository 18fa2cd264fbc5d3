//! Where a gateway-generated private key may go ([`KeyDelivery`]): real MQTT devices on the
//! in-process embedded broker, the engine against the fake cloud. A device on a plain
//! connection from another host (played by a loopback connection the policy does not trust)
//! is told to send its own CSR or use TLS; the same device gets its key over TLS, and its
//! certificate with its own CSR over plain TCP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

use crate::admission::{Admission, AdmissionMode, AdmissionOptions};
use crate::cloud::fake::FakeProvider;
use crate::downstream::{
    BrokerOptions, Downstream, DownstreamOptions, EmbeddedBrokerOptions, EmbeddedTls,
};
use crate::identity::{self, CertificateAuthority, KeyType, PrivateKey, Secret};
use crate::provision::{Engine, EngineOptions, EngineParts, KeyDelivery, RequestPolicy};
use crate::store::{Store, StoreOptions};

const WITHIN: Duration = Duration::from_secs(15);

struct Gateway {
    _dir: tempfile::TempDir,
    downstream: Downstream,
    engine: Engine,
    port: u16,
}

/// An embedded broker (plain, or TLS with `tls`), the engine on it with the fake cloud, and a
/// key-delivery policy that trusts loopback only if `trust_loopback`.
async fn gateway(tls: Option<EmbeddedTls>, trust_loopback: bool) -> Gateway {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("the store opens");
    let broker = EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls,
        ..EmbeddedBrokerOptions::default()
    };
    let dopts = DownstreamOptions::new("fleetgw-test".into(), BrokerOptions::Embedded(broker));
    let (downstream, queues) = Downstream::start_routed(&dopts, |s| s.inbound_capacity = 64)
        .await
        .expect("downstream starts");
    let mut opts = EngineOptions::new(RequestPolicy {
        max_request_bytes: 64 * 1024,
        allowed_csr_key_types: vec![KeyType::EcdsaP256],
        default_parameters: BTreeMap::new(),
    });
    opts.key_delivery = KeyDelivery::Secure {
        connections: downstream.broker().unwrap().connections(),
        trust_loopback,
    };
    let parts = EngineParts {
        store,
        provider: Arc::new(FakeProvider::new()),
        downstream: downstream.session().clone(),
        admission: Admission::new(AdmissionOptions {
            mode: AdmissionMode::Open,
            ..AdmissionOptions::default()
        })
        .expect("open admission")
        .into(),
        sealer: None,
    };
    let engine = Engine::start(parts, opts, queues.provisioning);
    let port = downstream.broker().unwrap().listen_addr().port();
    Gateway {
        _dir: dir,
        downstream,
        engine,
        port,
    }
}

/// Connects as `id`, subscribes to its answers, sends `request` and returns the answer's
/// topic suffix (`accepted`/`rejected`) and JSON body.
async fn request(
    port: u16,
    id: &str,
    tls_ca: Option<&str>,
    request: serde_json::Value,
) -> (String, serde_json::Value) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(ca) = tls_ca {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            identity::tls::client_config(ca, None).unwrap(),
        )));
    }
    let (client, mut events) = AsyncClient::new(o, 8);
    let topic = format!("fleetgw/{id}/provision/json");
    client
        .subscribe(format!("{topic}/+"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("an answer in time")
            .expect("the connection holds");
        match event {
            Event::Incoming(Packet::SubAck(_)) => {
                client
                    .publish(&topic, QoS::AtLeastOnce, false, request.to_string())
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::Publish(p)) => {
                let outcome = p.topic.rsplit('/').next().unwrap_or_default().to_string();
                return (outcome, serde_json::from_slice(&p.payload).unwrap());
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_plain_connection_from_another_host_gets_no_generated_key() {
    let gw = gateway(None, false).await;
    let none = serde_json::json!({"attestation": {"type": "none"}});
    let (outcome, body) = request(gw.port, "lan-device", None, none).await;
    assert_eq!(outcome, "rejected", "{body}");
    assert_eq!(body["statusCode"], 403);
    assert_eq!(body["errorCode"], "PlainKeyDeliveryRefused");
    let message = body["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("CSR") && message.contains("TLS"),
        "{message}"
    );

    // With its own CSR the same device is provisioned over the same plain connection.
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = identity::create_csr("lan-device", &key).unwrap();
    let own = serde_json::json!({"attestation": {"type": "none"}, "csr": csr});
    let (outcome, body) = request(gw.port, "lan-device", None, own).await;
    assert_eq!(outcome, "accepted", "{body}");
    assert!(body.get("privateKey").is_none(), "{body}");
    gw.engine.shutdown().await;
    gw.downstream.shutdown(WITHIN).await;
}

#[tokio::test]
async fn the_generated_key_goes_over_tls_or_to_this_host() {
    let ca = CertificateAuthority::generate("key delivery test CA").unwrap();
    let (cert, key) = ca
        .issue_server("127.0.0.1", &[], &["127.0.0.1".parse().unwrap()], 1)
        .unwrap();
    let tls = EmbeddedTls {
        cert_chain_pem: cert,
        key_pem: Secret::from(key.to_pkcs8_pem().expose_str().unwrap().to_string()),
    };
    let none = serde_json::json!({"attestation": {"type": "none"}});
    let gw = gateway(Some(tls), false).await;
    let (outcome, body) = request(gw.port, "tls-device", Some(ca.cert_pem()), none.clone()).await;
    assert_eq!(outcome, "accepted", "{body}");
    assert!(
        body["privateKey"]
            .as_str()
            .is_some_and(|k| k.contains("PRIVATE KEY")),
        "{body}"
    );
    gw.engine.shutdown().await;
    gw.downstream.shutdown(WITHIN).await;

    let gw = gateway(None, true).await;
    let (outcome, body) = request(gw.port, "local-device", None, none).await;
    assert_eq!(outcome, "accepted", "{body}");
    assert!(body["privateKey"].is_string(), "{body}");
    gw.engine.shutdown().await;
    gw.downstream.shutdown(WITHIN).await;
}
