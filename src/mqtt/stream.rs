//! The byte side of one server connection: a read buffer framed by [`wire`](super::wire), and
//! answers gathered in a write buffer that goes out with one write and one flush (the flush
//! matters for TLS streams, which otherwise may keep the last records buffered).
//!
//! The embedded broker and the AWS emulator both drive their connections through this type,
//! so reading, framing, size limits and write timeouts behave the same in both.
//!
//! An idle connection holds no buffer of its own (issue 22: a device at 1 msg/s is idle more
//! than 99% of the time, and 10,000 of them each holding a 4 KiB read buffer cost 40 MB). The
//! read buffer is given back as soon as every complete packet in it was taken; the next read
//! waits for bytes into a scratch array on the stack of the poll (not part of the connection's
//! future) and copies what arrived into a buffer of that size. Only a packet that arrives in
//! parts keeps a buffer between reads, and that one is bounded by the packet limit. The write
//! buffer is given back after each flush.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

#[cfg(test)]
use bytes::Bytes;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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

/// The stack scratch a read from an idle connection lands in (one TLS record's plaintext is at
/// most 16 KiB; a larger read just takes another poll).
pub(crate) const SCRATCH: usize = 4 * 1024;

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
    /// Wraps `stream`; packets over `max_packet` bytes are refused, reads of a packet that
    /// arrives in parts grow the buffer by `read_chunk`.
    pub fn new(stream: S, max_packet: usize, read_chunk: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
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

    /// Reads what the socket has into the read buffer. Cancel-safe: bytes read are in the
    /// buffer, or were not taken from the socket.
    pub async fn fill(&mut self) -> Result<(), StreamError> {
        let read = read_more(
            &mut self.stream,
            &mut self.rbuf,
            self.read_chunk / 2,
            self.read_chunk,
        )
        .await?;
        match read {
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

    /// The next complete packet in the read buffer, if there is one. Once the buffer is empty
    /// it is given back (a packet's payload may still share its allocation, which then lives
    /// as long as the payload).
    pub fn next_packet(&mut self) -> Result<Option<ClientPacket>, WireError> {
        let packet = wire::read_packet(self.protocol, &mut self.rbuf, self.max_packet);
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        packet
    }

    /// Bytes held by the read and write buffers (tests).
    #[cfg(test)]
    pub fn buffer_capacity(&self) -> (usize, usize) {
        (self.rbuf.capacity(), self.wbuf.capacity())
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
        // Given back: the next answer is usually a while away.
        self.wbuf = BytesMut::new();
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

/// One read from `stream` appended to `buf`; the bytes read (0: the stream ended). From idle
/// (`buf` empty) the read waits without a buffer and `buf` then holds exactly what arrived
/// ([`read_idle`]); after part of a packet, the rest goes into `buf` itself, which first
/// reserves `grow` more bytes when less than `min_spare` are free.
pub(crate) async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    min_spare: usize,
    grow: usize,
) -> std::io::Result<usize> {
    if buf.is_empty() {
        *buf = BytesMut::new();
        return read_idle(stream, buf).await;
    }
    if buf.capacity() - buf.len() < min_spare {
        buf.reserve(grow);
    }
    stream.read_buf(buf).await
}

/// One read from `stream` into a stack scratch, appended to `buf` (empty) at the size that
/// arrived. The scratch lives only while the read is polled, not across a wait, so an idle
/// connection's future does not hold it.
async fn read_idle<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    poll_fn(|cx| {
        let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
        let mut read = ReadBuf::uninit(&mut scratch);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::wire::ServerPacket;

    /// A PUBLISH (QoS 0) as a client encodes it, MQTT 3.1.1.
    fn client_publish(topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&u16::try_from(topic.len()).unwrap().to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(payload);
        let mut packet = vec![0x30];
        let mut len = body.len();
        loop {
            let byte = u8::try_from(len % 128).unwrap();
            len /= 128;
            packet.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        packet.extend_from_slice(&body);
        packet
    }

    /// A large packet in either direction does not leave its buffer behind, and an idle
    /// connection holds no buffer at all.
    #[tokio::test]
    async fn buffers_are_given_back_once_a_packet_was_taken_or_sent() {
        const CHUNK: usize = 1024;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut server = PacketStream::new(server, 1 << 20, CHUNK);
        assert_eq!(
            server.buffer_capacity(),
            (0, 0),
            "nothing held before a read"
        );
        // The server writes a large PUBLISH: its write buffer grows, then is given back.
        let big = Bytes::from(vec![b'x'; 200 * 1024]);
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
        assert_eq!(server.buffer_capacity().1, 0, "write buffer given back");
        // The client sends a large PUBLISH: the read buffer grows while it arrives ...
        let packet = client_publish("t/big", &big);
        client.write_all(&packet).await.unwrap();
        let mut read = 0;
        let taken = loop {
            if let Some(p) = server.next_packet().unwrap() {
                break p;
            }
            server.fill().await.unwrap();
            read += 1;
        };
        assert!(read > 1, "arrived in parts");
        assert!(
            matches!(taken, ClientPacket::Publish { ref payload, .. } if payload.len() == big.len())
        );
        // ... and is given back once the packet was taken.
        assert_eq!(server.buffer_capacity(), (0, 0));
        drop(taken);
        // A telemetry-sized packet after idling costs its own size, not a chunk.
        let small = client_publish("t/small", b"21.5");
        client.write_all(&small).await.unwrap();
        server.fill().await.unwrap();
        assert_eq!(server.rbuf.len(), small.len());
        assert!(
            server.buffer_capacity().0 < CHUNK,
            "{:?}",
            server.buffer_capacity()
        );
        assert!(server.next_packet().unwrap().is_some());
        assert_eq!(server.buffer_capacity(), (0, 0));
    }

    /// Hostile: a client trickling a large packet byte by byte makes the buffer grow with the
    /// packet only (within twice the packet limit), and it is given back once the packet was
    /// taken; a packet declaring more than the limit is refused on its header, before its body
    /// is buffered.
    #[tokio::test]
    async fn a_trickled_packet_is_bounded_by_the_limit_and_released() {
        const CHUNK: usize = 1024;
        const LIMIT: usize = 16 * 1024;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut server = PacketStream::new(server, LIMIT, CHUNK);
        let packet = client_publish("t/trickle", &vec![b'y'; LIMIT - 64]);
        let mut most = 0;
        let mut taken = None;
        for byte in &packet {
            client.write_all(std::slice::from_ref(byte)).await.unwrap();
            server.fill().await.unwrap();
            most = most.max(server.buffer_capacity().0);
            if let Some(p) = server.next_packet().unwrap() {
                taken = Some(p);
            }
        }
        assert!(taken.is_some(), "the packet was taken whole");
        assert!(most <= 2 * (LIMIT + CHUNK), "read buffer grew to {most}");
        assert_eq!(server.buffer_capacity(), (0, 0), "given back");
        // Over the limit: refused once the fixed header is in.
        let over = client_publish("t/over", &vec![b'z'; LIMIT + 1]);
        client.write_all(&over[..8]).await.unwrap();
        server.fill().await.unwrap();
        assert!(server.next_packet().is_err(), "refused on its header");
        assert!(server.buffer_capacity().0 < CHUNK);
    }
}
