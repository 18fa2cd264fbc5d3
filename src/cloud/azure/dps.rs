//! Device Provisioning Service client: register a device and poll its operation, over MQTT
//! (seed 003) or HTTPS (seed 000), honouring `retry-after` (never a fixed interval).
//!
//! DPS has no correlation across registrations on one MQTT connection, so every registration
//! (or single poll, e.g. resuming a stored operation after a crash) uses a connection of its
//! own: client id = registration id, username
//! `{idScope}/registrations/{registrationId}/api-version=2019-03-31`, `$rid` per request.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::link::{Link, LinkEvent, LinkOptions};
use super::{AzureError, DeviceCredential, Endpoint};

/// The DPS API version this client speaks.
pub const API_VERSION: &str = "2019-03-31";
/// DPS MQTT port.
pub const MQTT_PORT: u16 = 8883;
/// DPS HTTPS port.
pub const HTTPS_PORT: u16 = 443;
/// Wait used when an `assigning` answer has no `retry-after`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);
/// Longest wait a `retry-after` may impose (a hostile or broken service cannot park us).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
const SERVICE: &str = "DPS";

/// MQTT or HTTPS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpsTransport {
    /// MQTT 3.1.1 over TLS, port 8883.
    Mqtt,
    /// HTTPS, port 443.
    Https,
}

/// Where DPS is and how to talk to it.
#[derive(Clone, Debug)]
pub struct DpsConfig {
    /// The DPS endpoint (`global.azure-devices-provisioning.net`).
    pub endpoint: Endpoint,
    /// The ID scope.
    pub id_scope: String,
    /// CA certificates (PEM) trusted for the service.
    pub ca_pem: String,
    /// MQTT or HTTPS.
    pub transport: DpsTransport,
    /// Bound on each request (connect, answer).
    pub request_timeout: Duration,
    /// Most status polls of one registration before giving up.
    pub max_polls: u32,
    /// Most 429 answers to one request before giving up.
    pub max_throttled: u32,
}

/// A registration record as DPS returns it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationState {
    /// The registration id.
    pub registration_id: String,
    /// The device id at the hub.
    #[serde(default)]
    pub device_id: String,
    /// Host name of the assigned hub.
    #[serde(default)]
    pub assigned_hub: String,
    /// assigned / assigning / failed / disabled / unassigned.
    #[serde(default)]
    pub status: String,
    /// initialAssignment, deviceDataMigrated, ...
    #[serde(default)]
    pub substatus: String,
    /// RFC 3339.
    #[serde(default)]
    pub created_date_time_utc: String,
    /// RFC 3339.
    #[serde(default)]
    pub last_updated_date_time_utc: String,
    /// Record version.
    #[serde(default)]
    pub etag: String,
    /// Error code when failed.
    #[serde(default)]
    pub error_code: Option<u64>,
    /// Error message when failed.
    #[serde(default)]
    pub error_message: Option<String>,
}

/// Where a registration stands after one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// Assigned to a hub.
    Assigned(RegistrationState),
    /// Still running: poll `operation_id` after `retry_after`.
    Assigning {
        /// The operation to poll.
        operation_id: String,
        /// How long to wait first.
        retry_after: Duration,
    },
    /// failed / disabled / unassigned: final, with DPS's reason.
    NotAssigned {
        /// The status.
        status: String,
        /// The registration state DPS sent, if any.
        state: Option<RegistrationState>,
    },
}

/// A DPS client (cheap to clone; no connection is kept between calls).
#[derive(Clone, Debug)]
pub struct DpsClient {
    config: DpsConfig,
}

/// One answer: status, retry-after, body.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Value,
}

impl DpsClient {
    /// A client for `config`.
    pub fn new(config: DpsConfig) -> Self {
        Self { config }
    }

    /// Registers and polls until DPS has an answer: the assigned state, or an error for
    /// failed / disabled / unassigned. One MQTT connection for the whole registration.
    pub async fn provision(
        &self,
        registration_id: &str,
        credential: &DeviceCredential,
        payload: Option<Value>,
    ) -> Result<RegistrationState, AzureError> {
        let mut session = Session::open(&self.config, registration_id, credential).await?;
        let result = self.provision_on(&mut session, payload).await;
        session.close().await;
        result
    }

    async fn provision_on(
        &self,
        session: &mut Session<'_>,
        payload: Option<Value>,
    ) -> Result<RegistrationState, AzureError> {
        let mut status = session.register(payload).await?;
        for _ in 0..self.config.max_polls {
            match status {
                RegistrationStatus::Assigned(state) => return Ok(state),
                RegistrationStatus::NotAssigned { status, state } => {
                    return Err(not_assigned(&status, state.as_ref()))
                }
                RegistrationStatus::Assigning {
                    operation_id,
                    retry_after,
                } => {
                    tokio::time::sleep(retry_after).await;
                    status = session.poll(&operation_id).await?;
                }
            }
        }
        Err(AzureError::Timeout {
            service: SERVICE,
            what: format!(
                "registration of {} (still assigning after {} polls)",
                session.registration_id, self.config.max_polls
            ),
            waited: self.config.request_timeout,
        })
    }

    /// One register request (no polling): for callers that persist the operation id first.
    pub async fn register(
        &self,
        registration_id: &str,
        credential: &DeviceCredential,
        payload: Option<Value>,
    ) -> Result<RegistrationStatus, AzureError> {
        let mut session = Session::open(&self.config, registration_id, credential).await?;
        let result = session.register(payload).await;
        session.close().await;
        result
    }

    /// One status poll of a stored operation.
    pub async fn poll(
        &self,
        registration_id: &str,
        credential: &DeviceCredential,
        operation_id: &str,
    ) -> Result<RegistrationStatus, AzureError> {
        let mut session = Session::open(&self.config, registration_id, credential).await?;
        let result = session.poll(operation_id).await;
        session.close().await;
        result
    }
}

fn not_assigned(status: &str, state: Option<&RegistrationState>) -> AzureError {
    AzureError::Service {
        service: SERVICE,
        status: 200,
        error_code: state.and_then(|s| s.error_code).unwrap_or(0),
        message: format!(
            "registration {status}{}",
            state
                .and_then(|s| s.error_message.as_deref())
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
    }
}

/// One registration's conversation with DPS.
struct Session<'a> {
    config: &'a DpsConfig,
    registration_id: String,
    credential: &'a DeviceCredential,
    link: Option<Link>,
    next_rid: u32,
}

impl<'a> Session<'a> {
    async fn open(
        config: &'a DpsConfig,
        registration_id: &str,
        credential: &'a DeviceCredential,
    ) -> Result<Session<'a>, AzureError> {
        let mut session = Session {
            config,
            registration_id: registration_id.to_string(),
            credential,
            link: None,
            next_rid: 0,
        };
        if config.transport == DpsTransport::Mqtt {
            let (host, port) = match config.endpoint.connect {
                Some(addr) => (addr.ip().to_string(), addr.port()),
                None => (config.endpoint.host.clone(), MQTT_PORT),
            };
            let mut link = Link::connect(LinkOptions {
                service: SERVICE,
                host: &host,
                port,
                client_id: registration_id,
                username: format!(
                    "{}/registrations/{registration_id}/api-version={API_VERSION}",
                    config.id_scope
                ),
                password: session.sas().unwrap_or_default(),
                tls: credential.tls(&config.ca_pem)?,
                timeout: config.request_timeout,
                max_packet: 256 * 1024,
            })
            .await?;
            link.subscribe("$dps/registrations/res/#").await?;
            session.link = Some(link);
        }
        Ok(session)
    }

    fn sas(&self) -> Option<String> {
        self.credential.sas(&format!(
            "{}/registrations/{}",
            self.config.id_scope, self.registration_id
        ))
    }

    async fn close(self) {
        if let Some(link) = self.link {
            link.close().await;
        }
    }

    async fn register(&mut self, payload: Option<Value>) -> Result<RegistrationStatus, AzureError> {
        let body = json!({ "registrationId": self.registration_id, "payload": payload });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        self.request(Request::Register, body).await
    }

    async fn poll(&mut self, operation_id: &str) -> Result<RegistrationStatus, AzureError> {
        self.request(Request::Poll(operation_id.to_string()), Vec::new())
            .await
    }

    /// Sends one request, retrying after 429s as told, and interprets the answer.
    async fn request(
        &mut self,
        request: Request,
        body: Vec<u8>,
    ) -> Result<RegistrationStatus, AzureError> {
        let mut throttled = 0;
        loop {
            let answer = match self.link {
                Some(_) => self.over_mqtt(&request, body.clone()).await?,
                None => self.over_https(&request, body.clone()).await?,
            };
            if answer.status == 429 {
                throttled += 1;
                let retry_after = clamp(answer.retry_after.unwrap_or(DEFAULT_RETRY_AFTER));
                if throttled > self.config.max_throttled {
                    return Err(AzureError::Throttled {
                        service: SERVICE,
                        retry_after,
                    });
                }
                tracing::debug!(registration = %self.registration_id, ?retry_after, "DPS throttled the request; waiting");
                tokio::time::sleep(retry_after).await;
                continue;
            }
            return interpret(answer);
        }
    }

    async fn over_mqtt(&mut self, request: &Request, body: Vec<u8>) -> Result<Answer, AzureError> {
        self.next_rid = self.next_rid.wrapping_add(1);
        let rid = self.next_rid.to_string();
        let (topic, body) = match request {
            Request::Register => (
                format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
                body,
            ),
            Request::Poll(op) => (
                format!(
                    "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}"
                ),
                b" ".to_vec(),
            ),
        };
        let Some(link) = self.link.as_mut() else {
            return Err(AzureError::Protocol {
                service: SERVICE,
                reason: "no MQTT connection".into(),
            });
        };
        link.publish(&topic, body).await?;
        loop {
            match link.next(&topic).await? {
                LinkEvent::Message(topic, payload) => {
                    if let Some(answer) = parse_response_topic(&topic, &rid, &payload)? {
                        return Ok(answer);
                    }
                }
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

    async fn over_https(&mut self, request: &Request, body: Vec<u8>) -> Result<Answer, AzureError> {
        let (method, path) = match request {
            Request::Register => (
                "PUT",
                format!(
                    "/{}/registrations/{}/register?api-version={API_VERSION}",
                    self.config.id_scope, self.registration_id
                ),
            ),
            Request::Poll(op) => (
                "GET",
                format!(
                    "/{}/registrations/{}/operations/{op}?api-version={API_VERSION}",
                    self.config.id_scope, self.registration_id
                ),
            ),
        };
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(sas) = self.sas() {
            headers.push(("authorization".to_string(), sas));
        }
        let answer = super::hub::https_request(
            SERVICE,
            &self.config.endpoint,
            HTTPS_PORT,
            self.credential.tls(&self.config.ca_pem)?,
            method,
            &path,
            &headers,
            body,
            self.config.request_timeout,
        )
        .await?;
        let body = if answer.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer.body).map_err(|e| AzureError::Protocol {
                service: SERVICE,
                reason: format!("answer {} is not JSON: {e}", answer.status),
            })?
        };
        Ok(Answer {
            status: answer.status,
            retry_after: answer.retry_after,
            body,
        })
    }
}

enum Request {
    Register,
    Poll(String),
}

fn clamp(d: Duration) -> Duration {
    d.min(MAX_RETRY_AFTER)
}

/// `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`: `Some` if it answers `rid`.
fn parse_response_topic(
    topic: &str,
    rid: &str,
    payload: &[u8],
) -> Result<Option<Answer>, AzureError> {
    let Some(rest) = topic.strip_prefix("$dps/registrations/res/") else {
        return Ok(None);
    };
    let Some((status, query)) = rest.split_once("/?") else {
        return Ok(None);
    };
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    if param("$rid") != Some(rid) {
        return Ok(None);
    }
    let status: u16 = status.parse().map_err(|_| AzureError::Protocol {
        service: SERVICE,
        reason: format!("response topic {topic:?} has no status code"),
    })?;
    let retry_after = param("retry-after")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = serde_json::from_slice(payload).map_err(|e| AzureError::Protocol {
        service: SERVICE,
        reason: format!("answer on {topic:?} is not JSON: {e}"),
    })?;
    Ok(Some(Answer {
        status,
        retry_after,
        body,
    }))
}

fn interpret(answer: Answer) -> Result<RegistrationStatus, AzureError> {
    if !(200..300).contains(&answer.status) {
        return Err(AzureError::Service {
            service: SERVICE,
            status: answer.status,
            error_code: answer.body["errorCode"].as_u64().unwrap_or(0),
            message: answer.body["message"]
                .as_str()
                .map_or_else(|| answer.body.to_string(), str::to_string),
        });
    }
    let status = answer.body["status"].as_str().unwrap_or("").to_string();
    let state: Option<RegistrationState> = answer
        .body
        .get("registrationState")
        .and_then(|s| serde_json::from_value(s.clone()).ok());
    match status.as_str() {
        "assigned" => state
            .map(RegistrationStatus::Assigned)
            .ok_or_else(|| AzureError::Protocol {
                service: SERVICE,
                reason: "assigned without a registrationState".into(),
            }),
        "assigning" => {
            let operation_id = answer.body["operationId"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| AzureError::Protocol {
                    service: SERVICE,
                    reason: "assigning without an operationId".into(),
                })?
                .to_string();
            Ok(RegistrationStatus::Assigning {
                operation_id,
                retry_after: clamp(answer.retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
            })
        }
        "failed" | "disabled" | "unassigned" => {
            Ok(RegistrationStatus::NotAssigned { status, state })
        }
        other => Err(AzureError::Protocol {
            service: SERVICE,
            reason: format!("unknown registration status {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics_parse_with_and_without_retry_after() {
        let a = parse_response_topic(
            "$dps/registrations/res/202/?$rid=7&retry-after=3",
            "7",
            br#"{"operationId":"op","status":"assigning"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (a.status, a.retry_after),
            (202, Some(Duration::from_secs(3)))
        );
        assert_eq!(
            interpret(a).unwrap(),
            RegistrationStatus::Assigning {
                operation_id: "op".into(),
                retry_after: Duration::from_secs(3)
            }
        );
        assert!(
            parse_response_topic("$dps/registrations/res/200/?$rid=8", "7", b"{}")
                .unwrap()
                .is_none()
        );
        let throttled = Answer {
            status: 400,
            retry_after: None,
            body: json!({"errorCode": 400004, "message": "bad"}),
        };
        assert!(matches!(
            interpret(throttled),
            Err(AzureError::Service {
                error_code: 400_004,
                ..
            })
        ));
    }

    #[test]
    fn a_huge_retry_after_is_capped() {
        assert_eq!(clamp(Duration::from_secs(86_400)), MAX_RETRY_AFTER);
    }
}
