//! DPS and IoT Hub over HTTPS (hyper HTTP/1.1 on the shared TLS configuration), the REST
//! forms of seed 000:
//!
//! | service | request | answer |
//! |---|---|---|
//! | DPS | `PUT /{idScope}/registrations/{registrationId}/register?api-version=` | 202 `{"operationId","status":"assigning"}` + `Retry-After` |
//! | DPS | `GET /{idScope}/registrations/{registrationId}/operations/{operationId}?api-version=` | 202 while assigning (+ `Retry-After`), then 200 with `registrationState` |
//! | Hub | `POST /devices/{deviceId}/messages/events?api-version=` | 204 |
//!
//! Credentials: `Authorization: SharedAccessSignature ...` or the TLS client certificate.
//! Hub message properties come from `iothub-app-{name}` headers (application) and
//! `iothub-messageid`, `iothub-correlationid`, `Content-Type`, `Content-Encoding` (`$.mid`,
//! `$.cid`, `$.ct`, `$.ce`), as IoT Hub maps them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use super::auth::{self, Credential};
use super::dps::{DpsReply, RegisterRequest};
use super::hub::{self, Context, Counters, HubMessage, Transport};
use crate::clock;
use crate::identity::tls::peer_chain_ders;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// DPS bodies are small JSON documents.
const MAX_DPS_BODY: usize = 64 * 1024;

/// Which service a listener is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// DPS.
    Dps,
    /// IoT Hub.
    Hub,
}

impl Service {
    fn listener_name(self) -> &'static str {
        match self {
            Service::Dps => "dpsHttps",
            Service::Hub => "hubHttps",
        }
    }
}

/// Accepts connections until `shutdown` turns true.
pub async fn run_listener(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    service: Service,
    shutdown: watch::Receiver<bool>,
) {
    let stopping = shutdown.clone();
    super::accept_until_shutdown(listener, &ctx, "HTTPS", stopping, |tcp, peer| {
        let (ctx, acceptor, shutdown) = (ctx.clone(), acceptor.clone(), shutdown.clone());
        tokio::spawn(async move { serve(tcp, peer, acceptor, ctx, service, shutdown).await });
    })
    .await;
}

async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    service: Service,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = service.listener_name();
    let stream = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return ctx.refuse(listener, peer, format!("TLS handshake failed: {e}")),
        Err(_) => return ctx.refuse(listener, peer, "TLS handshake timed out".into()),
    };
    let chain = Arc::new(peer_chain_ders(stream.get_ref().1));
    let handler_ctx = ctx.clone();
    let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (ctx, chain) = (handler_ctx.clone(), chain.clone());
        async move { Ok::<_, Infallible>(handle(req, &ctx, service, &chain, peer).await) }
    });
    let mut outage = ctx.faults.outage_watch();
    outage.mark_unchanged();
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), handler);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => {
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "Azure emulator HTTPS connection ended");
            }
        }
        _ = outage.changed() => {}
        _ = shutdown.changed() => {}
    }
}

fn json_response(status: u16, body: &Value, retry_after: Option<u64>) -> Response<Body> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json; charset=utf-8")
        .header("x-ms-request-id", hex::encode(rand::random::<[u8; 16]>()));
    if let Some(secs) = retry_after {
        builder = builder.header("retry-after", secs.to_string());
    }
    builder
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn error(status: u16, code: u32, message: impl Into<String>) -> Response<Body> {
    json_response(
        status,
        &json!({
            "errorCode": code,
            "trackingId": hex::encode(rand::random::<[u8; 16]>()),
            "message": message.into(),
            "timestampUtc": clock::rfc3339_millis(clock::unix_ms()),
        }),
        None,
    )
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

async fn body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Body>> {
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(error(
            413,
            413_002,
            format!("request body exceeds {limit} bytes"),
        ));
    }
    match timeout(
        BODY_TIMEOUT,
        axum::body::to_bytes(Body::new(req.into_body()), limit),
    )
    .await
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(error(
            413,
            413_002,
            format!("request body unreadable or over {limit} bytes: {e}"),
        )),
        Err(_) => Err(error(408, 408_001, "request body not received in time")),
    }
}

async fn handle(
    req: Request<Incoming>,
    ctx: &Context,
    service: Service,
    chain: &[Vec<u8>],
    peer: SocketAddr,
) -> Response<Body> {
    let sas = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let credential = Credential::from_parts(sas, chain);
    let path = req.uri().path().to_string();
    let has_api_version = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("api-version=")));
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    if !has_api_version {
        return error(400, 400_004, "the api-version query parameter is required");
    }
    let listener = service.listener_name();
    match (service, req.method().clone(), segments.as_slice()) {
        (Service::Dps, Method::PUT, [scope, "registrations", id, "register"]) => {
            Counters::bump(&ctx.counters.registrations);
            let (scope, id) = (scope.to_string(), id.to_string());
            let bytes = match body(req, MAX_DPS_BODY).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let reply = ctx.dps.register(
                RegisterRequest {
                    id_scope: &scope,
                    registration_id: &id,
                    body: &bytes,
                },
                &credential,
            );
            dps_response(ctx, listener, peer, reply).await
        }
        (Service::Dps, Method::GET, [scope, "registrations", id, "operations", op]) => {
            Counters::bump(&ctx.counters.polls);
            let reply = ctx.dps.operation_status(scope, id, op, &credential);
            dps_response(ctx, listener, peer, reply).await
        }
        (Service::Hub, Method::POST, ["devices", id, "messages", "events"]) => {
            let id = id.to_string();
            if let Err(e) =
                auth::admit_device(&ctx.groups, &ctx.registry, &ctx.hub_host, &id, &credential)
            {
                ctx.note_refusal(listener, peer, e.to_string());
                return error(401, 401_002, e.to_string());
            }
            let properties = header_properties(req.headers());
            let payload = match body(req, hub::MAX_MESSAGE_BYTES).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let device_id = ctx.registry.get(&id).map_or(id.clone(), |r| r.device_id);
            ctx.messages.record(
                &device_id.clone(),
                vec![HubMessage {
                    device_id,
                    transport: Transport::Https,
                    payload,
                    properties,
                }],
                clock::unix_us(),
            );
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .unwrap_or_else(|_| Response::new(Body::empty()))
        }
        _ => error(
            404,
            404_000,
            format!(
                "no such {} route: {} {}",
                match service {
                    Service::Dps => "DPS",
                    Service::Hub => "IoT Hub",
                },
                req.method(),
                super::dps::short(&path)
            ),
        ),
    }
}

async fn dps_response(
    ctx: &Context,
    listener: &'static str,
    peer: SocketAddr,
    reply: DpsReply,
) -> Response<Body> {
    if reply.status == 429 {
        Counters::bump(&ctx.counters.throttled);
    }
    if reply.status == 401 {
        ctx.note_refusal(
            listener,
            peer,
            reply.body["message"].as_str().unwrap_or("").to_string(),
        );
    }
    let (delay, _) = ctx.faults.response_plan();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    json_response(reply.status, &reply.body, reply.retry_after)
}

/// IoT Hub's HTTP header to message property mapping.
fn header_properties(headers: &hyper::HeaderMap) -> BTreeMap<String, String> {
    let mut properties = BTreeMap::new();
    for (name, value) in headers {
        let Ok(value) = value.to_str() else { continue };
        let name = name.as_str();
        let key = if let Some(app) = name.strip_prefix("iothub-app-") {
            app.to_string()
        } else {
            match name {
                "iothub-messageid" => "$.mid".into(),
                "iothub-correlationid" => "$.cid".into(),
                "content-type" => "$.ct".into(),
                "content-encoding" => "$.ce".into(),
                _ => continue,
            }
        };
        properties.insert(key, value.trim().to_string());
    }
    properties
}
