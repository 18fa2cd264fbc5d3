//! One MQTT 3.1.1 connection over TLS (rumqttc) for the Azure clients: the event loop runs in a
//! task that reports CONNACK, SUBACK, PUBACK, incoming PUBLISHes and the end of the connection
//! into a channel, so callers wait for what they need with a deadline.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::AzureError;

/// What the connection reported.
#[derive(Debug)]
pub enum LinkEvent {
    /// CONNACK accepted.
    Connected,
    /// SUBACK.
    Subscribed,
    /// PUBACK.
    Acked,
    /// An incoming PUBLISH.
    Message(String, Bytes),
    /// The connection ended (refused, closed, socket error).
    Closed(String),
}

/// A connected MQTT link.
pub struct Link {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    task: JoinHandle<()>,
    service: &'static str,
    /// Bound on each wait.
    pub timeout: Duration,
}

/// Who connects where.
pub struct LinkOptions<'a> {
    /// "DPS" or "IoT Hub" (for errors).
    pub service: &'static str,
    /// TLS server name / MQTT host.
    pub host: &'a str,
    /// Port.
    pub port: u16,
    /// Client id.
    pub client_id: &'a str,
    /// Username.
    pub username: String,
    /// Password (SAS token) or empty.
    pub password: String,
    /// TLS configuration.
    pub tls: Arc<rustls::ClientConfig>,
    /// Bound on connect and on each later wait.
    pub timeout: Duration,
    /// Largest packet either way.
    pub max_packet: usize,
}

impl Link {
    /// Connects and waits for CONNACK.
    pub async fn connect(opts: LinkOptions<'_>) -> Result<Link, AzureError> {
        let mut mqtt = MqttOptions::new(opts.client_id, opts.host, opts.port);
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            opts.tls,
        )));
        mqtt.set_clean_session(true);
        mqtt.set_keep_alive(Duration::from_secs(60));
        mqtt.set_max_packet_size(opts.max_packet, opts.max_packet);
        mqtt.set_credentials(opts.username, opts.password);
        let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => LinkEvent::Connected,
                    Ok(Event::Incoming(Packet::SubAck(_))) => LinkEvent::Subscribed,
                    Ok(Event::Incoming(Packet::PubAck(_))) => LinkEvent::Acked,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        LinkEvent::Message(p.topic, p.payload)
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        // The first error ends the link: no silent reconnects behind the caller.
                        let _ = tx.send(LinkEvent::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        let mut link = Link {
            client,
            events,
            task,
            service: opts.service,
            timeout: opts.timeout,
        };
        let address = format!("{}:{}", opts.host, opts.port);
        match link.next("CONNECT").await {
            Ok(LinkEvent::Connected) => Ok(link),
            Ok(LinkEvent::Closed(reason)) | Err(AzureError::Protocol { reason, .. }) => {
                Err(AzureError::Connect {
                    service: opts.service,
                    address,
                    reason,
                })
            }
            Ok(other) => Err(AzureError::Protocol {
                service: opts.service,
                reason: format!("expected CONNACK, got {other:?}"),
            }),
            Err(e) => Err(e),
        }
    }

    /// The next event within the timeout.
    pub async fn next(&mut self, what: &str) -> Result<LinkEvent, AzureError> {
        match timeout(self.timeout, self.events.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(AzureError::Protocol {
                service: self.service,
                reason: "the connection task ended".into(),
            }),
            Err(_) => Err(AzureError::Timeout {
                service: self.service,
                what: what.to_string(),
                waited: self.timeout,
            }),
        }
    }

    fn closed(&self, reason: String) -> AzureError {
        AzureError::Protocol {
            service: self.service,
            reason: format!("connection closed: {reason}"),
        }
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) -> Result<(), AzureError> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .map_err(|e| self.closed(e.to_string()))?;
        loop {
            match self.next(&format!("SUBSCRIBE {filter}")).await? {
                LinkEvent::Subscribed => return Ok(()),
                LinkEvent::Closed(reason) => return Err(self.closed(reason)),
                _ => {}
            }
        }
    }

    /// Publishes at QoS 1 without waiting for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), AzureError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| self.closed(e.to_string()))
    }

    /// Closes the connection (DISCONNECT) and stops the task.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let abort = self.task.abort_handle();
        if timeout(Duration::from_secs(2), self.task).await.is_err() {
            abort.abort();
        }
    }
}
