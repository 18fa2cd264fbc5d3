//! The places where fleetgw reaches into rumqttc's `EventLoop` past its documented use (poll
//! it, send requests through the `AsyncClient`), fenced in one module.
//!
//! The downstream session (`downstream::session`), the gateway's rumqttc client of an
//! external broker, leans on the event loop's public fields: it writes its PUBACKs straight
//! into the connection and settles the packets a lost connection leaves buffered. (The
//! upstream telemetry links, which needed more of this, now run on the gateway's own client,
//! `mqtt::upstream`.) Those fields
//! are public but their meaning is rumqttc's implementation, not its API, so every use goes
//! through a function here, each naming the assumption it rests on, and each assumption has a
//! test below that runs a real event loop against a peer on 127.0.0.1 speaking our own
//! [`wire`](super::wire) codec. They hold for rumqttc 0.25.1, pinned with `=` in Cargo.toml:
//! a new version has to pass these tests before the pin moves.

use std::time::Duration;

use rumqttc::{Event, EventLoop, Packet, Request, StateError};
use tokio::time::timeout;

/// Why a direct write into the connection failed. Either way the connection is unusable: the
/// next poll reports its loss.
#[derive(Debug, thiserror::Error)]
pub enum DirectWriteError {
    /// The socket or the codec refused the packet.
    #[error("writing to the broker: {0}")]
    Write(#[from] StateError),
    /// The flush did not complete within the event loop's network timeout.
    #[error("flushing to the broker timed out after {0:?}")]
    FlushTimeout(Duration),
}

/// Sets how long one connection attempt (TCP, TLS and CONNACK) may take, in whole seconds
/// (at least 1). Assumption: rumqttc bounds each flush by the same timeout, which
/// [`DirectWriter::flush`] follows.
pub fn set_connect_timeout(eventloop: &mut EventLoop, within: Duration) {
    let mut network = eventloop.network_options();
    network.set_connection_timeout(within.as_secs().max(1));
    eventloop.set_network_options(network);
}

/// Turns Nagle's algorithm off for the connections the event loop opens.
pub fn set_tcp_nodelay(eventloop: &mut EventLoop) {
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
}

/// The event loop's network timeout (connect and flush).
pub fn network_timeout(eventloop: &EventLoop) -> Duration {
    Duration::from_secs(eventloop.network_options.connection_timeout())
}

/// Puts `request` ahead of everything the event loop is to send next.
///
/// Assumption: `EventLoop::pending` is served before the request channel and in order, so a
/// request pushed to its front right after a CONNACK is the first packet of the connection,
/// ahead of the last session's retransmissions and of anything queued through the client.
pub fn send_first(eventloop: &mut EventLoop, request: Request) {
    eventloop.pending.push_front(request);
}

/// Takes the events rumqttc has parsed or produced but not yet handed out.
///
/// Assumption: one network read parses a batch of packets (up to 10) into
/// `MqttState::events` and `poll` hands them out one per call; when the read that brought them
/// ends in an error, `poll` returns the error and leaves them there, to hand out after the
/// next CONNACK as if they came on the new connection.
pub fn take_buffered_events(eventloop: &mut EventLoop) -> Vec<Event> {
    eventloop.state.events.drain(..).collect()
}

/// After a connection loss: moves the requests still in the client's channel into the event
/// loop's pending list (behind the unacknowledged publishes of the lost connection).
///
/// Assumption: `EventLoop::clean` (which `poll` also runs when it returns an error) moves the
/// publishes in flight and every request of the channel into `pending`, in order, except
/// PUBACKs: their packet ids belong to the lost connection. A CONNACK without a session then
/// clears `pending`; one with a session sends it first.
pub fn move_requests_to_pending(eventloop: &mut EventLoop) {
    eventloop.clean();
}

/// Writes packets straight into the current connection, bypassing the request channel.
///
/// Assumption: `EventLoop::network` is the live connection between a CONNACK and the next
/// error (`None` otherwise), and a packet written into it and flushed reaches the broker as
/// is, without rumqttc's state noticing. So only packets that rumqttc's state does not track
/// belong here: PUBACK/PUBREC of inbound messages under manual acks, and PINGREQ (its PINGRESP
/// is taken like the answer to one of rumqttc's own keep-alive pings).
pub struct DirectWriter<'a> {
    eventloop: &'a mut EventLoop,
}

/// A writer into the connection, or `None` while the event loop is not connected.
pub fn direct_writer(eventloop: &mut EventLoop) -> Option<DirectWriter<'_>> {
    eventloop
        .network
        .is_some()
        .then_some(DirectWriter { eventloop })
}

impl DirectWriter<'_> {
    /// Encodes `packet` into the connection's write buffer.
    pub async fn write(&mut self, packet: Packet) -> Result<(), DirectWriteError> {
        match self.eventloop.network.as_mut() {
            Some(network) => Ok(network.write(packet).await?),
            None => Err(StateError::ConnectionAborted.into()),
        }
    }

    /// Sends what was written, within the event loop's network timeout.
    pub async fn flush(&mut self) -> Result<(), DirectWriteError> {
        let within = network_timeout(self.eventloop);
        let Some(network) = self.eventloop.network.as_mut() else {
            return Err(StateError::ConnectionAborted.into());
        };
        match timeout(within, network.flush()).await {
            Ok(flushed) => Ok(flushed?),
            Err(_) => Err(DirectWriteError::FlushTimeout(within)),
        }
    }
}

#[cfg(test)]
mod tests;
