//! The upstream links' TLS stream, on rustls's unbuffered API: an idle connection holds no
//! buffer.
//!
//! Why not `tokio_rustls` here: rustls's buffered `ClientConnection` resizes its record
//! buffer to 4 KiB on every read and never gives it back, and keeps queues for plaintext and
//! outgoing records beside it. With 10,000 device links, each idle more than 99% of the time
//! at 1 msg/s, that buffer alone is 40 MB of the 256 MB the scale target allows (issue 22).
//! With the unbuffered API (`UnbufferedClientConnection`) the caller owns the bytes, so this
//! stream keeps them only while they are in use:
//!
//! - **Reading**: ciphertext from the socket lands in a scratch array on the stack of the poll
//!   and rustls processes it there. Plaintext goes straight into the caller's `ReadBuf`; only
//!   what does not fit is kept ([`TlsStream::buffer_capacity`] counts it) until the next
//!   read. Only a record that arrived in parts is copied into a heap buffer, which is freed
//!   once its records are consumed. rustls's deframer rejects a record over the TLS limit, so
//!   that buffer is bounded.
//! - **Writing**: the caller's bytes are encrypted into a buffer that is freed once the socket
//!   took it all. A write first sends what the previous one left, so at most one write's
//!   records wait.
//! - **Handshake** ([`connect`]): SNI, certificate verification, client authentication,
//!   TLS 1.2/1.3 and session resumption all come from the `ClientConfig`, exactly as with the
//!   buffered API; the caller bounds it in time (the link's connect timeout covers TCP, TLS
//!   and CONNACK). Post-handshake messages (TLS 1.3 session tickets, key updates) are
//!   processed as they arrive during reads, and whatever rustls answers (a key update) goes
//!   out with the next read, write or flush.
//! - **Close**: `poll_shutdown` sends close_notify before shutting the socket; the server's
//!   close_notify is the end of the stream, and the socket closing without one is an
//!   `UnexpectedEof` error, as rustls's buffered reader reports it.
//! - **Errors**: a TLS error (bad record, bad certificate, an alert from the server) is an
//!   `InvalidData` I/O error, and every later call returns it again; the alert rustls queues
//!   for the server is sent when the socket takes it without waiting. Handshake errors are
//!   [`UpstreamError::Tls`], as before.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::UnbufferedClientConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::UpstreamError;
use crate::mqtt::stream::SCRATCH;

/// The most plaintext one `poll_write` encrypts (the records wait in a buffer until the
/// socket takes them).
const MAX_WRITE: usize = 64 * 1024;
/// Bytes a TLS record adds to its plaintext, at most, over the suites rustls offers (header,
/// explicit nonce, tag, content type); a wrong guess only costs a second attempt.
const RECORD_OVERHEAD: usize = 64;
/// The largest plaintext of one record.
const MAX_FRAGMENT: usize = 16 * 1024;

/// A TLS client stream over `S` (a `TcpStream` for the links) holding no buffer while idle.
pub struct TlsStream<S> {
    io: S,
    conn: UnbufferedClientConnection,
    /// Ciphertext not yet consumed: a record that arrived in parts. Empty and unallocated
    /// otherwise.
    incoming: Vec<u8>,
    bufs: Buffers,
    /// Whether our close_notify was queued.
    close_queued: bool,
    /// The TLS error that ended the connection, returned by every later call.
    failed: Option<String>,
}

/// What rustls's states write to, apart from the incoming ciphertext.
#[derive(Default)]
struct Buffers {
    /// Plaintext that did not fit the caller's buffer, from `plain_pos` on.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Records to send, from `out_pos` on.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The server's close_notify arrived.
    peer_closed: bool,
}

/// What to do once rustls allows application data.
#[derive(Clone, Copy)]
enum Action<'a> {
    None,
    Encrypt(&'a [u8]),
    CloseNotify,
}

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("protocol", &self.conn.protocol_version())
            .finish_non_exhaustive()
    }
}

/// Runs the TLS handshake with `name` (SNI and the name the certificate must carry) over
/// `io`. The caller bounds it in time.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: S,
) -> Result<TlsStream<S>, UpstreamError> {
    let conn = UnbufferedClientConnection::new(config, name)
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    let mut stream = TlsStream {
        io,
        conn,
        incoming: Vec::new(),
        bufs: Buffers::default(),
        close_queued: false,
        failed: None,
    };
    poll_fn(|cx| stream.poll_handshake(cx))
        .await
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    Ok(stream)
}

impl<S> TlsStream<S> {
    /// Bytes this stream holds in its own buffers (rustls's connection state, keys and
    /// certificates not counted): 0 while idle.
    pub fn buffer_capacity(&self) -> usize {
        self.incoming.capacity() + self.bufs.plain.capacity() + self.bufs.outgoing.capacity()
    }

    /// The rustls connection (negotiated version, handshake kind, peer certificates).
    pub fn connection(&self) -> &UnbufferedClientConnection {
        &self.conn
    }

    /// The socket.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.clone())),
            None => Ok(()),
        }
    }

    /// Feeds `input` (ciphertext just read, or nothing) to rustls after what is pending,
    /// delivering plaintext to `out` (the rest is kept) and doing `action` once rustls allows
    /// application data. Returns whether the action was done.
    fn feed(
        &mut self,
        input: &mut [u8],
        out: Option<&mut ReadBuf<'_>>,
        action: Action<'_>,
    ) -> io::Result<bool> {
        self.check()?;
        let result = if self.incoming.is_empty() {
            // The common case: whole records in the scratch, processed where they lie; a
            // record in parts keeps its start.
            let result = drive(&mut self.conn, input, &mut self.bufs, out, action);
            if let Ok((consumed, _)) = result {
                self.incoming.extend_from_slice(&input[consumed..]);
            }
            result
        } else {
            self.incoming.extend_from_slice(input);
            let result = drive(
                &mut self.conn,
                &mut self.incoming,
                &mut self.bufs,
                out,
                action,
            );
            if let Ok((consumed, _)) = result {
                self.incoming.drain(..consumed);
                if self.incoming.is_empty() {
                    self.incoming = Vec::new();
                }
            }
            result
        };
        match result {
            Ok((_, done)) => Ok(done),
            Err(e) => {
                self.failed = Some(e.to_string());
                self.incoming = Vec::new();
                self.queue_alert();
                Err(e)
            }
        }
    }

    /// After an error: the alert rustls queued for the server, if any, into the outgoing
    /// buffer (rustls hands out what it queued before looking at its failed state).
    fn queue_alert(&mut self) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut state)) = state {
            let _ = encode_into(
                &mut self.bufs.outgoing,
                |buf| state.encode(buf),
                |e| match e {
                    EncodeError::InsufficientSize(s) => Some(s.required_size),
                    _ => None,
                },
            );
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Sends the outgoing records; frees their buffer once the socket took them all.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let bufs = &mut self.bufs;
        while bufs.out_pos < bufs.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bufs.outgoing[bufs.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            bufs.out_pos += n;
        }
        if bufs.outgoing.capacity() > 0 {
            bufs.outgoing = Vec::new();
            bufs.out_pos = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Sends what is queued if the socket takes it now; an error is returned, waiting is
    /// not (the waker is registered, so the task comes back).
    fn send_now(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.poll_send(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Reads ciphertext from the socket into `scratch`: the number of bytes, 0 at its end.
    fn poll_read_tls(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::new(scratch);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(buf.filled().len()))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(e) = self.feed(&mut [], None, Action::None) {
                let _ = self.send_now(cx);
                return Poll::Ready(Err(e));
            }
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; SCRATCH];
            let n = ready!(self.poll_read_tls(cx, &mut scratch))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                )));
            }
            if let Err(e) = self.feed(&mut scratch[..n], None, Action::None) {
                let _ = self.send_now(cx);
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl Buffers {
    /// Hands `payload` to `out` as far as it has room; keeps the rest.
    fn deliver(&mut self, payload: &[u8], out: &mut Option<&mut ReadBuf<'_>>) {
        let mut rest = payload;
        if self.plain.is_empty() {
            if let Some(out) = out.as_deref_mut() {
                let n = out.remaining().min(rest.len());
                out.put_slice(&rest[..n]);
                rest = &rest[n..];
            }
        }
        self.plain.extend_from_slice(rest);
    }

    /// Moves kept plaintext into `out`; whether there was any.
    fn take_plain(&mut self, out: &mut ReadBuf<'_>) -> bool {
        if self.plain_pos >= self.plain.len() {
            return false;
        }
        let n = out.remaining().min(self.plain.len() - self.plain_pos);
        out.put_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        true
    }
}

/// Encodes with `f` at the end of `outgoing`, growing it to what `f` says it needs when the
/// first guess (the spare capacity) is too small.
fn encode_into<E: std::fmt::Display>(
    outgoing: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> io::Result<()> {
    let start = outgoing.len();
    outgoing.resize(outgoing.capacity().max(start), 0);
    let written = match f(&mut outgoing[start..]) {
        Ok(n) => n,
        Err(e) => match required(&e) {
            Some(size) => {
                outgoing.resize(start + size, 0);
                match f(&mut outgoing[start..]) {
                    Ok(n) => n,
                    Err(e) => {
                        outgoing.truncate(start);
                        return Err(io::Error::other(e.to_string()));
                    }
                }
            }
            None => {
                outgoing.truncate(start);
                return Err(io::Error::other(e.to_string()));
            }
        },
    };
    outgoing.truncate(start + written);
    Ok(())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs rustls over `input` until it needs more ciphertext (or the connection closed):
/// handshake records to `bufs.outgoing` (sent by the caller; rustls is told they were),
/// plaintext to `out` or `bufs.plain`. Returns the bytes of `input` consumed and whether
/// `action` was done.
fn drive(
    conn: &mut UnbufferedClientConnection,
    input: &mut [u8],
    bufs: &mut Buffers,
    mut out: Option<&mut ReadBuf<'_>>,
    action: Action<'_>,
) -> io::Result<(usize, bool)> {
    let mut consumed = 0;
    loop {
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(&mut input[consumed..]);
        let mut finished = None;
        match state.map_err(tls_error)? {
            ConnectionState::ReadTraffic(mut state) => {
                while let Some(record) = state.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    bufs.deliver(record.payload, &mut out);
                }
            }
            ConnectionState::EncodeTlsData(mut state) => {
                encode_into(
                    &mut bufs.outgoing,
                    |buf| state.encode(buf),
                    |e| match e {
                        EncodeError::InsufficientSize(s) => Some(s.required_size),
                        EncodeError::AlreadyEncoded => None,
                    },
                )?;
            }
            // The records stay in `bufs.outgoing` until the socket takes them, in order.
            ConnectionState::TransmitTlsData(state) => state.done(),
            ConnectionState::BlockedHandshake => finished = Some(false),
            ConnectionState::PeerClosed => bufs.peer_closed = true,
            ConnectionState::Closed => {
                bufs.peer_closed = true;
                finished = Some(false);
            }
            ConnectionState::WriteTraffic(mut state) => {
                finished = Some(match action {
                    Action::None => false,
                    Action::Encrypt(data) => {
                        encrypt(&mut bufs.outgoing, data, |data, buf| {
                            state.encrypt(data, buf)
                        })?;
                        true
                    }
                    Action::CloseNotify => {
                        encode_into(
                            &mut bufs.outgoing,
                            |buf| state.queue_close_notify(buf),
                            insufficient,
                        )?;
                        true
                    }
                });
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected TLS state {other:?}"),
                ))
            }
        }
        consumed += discard;
        if let Some(done) = finished {
            return Ok((consumed, done));
        }
    }
}

fn insufficient(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        EncryptError::EncryptExhausted => None,
    }
}

/// Encrypts `data` at the end of `outgoing`, sized for its records up front.
fn encrypt(
    outgoing: &mut Vec<u8>,
    data: &[u8],
    mut f: impl FnMut(&[u8], &mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    let records = data.len().div_ceil(MAX_FRAGMENT).max(1);
    outgoing.reserve_exact(data.len() + records * RECORD_OVERHEAD);
    encode_into(outgoing, |buf| f(data, buf), insufficient)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Plaintext that arrived before an error is still delivered.
        if buf.remaining() == 0 || this.bufs.take_plain(buf) {
            return Poll::Ready(Ok(()));
        }
        this.check()?;
        // An answer rustls queued (a key update) goes out as soon as the socket takes it.
        this.send_now(cx)?;
        let before = buf.filled().len();
        loop {
            if this.bufs.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; SCRATCH];
            let n = ready!(this.poll_read_tls(cx, &mut scratch))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection without sending TLS close_notify",
                )));
            }
            let fed = this.feed(&mut scratch[..n], Some(buf), Action::None);
            let sent = this.send_now(cx);
            // What arrived before an error goes to the caller first; the error comes next.
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            fed?;
            sent?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_send(cx))?;
        let take = data.len().min(MAX_WRITE);
        if this.close_queued || !this.feed(&mut [], None, Action::Encrypt(&data[..take]))? {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection is closed",
            )));
        }
        this.send_now(cx)?;
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed.is_none() && !this.close_queued {
            this.close_queued = true;
            this.feed(&mut [], None, Action::CloseNotify)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
