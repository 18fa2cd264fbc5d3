//! A device's side of a running daemon, for the reliability tests: connect to the embedded
//! broker (retrying while a restarted daemon is not listening yet), provision, publish.

use std::time::Duration;

use rumqttc::QoS;
use serde_json::Value;
use tokio::time::Instant;

use super::mqtt_client::{options, ClientEvent, TestClient};

/// Connects `client_id` to 127.0.0.1:`port`, retrying for up to `within`.
pub async fn connect_retrying(client_id: &str, port: u16, within: Duration) -> TestClient {
    let deadline = Instant::now() + within;
    loop {
        match TestClient::try_connect(options(client_id, port)).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{client_id}: cannot connect to 127.0.0.1:{port}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Asks the daemon to provision `id` (JSON, no attestation) until it answers `accepted`, then
/// waits for the retained status `provisioned`; returns the thing name. A request the daemon
/// did not answer (it was killed) is sent again on the next connection.
pub async fn provision(port: u16, id: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let status_topic = format!("fleetgw/{id}/status");
    let mut thing: Option<String> = None;
    let mut provisioned = false;
    loop {
        assert!(
            Instant::now() < deadline,
            "{id}: not provisioned in {within:?}"
        );
        let mut dev = connect_retrying(id, port, deadline - Instant::now()).await;
        let answers = format!("fleetgw/{id}/provision/json/+");
        if !subscribed(&mut dev, &answers).await || !subscribed(&mut dev, &status_topic).await {
            continue;
        }
        if thing.is_none()
            && dev
                .client
                .publish(
                    format!("fleetgw/{id}/provision/json"),
                    QoS::AtLeastOnce,
                    false,
                    br#"{"attestation":{"type":"none"}}"#.to_vec(),
                )
                .await
                .is_err()
        {
            continue;
        }
        loop {
            let ev = dev
                .next_matching_within(Duration::from_secs(10), |e| {
                    matches!(e, ClientEvent::Publish(_) | ClientEvent::Closed(_))
                })
                .await;
            let p = match ev {
                Some(ClientEvent::Publish(p)) => p,
                // Closed (the daemon went away) or silence: ask again on a new connection.
                _ => break,
            };
            let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
            if p.topic == status_topic {
                provisioned = v["status"] == "provisioned";
            } else if p.topic.ends_with("/accepted") {
                thing = v["thingName"].as_str().map(str::to_string);
            } else {
                panic!("{id}: {} {v}", p.topic);
            }
            if let (Some(thing), true) = (&thing, provisioned) {
                return thing.clone();
            }
        }
    }
}

/// Subscribes `filter`; false when the connection broke first (a killed daemon).
async fn subscribed(dev: &mut TestClient, filter: &str) -> bool {
    if dev
        .client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .is_err()
    {
        return false;
    }
    matches!(
        dev.next_matching_within(Duration::from_secs(10), |e| {
            matches!(e, ClientEvent::SubAck(_) | ClientEvent::Closed(_))
        })
        .await,
        Some(ClientEvent::SubAck(_))
    )
}
