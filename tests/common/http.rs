//! An HTTP/1.1 client (hyper) for the emulators' inspection and fault API, so tests read what
//! the cloud recorded. One request per connection: the tests ask rarely and must not depend on
//! connection reuse.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::WAIT;

/// [`http_within`] with the usual loopback bound [`WAIT`].
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    http_within(addr, method, path, body, WAIT).await
}

/// Sends one request (JSON body if any) and returns (status, JSON body; `Null` when empty);
/// panics if the whole exchange takes longer than `within`.
pub async fn http_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    within: Duration,
) -> (u16, Value) {
    let json = [("content-type", "application/json".to_string())];
    exchange(
        addr,
        method,
        path,
        &json,
        body.unwrap_or("").as_bytes(),
        within,
    )
    .await
}

/// [`http`] with extra request headers (e.g. the Publish API's `x-amz-mqtt5-*`) and a raw
/// body.
pub async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Value) {
    exchange(addr, method, path, headers, body, WAIT).await
}

/// One request with `headers` and `body` on a fresh connection, bounded by `within`.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    within: Duration,
) -> (u16, Value) {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.expect("connect to the API");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_vec())))
            .expect("a valid request");
        let response = sender.send_request(request).await.expect("HTTP response");
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("response body")
            .to_bytes();
        (status, bytes)
    };
    let (status, bytes) = timeout(within, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within {within:?}"));
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", String::from_utf8_lossy(&bytes)))
    };
    (status, value)
}
