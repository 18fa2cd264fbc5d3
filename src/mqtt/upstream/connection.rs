//! One live upstream connection: TCP (+ TLS), the CONNECT/CONNACK exchange, a read buffer
//! framed by [`codec`](super::codec), a write buffer flushed with a timeout, and the keep-alive
//! clock.
//!
//! An idle connection holds no buffer of its own (rumqttc sizes both for the largest packet;
//! issue 22 wants 10,000 device links in 256 MB, each idle >99% of the time at 1 msg/s). The
//! read buffer is given back once every complete packet in it was taken, and the next read
//! lands in a stack scratch copied into a buffer of the size that arrived
//! ([`read_more`](crate::mqtt::stream::read_more)); only a packet arriving in parts keeps a
//! buffer between reads, grown by doubling from [`READ_CHUNK`] and bounded by the packet limit.
//! The write buffer is given back after each flush. The TLS stream under it
//! ([`tls`](super::tls)) holds no buffer while idle either.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};

use super::codec::{self, ConnAckInfo, ConnectPacket, ServerEvent};
use super::tls;
use super::{MqttVersion, UpstreamError};
use crate::mqtt::props::MessageProperties;
use crate::mqtt::stream::read_more;

/// What a read of a packet arriving in parts reserves at least.
pub const READ_CHUNK: usize = 2 * 1024;
/// Longest wait for a PINGRESP.
const MAX_PING_WAIT: Duration = Duration::from_secs(30);

/// A byte stream a connection runs over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How the bytes travel.
#[derive(Clone)]
pub enum Transport {
    /// TLS with this client configuration (certificate, CA, resumption cache); the server
    /// name is the host connected to.
    Tls(Arc<rustls::ClientConfig>),
    /// Plain TCP (tests against a peer on 127.0.0.1).
    #[cfg(test)]
    Tcp,
}

/// What a connection attempt needs.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Protocol version.
    pub version: MqttVersion,
    /// Client identifier.
    pub client_id: String,
    /// User name and password (a fresh SAS token per connection on IoT Hub).
    pub login: Option<(String, String)>,
    /// Keep-alive we ask for.
    pub keep_alive: Duration,
    /// TCP, TLS and CONNACK within this.
    pub connect_timeout: Duration,
    /// A write (and its flush) within this, or the connection is lost.
    pub write_timeout: Duration,
    /// The largest packet we take from the server.
    pub max_packet_in: usize,
    /// QoS 1 publishes we take unacknowledged (announced in MQTT 5).
    pub receive_maximum: u16,
    /// Shared by the connections whose attempts (TCP, TLS handshake, CONNACK) are bounded
    /// together: an attempt waits for a permit before it starts and holds it until it is
    /// connected or failed. The wait does not count against `connect_timeout`.
    pub attempts: Option<Arc<Semaphore>>,
}

/// Whether a publish was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// Queued for the next flush.
    Yes,
    /// Its encoding (`size` bytes) exceeds the server's Maximum Packet Size: not queued.
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The server's limit.
        limit: u32,
    },
}

/// A connection past its CONNACK.
pub struct Connection {
    io: Box<dyn Io>,
    version: MqttVersion,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_packet_in: usize,
    server: ConnAckInfo,
    keep_alive: Option<Duration>,
    write_timeout: Duration,
    last_sent: Instant,
    ping_sent: Option<Instant>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("version", &self.version)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Connects to `host:port`, sends CONNECT and waits for the CONNACK, all within
/// `opts.connect_timeout`, once `opts.attempts` (if any) has a permit.
pub async fn connect(
    host: &str,
    port: u16,
    transport: &Transport,
    opts: &ConnectOptions,
) -> Result<Connection, UpstreamError> {
    // Never closed, so the permit is always granted in the end.
    let _permit = match &opts.attempts {
        Some(attempts) => attempts.acquire().await.ok(),
        None => None,
    };
    match timeout(
        opts.connect_timeout,
        connect_inner(host, port, transport, opts),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::ConnectTimeout(opts.connect_timeout)),
    }
}

async fn connect_inner(
    host: &str,
    port: u16,
    transport: &Transport,
    opts: &ConnectOptions,
) -> Result<Connection, UpstreamError> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match transport {
        Transport::Tls(config) => {
            let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
                UpstreamError::Tls(format!("{host:?} is not a TLS server name: {e}"))
            })?;
            Box::new(tls::connect(config.clone(), name, tcp).await?)
        }
        #[cfg(test)]
        Transport::Tcp => Box::new(tcp),
    };
    let mut conn = Connection {
        io,
        version: opts.version,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        max_packet_in: opts.max_packet_in,
        server: ConnAckInfo {
            session_present: false,
            receive_maximum: u16::MAX,
            max_packet_size: None,
            topic_alias_maximum: 0,
            server_keep_alive: None,
        },
        keep_alive: None,
        write_timeout: opts.write_timeout,
        last_sent: Instant::now(),
        ping_sent: None,
    };
    let keep_alive_secs = u16::try_from(opts.keep_alive.as_secs())
        .unwrap_or(u16::MAX)
        .max(1);
    let login = opts.login.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    codec::write_connect(
        opts.version,
        &ConnectPacket {
            client_id: &opts.client_id,
            keep_alive_secs,
            login,
            max_packet_in: u32::try_from(opts.max_packet_in).unwrap_or(u32::MAX),
            receive_maximum: opts.receive_maximum,
        },
        &mut conn.wbuf,
    )?;
    conn.flush().await?;
    match conn.read_event().await? {
        ServerEvent::ConnAck(info) => {
            let secs = info.server_keep_alive.unwrap_or(keep_alive_secs);
            conn.keep_alive = (secs > 0).then(|| Duration::from_secs(u64::from(secs)));
            conn.server = info;
            Ok(conn)
        }
        ServerEvent::Refused { code, reason } => Err(UpstreamError::Refused { code, reason }),
        other => Err(UpstreamError::Protocol(format!(
            "expected CONNACK, the server sent {other:?}"
        ))),
    }
}

impl Connection {
    /// The protocol version in use.
    pub fn version(&self) -> MqttVersion {
        self.version
    }

    /// The server's CONNACK limits.
    pub fn server(&self) -> &ConnAckInfo {
        &self.server
    }

    /// Bytes held by this connection's own buffers (not counting TLS).
    pub fn buffer_capacity(&self) -> usize {
        self.rbuf.capacity() + self.wbuf.capacity()
    }

    /// The next packet from the server. Cancel-safe: bytes read stay in the buffer.
    pub async fn read_event(&mut self) -> Result<ServerEvent, UpstreamError> {
        loop {
            if let Some(event) = self.buffered_event()? {
                return Ok(event);
            }
            // Doubling: a large packet costs a few reallocations, not one per read.
            let grow = self.rbuf.len().max(READ_CHUNK);
            if read_more(&mut self.io, &mut self.rbuf, READ_CHUNK / 2, grow).await? == 0 {
                return Err(UpstreamError::Closed);
            }
        }
    }

    /// The next packet among the bytes already read, without reading more: what arrived in
    /// one read is taken in one go before the caller flushes or waits. `Ok(None)` when the
    /// buffer holds no complete packet.
    pub fn buffered_event(&mut self) -> Result<Option<ServerEvent>, UpstreamError> {
        while let Some(event) = codec::read_event(self.version, &mut self.rbuf, self.max_packet_in)?
        {
            if self.rbuf.is_empty() {
                self.rbuf = BytesMut::new();
            }
            if event == ServerEvent::PingResp {
                self.ping_sent = None;
                continue;
            }
            return Ok(Some(event));
        }
        Ok(None)
    }

    /// Whether packets are queued for the next [`Connection::flush`].
    pub fn has_queued(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Queues a QoS 1 PUBLISH unless it exceeds the server's Maximum Packet Size.
    pub fn queue_publish(
        &mut self,
        pkid: u16,
        topic: &str,
        payload: &Bytes,
        properties: Option<&MessageProperties>,
    ) -> Result<Queued, UpstreamError> {
        let before = self.wbuf.len();
        let size = codec::write_publish(
            self.version,
            pkid,
            topic,
            payload,
            properties,
            &mut self.wbuf,
        )?;
        if let Some(limit) = self.server.max_packet_size {
            if size > limit as usize {
                self.wbuf.truncate(before);
                return Ok(Queued::TooLarge { size, limit });
            }
        }
        Ok(Queued::Yes)
    }

    /// Queues the PUBACK of a message the server sent.
    pub fn queue_puback(&mut self, pkid: u16) {
        codec::write_puback(self.version, pkid, &mut self.wbuf);
    }

    /// Queues a SUBSCRIBE of `filters` at `qos` (0 or 1). The SUBACK comes back as
    /// [`ServerEvent::SubAck`]; the caller checks its id ([`Inflight::suback`](super::Inflight::suback)),
    /// that it has one code per filter and that none was refused.
    pub fn queue_subscribe(
        &mut self,
        pkid: u16,
        filters: &[String],
        qos: u8,
    ) -> Result<(), UpstreamError> {
        codec::write_subscribe(self.version, pkid, filters, qos, &mut self.wbuf)
    }

    /// Sends what was queued, within the write timeout.
    pub async fn flush(&mut self) -> Result<(), UpstreamError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let written = timeout(self.write_timeout, async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        })
        .await;
        self.wbuf = BytesMut::new();
        match written {
            Ok(result) => {
                result?;
                self.last_sent = Instant::now();
                Ok(())
            }
            Err(_) => Err(UpstreamError::WriteTimeout(self.write_timeout)),
        }
    }

    /// When [`Connection::on_timer`] has something to do: a PINGREQ is due, or the PINGRESP
    /// is late.
    pub fn next_timer(&self) -> Option<Instant> {
        let keep_alive = self.keep_alive?;
        Some(match self.ping_sent {
            Some(at) => at + keep_alive.min(MAX_PING_WAIT),
            None => self.last_sent + keep_alive,
        })
    }

    /// Queues a PINGREQ when nothing was sent for the keep-alive; a PINGRESP missing for the
    /// keep-alive (at most 30 s) means the connection is lost.
    pub fn on_timer(&mut self, now: Instant) -> Result<(), UpstreamError> {
        let Some(keep_alive) = self.keep_alive else {
            return Ok(());
        };
        match self.ping_sent {
            Some(at) if now >= at + keep_alive.min(MAX_PING_WAIT) => {
                Err(UpstreamError::KeepAliveTimeout(now - at))
            }
            Some(_) => Ok(()),
            None if now >= self.last_sent + keep_alive => {
                codec::write_pingreq(self.version, &mut self.wbuf);
                self.ping_sent = Some(now);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Sends DISCONNECT (best effort, within a second) and closes.
    pub async fn disconnect(mut self) {
        codec::write_disconnect(self.version, &mut self.wbuf);
        self.write_timeout = self.write_timeout.min(Duration::from_secs(1));
        let _ = self.flush().await;
        let _ = timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }
}
