//! The byte side of one server connection: a read buffer framed by [`wire`](super::wire), and
//! answers gathered in a write buffer that goes out with one write and one flush (the flush
//! matters for TLS streams, which otherwise may keep the last records buffered).
//!
//! The embedded broker and the AWS emulator both drive their connections through this type,
//! so reading, framing, size limits and write timeouts behave the same in both.

use std::time::Duration;

#[cfg(test)]
use bytes::Bytes;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use super::wire::{self, ClientPacket, ConnectInfo, Protocol, ServerPacket, WireError};

/// Why a connection's bytes could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The client closed its side.
    #[error("closed by the client")]
    Closed,
    /// Socket error.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// Bytes that are not the expected MQTT packet.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The client stopped reading: the write did not complete in time.
    #[error("client does not read (write timed out)")]
    WriteTimeout,
}

/// A buffer larger than this many read chunks is given back once empty.
const KEEP_CHUNKS: usize = 4;

/// An MQTT server connection over any byte stream (TCP or TLS).
#[derive(Debug)]
pub struct PacketStream<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    protocol: Protocol,
    max_packet: usize,
    read_chunk: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PacketStream<S> {
    /// Wraps `stream`; packets over `max_packet` bytes are refused, reads grow the buffer by
    /// `read_chunk`.
    pub fn new(stream: S, max_packet: usize, read_chunk: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::with_capacity(read_chunk),
            wbuf: BytesMut::new(),
            protocol: Protocol::V4,
            max_packet,
            read_chunk,
        }
    }

    /// The protocol the client chose at CONNECT (3.1.1 until then).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Reads what the socket has into the read buffer.
    pub async fn fill(&mut self) -> Result<(), StreamError> {
        // Sized for telemetry, not for the largest packet: once a large packet has passed, an
        // empty buffer goes back to one chunk instead of keeping its size for the connection's
        // life.
        if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_CHUNKS * self.read_chunk {
            self.rbuf = BytesMut::with_capacity(self.read_chunk);
        }
        if self.rbuf.capacity() - self.rbuf.len() < self.read_chunk / 2 {
            self.rbuf.reserve(self.read_chunk);
        }
        match self.stream.read_buf(&mut self.rbuf).await? {
            0 => Err(StreamError::Closed),
            _ => Ok(()),
        }
    }

    /// Reads until a complete CONNECT; answers are then encoded in its protocol.
    pub async fn read_connect(&mut self) -> Result<ConnectInfo, StreamError> {
        loop {
            if let Some(connect) = wire::read_connect(&mut self.rbuf, self.max_packet)? {
                self.protocol = connect.protocol;
                return Ok(connect);
            }
            self.fill().await?;
        }
    }

    /// The next complete packet in the read buffer, if there is one.
    pub fn next_packet(&mut self) -> Result<Option<ClientPacket>, WireError> {
        wire::read_packet(self.protocol, &mut self.rbuf, self.max_packet)
    }

    /// Encodes `packet` into the write buffer.
    pub fn queue(&mut self, packet: ServerPacket<'_>) -> Result<(), WireError> {
        wire::write_packet(self.protocol, packet, &mut self.wbuf)
    }

    /// Encodes `packet` into the write buffer unless its encoding exceeds `limit` bytes (the
    /// peer's maximum packet size); false when it was left out.
    pub fn queue_within(
        &mut self,
        packet: ServerPacket<'_>,
        limit: usize,
    ) -> Result<bool, WireError> {
        let before = self.wbuf.len();
        wire::write_packet(self.protocol, packet, &mut self.wbuf)?;
        if self.wbuf.len() - before > limit {
            self.wbuf.truncate(before);
            return Ok(false);
        }
        Ok(true)
    }

    /// Writes and flushes the write buffer, within `limit`.
    pub async fn flush(&mut self, limit: Duration) -> Result<(), StreamError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let written = timeout(limit, async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        })
        .await;
        if self.wbuf.capacity() > KEEP_CHUNKS * self.read_chunk {
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        match written {
            Ok(result) => Ok(result?),
            Err(_) => Err(StreamError::WriteTimeout),
        }
    }

    /// Writes bytes as they are, bypassing the codec (tests playing a hostile peer).
    #[cfg(test)]
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Closes the write side, waiting at most a second for the peer.
    pub async fn shutdown(&mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::wire::ServerPacket;

    /// A large packet in either direction does not leave its buffer behind.
    #[tokio::test]
    async fn buffers_go_back_to_one_chunk_after_a_large_packet() {
        const CHUNK: usize = 1024;
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut server = PacketStream::new(server, 1 << 20, CHUNK);
        let mut client = PacketStream::new(client, 1 << 20, CHUNK);
        let big = Bytes::from(vec![b'x'; 200 * 1024]);
        // The server writes a large PUBLISH: its write buffer grows, then is given back.
        server
            .queue(ServerPacket::Publish {
                topic: "t",
                qos: 0,
                pkid: 0,
                retain: false,
                dup: false,
                payload: big.clone(),
                properties: None,
            })
            .unwrap();
        assert!(server.wbuf.capacity() > big.len());
        server.flush(Duration::from_secs(5)).await.unwrap();
        assert!(server.wbuf.capacity() <= KEEP_CHUNKS * CHUNK);
        // The other side reads it all: its read buffer grows while the packet passes ...
        while client.rbuf.len() < big.len() {
            client.fill().await.unwrap();
        }
        assert!(client.rbuf.capacity() > big.len());
        client.rbuf.clear();
        // ... and the next read starts from one chunk again.
        server.write_raw(&[0xd0, 0x00]).await.unwrap();
        client.fill().await.unwrap();
        assert_eq!(&client.rbuf[..], &[0xd0, 0x00]);
        assert!(client.rbuf.capacity() <= KEEP_CHUNKS * CHUNK);
    }
}
