//! A raw MQTT 3.1.1 client for what rumqttc completes on its own (the QoS 2 exchange, a
//! PUBLISH repeated after a reconnect): packets built by hand, read back as (first byte, body).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects (3.1.1, clean session `clean`) and reads the CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut raw = Self {
            stream,
            buf: Vec::new(),
        };
        let flags = if clean { 0x02 } else { 0x00 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        raw.send(&packet(0x10, &body)).await;
        let (h, b) = raw.read().await;
        assert_eq!((h, b[1]), (0x20, 0), "CONNACK accepted");
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next packet: (first byte, body).
    pub async fn read(&mut self) -> (u8, Vec<u8>) {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some((h, len, at)) = frame(&self.buf) {
                    let body = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return (h, body);
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("a packet in time")
    }
}

/// (first byte, body length, body offset) of a complete packet at the start of `buf`.
fn frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let at = 2 + i;
            return (buf.len() >= at + len).then_some((buf[0], len, at));
        }
    }
    None
}

pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

pub fn subscribe(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(qos);
    packet(0x82, &body)
}

/// The packet id of a QoS > 0 PUBLISH body.
pub fn packet_id_of(body: &[u8]) -> u16 {
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    u16::from_be_bytes([body[2 + topic_len], body[3 + topic_len]])
}

/// The packet id of an acknowledgement body.
pub fn packet_id_of_ack(body: &[u8]) -> u16 {
    u16::from_be_bytes([body[0], body[1]])
}

/// The payload of a PUBLISH body at `qos`.
pub fn payload_of(body: &[u8], qos: u8) -> &[u8] {
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let at = 2 + topic_len + if qos > 0 { 2 } else { 0 };
    &body[at..]
}

/// A QoS `qos` PUBLISH (`dup` for a repeat).
pub fn publish(pkid: u16, topic: &str, payload: &[u8], qos: u8, dup: bool) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, &body)
}
