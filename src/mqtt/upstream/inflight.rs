//! Packet ids and the messages waiting for their PUBACK on one connection.
//!
//! The window of a telemetry link is small (10 by default, a few hundred for the gateway's
//! link), so a map sized by what is in flight replaces rumqttc's bitset of 65,536 ids. Ids are
//! handed out in turn, skipping those still in flight or taken by a SUBSCRIBE awaiting its
//! SUBACK (one id space for both, MQTT-2.2.1-3).

use std::collections::HashMap;

use super::UpstreamError;

/// Messages in flight on one connection, keyed by packet id, with their send order.
#[derive(Debug)]
pub struct Inflight<T> {
    entries: HashMap<u16, (u64, T)>,
    subscribes: Vec<u16>,
    last_pkid: u16,
    next_order: u64,
}

impl<T> Default for Inflight<T> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            subscribes: Vec::new(),
            last_pkid: 0,
            next_order: 0,
        }
    }
}

impl<T> Inflight<T> {
    /// Messages in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The packet id the next message gets (`None` when all are taken); it is taken by
    /// [`Inflight::insert`].
    pub fn next_free(&mut self) -> Option<u16> {
        if self.entries.len() + self.subscribes.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            let id = self.last_pkid;
            if id != 0 && !self.entries.contains_key(&id) && !self.subscribes.contains(&id) {
                return Some(id);
            }
        }
    }

    /// Takes `item` in flight under `pkid` (from [`Inflight::next_free`]).
    pub fn insert(&mut self, pkid: u16, item: T) {
        self.entries.insert(pkid, (self.next_order, item));
        self.next_order += 1;
    }

    /// Whether `pkid` is in flight.
    pub fn contains(&self, pkid: u16) -> bool {
        self.entries.contains_key(&pkid)
    }

    /// The message `pkid` was acknowledged. A PUBACK for an id not in flight (never sent, or
    /// acknowledged already) is the server breaking the protocol: the connection must end.
    pub fn ack(&mut self, pkid: u16) -> Result<T, UpstreamError> {
        self.entries
            .remove(&pkid)
            .map(|(_, item)| item)
            .ok_or_else(|| {
                UpstreamError::Protocol(format!(
                    "PUBACK for packet id {pkid}, which is not in flight"
                ))
            })
    }

    /// A packet id for a SUBSCRIBE, held until [`Inflight::suback`].
    pub fn subscribe_id(&mut self) -> Option<u16> {
        let id = self.next_free()?;
        self.subscribes.push(id);
        Some(id)
    }

    /// The SUBACK of `pkid` arrived; an error when no SUBSCRIBE of ours has that id.
    pub fn suback(&mut self, pkid: u16) -> Result<(), UpstreamError> {
        let before = self.subscribes.len();
        self.subscribes.retain(|id| *id != pkid);
        if self.subscribes.len() == before {
            return Err(UpstreamError::Protocol(format!(
                "SUBACK for packet id {pkid}, which no SUBSCRIBE of ours used"
            )));
        }
        Ok(())
    }

    /// Everything in flight, in the order it was sent; ids start over (a new connection).
    pub fn drain_in_order(&mut self) -> Vec<T> {
        let mut all: Vec<(u64, T)> = self.entries.drain().map(|(_, e)| e).collect();
        all.sort_by_key(|(order, _)| *order);
        self.subscribes.clear();
        self.entries.shrink_to(16);
        all.into_iter().map(|(_, item)| item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_skip_those_in_flight_and_wrap() {
        let mut w = Inflight {
            last_pkid: u16::MAX - 1,
            ..Inflight::default()
        };
        let a = w.next_free().unwrap();
        w.insert(a, "a");
        assert_eq!(a, u16::MAX);
        let s = w.subscribe_id().unwrap();
        assert_eq!(s, 1, "0 is never an id");
        let b = w.next_free().unwrap();
        assert_eq!(b, 2);
        w.insert(b, "b");
        w.last_pkid = u16::MAX - 1;
        let c = w.next_free().unwrap();
        assert_eq!(c, 3, "ids in use are skipped");
        w.insert(c, "c");
        assert!(w.contains(a));
        assert_eq!(w.ack(a).unwrap(), "a");
        assert!(w.ack(a).is_err(), "a second PUBACK is a protocol error");
        w.suback(s).unwrap();
        assert!(w.suback(s).is_err());
        assert_eq!(w.drain_in_order(), vec!["b", "c"]);
        assert!(w.is_empty());
    }
}
