//! An admin API served in-process over a temporary store, and a raw HTTP/1.1 client for its
//! Unix socket and TCP listener (tests speak the wire, not the CLI's client).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use fleetgw::admin::{AdminOptions, AdminParts, AdminServer};
use fleetgw::admission::AdmissionMode;
use fleetgw::device_id::DeviceId;
use fleetgw::store::{Batch, DeviceRecord, DeviceState, Store, StoreOptions};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// A running API over its own store.
pub struct Api {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub server: Option<AdminServer>,
    pub socket: PathBuf,
}

/// A response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
}

impl Api {
    /// Starts the API; `tune` adjusts the options (paths inside the temp dir).
    pub async fn start(mode: AdmissionMode, tune: impl FnOnce(&Path, &mut AdminOptions)) -> Self {
        Self::start_parts(mode, |_| {}, tune).await
    }

    /// As [`Api::start`], `parts` adjusting what the API works with.
    pub async fn start_parts(
        mode: AdmissionMode,
        parts: impl FnOnce(&mut AdminParts),
        tune: impl FnOnce(&Path, &mut AdminOptions),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state"), &StoreOptions::default()).unwrap();
        let socket = dir.path().join("run/admin.sock");
        let mut opts = AdminOptions {
            socket: socket.clone(),
            group: "fleetgw-test-no-such-group".into(),
            read_group: String::new(),
            listen: None,
            token_file: None,
        };
        tune(dir.path(), &mut opts);
        let server = AdminServer::start(&opts, {
            let mut p = AdminParts::new(store.clone(), mode);
            parts(&mut p);
            p
        })
        .await
        .unwrap();
        Api {
            dir,
            store,
            server: Some(server),
            socket,
        }
    }

    /// Stores `n` devices `dev-00000..` in `state`, in one batch.
    pub async fn seed(&self, ids: impl IntoIterator<Item = String>, state: DeviceState) {
        let mut batch = Batch::new();
        for id in ids {
            let mut rec =
                DeviceRecord::new(DeviceId::parse(&id).unwrap(), "json", 1_700_000_000_000);
            rec.state = state.clone();
            batch.put_device(rec);
        }
        self.store.apply(batch).await.unwrap();
    }

    pub async fn get(&self, path: &str) -> Resp {
        unix_request(&self.socket, "GET", path, &[], None).await
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Resp {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if bytes.is_some() {
            h.push(("content-type", "application/json"));
        }
        unix_request(&self.socket, method, path, &h, bytes).await
    }
}

async fn exchange<S>(
    io: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Resp
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("the API answers within 30 s")
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// One request over the Unix socket.
pub async fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Resp {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    exchange(stream, method, path, headers, body).await
}

/// One request over TCP.
pub async fn tcp_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(stream, method, path, headers, None).await
}

/// Asserts the error shape and the request id header, and returns the error code.
pub fn error_code(r: &Resp) -> String {
    let v = r.json();
    let id = r.header("x-ms-request-id").expect("request id header");
    assert_eq!(v["error"]["requestId"].as_str(), Some(id.as_str()), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v["error"]["code"].as_str().unwrap().to_string()
}
