//! IoT Hub device client: telemetry over MQTT (client id = device id, username
//! `{hub}/{deviceId}/?api-version=2021-04-12`, topic
//! `devices/{deviceId}/messages/events/{url-encoded properties}`, QoS 1, 256 KB) or HTTPS
//! (`POST /devices/{id}/messages/events?api-version=2020-03-13` -> 204), and cloud-to-device
//! messages on `devices/{deviceId}/messages/devicebound/#`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::link::{Link, LinkEvent, LinkOptions};
use super::{AzureError, DeviceCredential, Endpoint};

/// IoT Hub's device-to-cloud message limit.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// MQTT api-version.
pub const MQTT_API_VERSION: &str = "2021-04-12";
/// HTTPS api-version.
pub const HTTPS_API_VERSION: &str = "2020-03-13";
const SERVICE: &str = "IoT Hub";
/// What stays unencoded in property keys and values (RFC 3986 unreserved), as the SDKs do.
pub(crate) const PROPERTY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Who connects to which hub.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// The hub (`assignedHub` from DPS) and where to reach it.
    pub endpoint: Endpoint,
    /// CA certificates (PEM) trusted for the hub.
    pub ca_pem: String,
    /// Bound on connect and on each acknowledgement.
    pub request_timeout: Duration,
}

/// A message from the cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudToDevice {
    /// Decoded properties from the topic.
    pub properties: BTreeMap<String, String>,
    /// Payload.
    pub payload: Bytes,
}

fn too_large(len: usize) -> AzureError {
    AzureError::Protocol {
        service: SERVICE,
        reason: format!("message of {len} bytes exceeds IoT Hub's {MAX_MESSAGE_BYTES} bytes"),
    }
}

/// One device's MQTT connection to its hub.
pub struct HubMqtt {
    link: Link,
    device_id: String,
    pending: std::collections::VecDeque<CloudToDevice>,
}

impl HubMqtt {
    /// Connects as `device_id`.
    pub async fn connect(
        config: &HubConfig,
        device_id: &str,
        credential: &DeviceCredential,
    ) -> Result<HubMqtt, AzureError> {
        let (host, port) = match config.endpoint.connect {
            Some(addr) => (addr.ip().to_string(), addr.port()),
            None => (config.endpoint.host.clone(), 8883),
        };
        let hub = &config.endpoint.host;
        let link = Link::connect(LinkOptions {
            service: SERVICE,
            host: &host,
            port,
            client_id: device_id,
            username: format!("{hub}/{device_id}/?api-version={MQTT_API_VERSION}"),
            password: credential
                .sas(&format!("{hub}/devices/{device_id}"))
                .unwrap_or_default(),
            tls: credential.tls(&config.ca_pem)?,
            timeout: config.request_timeout,
            max_packet: MAX_MESSAGE_BYTES + 4096,
        })
        .await?;
        Ok(HubMqtt {
            link,
            device_id: device_id.to_string(),
            pending: Default::default(),
        })
    }

    /// Sends one telemetry message and waits for the hub's PUBACK.
    pub async fn send(
        &mut self,
        payload: &[u8],
        properties: &[(&str, &str)],
    ) -> Result<(), AzureError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(too_large(payload.len()));
        }
        let topic = format!(
            "devices/{}/messages/events/{}",
            self.device_id,
            encode_properties(properties)
        );
        self.link.publish(&topic, payload.to_vec()).await?;
        loop {
            match self.link.next(&topic).await? {
                LinkEvent::Acked => return Ok(()),
                LinkEvent::Message(t, p) => self.keep_c2d(&t, p),
                LinkEvent::Closed(reason) => {
                    return Err(AzureError::Protocol {
                        service: SERVICE,
                        reason: format!("connection closed: {reason}"),
                    })
                }
                _ => {}
            }
        }
    }

    /// Subscribes to this device's cloud-to-device messages.
    pub async fn subscribe_cloud_to_device(&mut self) -> Result<(), AzureError> {
        let filter = format!("devices/{}/messages/devicebound/#", self.device_id);
        self.link.subscribe(&filter).await
    }

    /// The next cloud-to-device message (within the request timeout).
    pub async fn next_cloud_to_device(&mut self) -> Result<CloudToDevice, AzureError> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Ok(m);
            }
            match self.link.next("a cloud-to-device message").await? {
                LinkEvent::Message(t, p) => self.keep_c2d(&t, p),
                LinkEvent::Closed(reason) => {
                    return Err(AzureError::Protocol {
                        service: SERVICE,
                        reason: format!("connection closed: {reason}"),
                    })
                }
                _ => {}
            }
        }
    }

    fn keep_c2d(&mut self, topic: &str, payload: Bytes) {
        let prefix = format!("devices/{}/messages/devicebound/", self.device_id);
        let Some(encoded) = topic.get(prefix.len()..).filter(|_| {
            topic
                .get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(&prefix))
        }) else {
            tracing::debug!(%topic, "IoT Hub sent a message on an unexpected topic; ignored");
            return;
        };
        self.pending.push_back(CloudToDevice {
            properties: decode_properties(encoded),
            payload,
        });
    }

    /// Disconnects.
    pub async fn close(self) {
        self.link.close().await;
    }
}

/// `k=v&k2=v2`, keys and values percent-encoded.
pub fn encode_properties(properties: &[(&str, &str)]) -> String {
    properties
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, PROPERTY_SET),
                utf8_percent_encode(v, PROPERTY_SET)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Decodes a `k=v&k2=v2` property bag (percent-encoded keys and values).
pub fn decode_properties(encoded: &str) -> BTreeMap<String, String> {
    encoded
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let d = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
            (d(k), d(v))
        })
        .collect()
}

/// Sends one telemetry message over HTTPS (204 expected). Properties map to `iothub-app-*`
/// headers, `$.mid`/`$.cid`/`$.ct`/`$.ce` to the system headers.
pub async fn send_https(
    config: &HubConfig,
    device_id: &str,
    credential: &DeviceCredential,
    payload: &[u8],
    properties: &[(&str, &str)],
) -> Result<(), AzureError> {
    let hub = &config.endpoint.host;
    post_event(
        &config.endpoint,
        credential.tls(&config.ca_pem)?,
        credential.sas(&format!("{hub}/devices/{device_id}")),
        device_id,
        payload,
        properties,
        config.request_timeout,
    )
    .await
}

/// `POST /devices/{id}/messages/events` with `authorization` (a SAS token; `None` with a
/// client certificate in `tls`), on a connection of its own.
pub async fn post_event(
    endpoint: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    authorization: Option<String>,
    device_id: &str,
    payload: &[u8],
    properties: &[(&str, &str)],
    within: Duration,
) -> Result<(), AzureError> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(too_large(payload.len()));
    }
    let mut headers = Vec::new();
    if let Some(sas) = authorization {
        headers.push(("authorization".to_string(), sas));
    }
    for (k, v) in properties {
        let name = match *k {
            "$.mid" => "iothub-messageid".to_string(),
            "$.cid" => "iothub-correlationid".to_string(),
            "$.ct" => "content-type".to_string(),
            "$.ce" => "content-encoding".to_string(),
            app => format!("iothub-app-{app}"),
        };
        if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(AzureError::Protocol {
                service: SERVICE,
                reason: format!(
                    "property name {k:?} cannot be sent over HTTPS (it must be an HTTP header token); use MQTT"
                ),
            });
        }
        headers.push((name, v.to_string()));
    }
    let answer = https_request(
        SERVICE,
        endpoint,
        443,
        tls,
        "POST",
        &format!("/devices/{device_id}/messages/events?api-version={HTTPS_API_VERSION}"),
        &headers,
        payload.to_vec(),
        within,
    )
    .await?;
    if answer.status == 204 || answer.status == 200 {
        return Ok(());
    }
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    if answer.status == 429 {
        return Err(AzureError::Throttled {
            service: SERVICE,
            retry_after: answer.retry_after.unwrap_or(Duration::from_secs(1)),
        });
    }
    Err(AzureError::Service {
        service: SERVICE,
        status: answer.status,
        error_code: body["errorCode"].as_u64().unwrap_or(0),
        message: body["message"].as_str().map_or_else(
            || String::from_utf8_lossy(&answer.body).into_owned(),
            str::to_string,
        ),
    })
}

/// An HTTPS answer.
pub(super) struct HttpsAnswer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// One HTTPS/1.1 request on a connection of its own (TLS server name = the endpoint host).
#[allow(clippy::too_many_arguments)]
pub(super) async fn https_request(
    service: &'static str,
    endpoint: &Endpoint,
    default_port: u16,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    within: Duration,
) -> Result<HttpsAnswer, AzureError> {
    let address = endpoint.address(default_port);
    let connect_err = |reason: String| AzureError::Connect {
        service,
        address: address.clone(),
        reason,
    };
    let server_name = ServerName::try_from(endpoint.host.clone())
        .map_err(|e| connect_err(format!("host {:?}: {e}", endpoint.host)))?;
    let exchange = async {
        let tcp = TcpStream::connect(&address)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let stream = TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| connect_err(format!("TLS: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, endpoint.host.as_str());
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let request =
            request
                .body(axum::body::Body::from(body))
                .map_err(|e| AzureError::Protocol {
                    service,
                    reason: format!("cannot build the request: {e}"),
                })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| AzureError::Protocol {
                service,
                reason: e.to_string(),
            })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Service answers are small JSON documents; a flood is cut, not buffered.
        let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 1024 * 1024)
            .await
            .map_err(|e| AzureError::Protocol {
                service,
                reason: format!("answer body: {e}"),
            })?;
        Ok(HttpsAnswer {
            status,
            retry_after,
            body,
        })
    };
    timeout(within, exchange)
        .await
        .map_err(|_| AzureError::Timeout {
            service,
            what: format!("{method} {path}"),
            waited: within,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_encode_as_the_sdk_does() {
        assert_eq!(
            encode_properties(&[
                ("$.mid", "m-1"),
                ("$.ct", "application/json"),
                ("a b/c", "d")
            ]),
            "%24.mid=m-1&%24.ct=application%2Fjson&a%20b%2Fc=d"
        );
        let back = decode_properties("%24.mid=m-1&a%20b%2Fc=d&flag");
        assert_eq!(back["$.mid"], "m-1");
        assert_eq!(back["a b/c"], "d");
        assert_eq!(back["flag"], "");
    }
}
