//! Dispatcher and remover: route outbox messages to upstream links, delete them once sent.
//!
//! The dispatcher loads messages in outbox order. While it is "live" it takes the batches the
//! intake hands over in memory; when more is waiting than `max_memory_bytes` (an outage, a
//! restart with a full outbox) it discards hand-overs and reads the outbox from its cursor
//! instead, switching back to live once a scan reaches the end. Every hand-over is appended to
//! the outbox before it is sent, and sequence numbers only grow, so a scan sees everything a
//! discarded hand-over held, and a hand-over below the cursor was already loaded by a scan.
//!
//! In device mode each device gets its own link, opened on its first message; a device with no
//! link when `max_upstream_connections` are open (and none is idle to evict) is parked, its
//! messages kept in order until a slot frees. Links idle for `idle` are closed.
//!
//! The remover deletes acknowledged messages from the outbox in batches (one group commit for
//! all that arrived meanwhile) and only then frees their links' window slots.
//!
//! The dispatcher opens links through an [`Upstream`] and drives them through [`UpstreamLink`]:
//! in the gateway that is [`MqttUpstream`] and its MQTT [`Link`]s; the tests put in-memory links
//! there, so routing, the connection cap and the memory window are checked without a network.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::directory::device_target;
use super::https_link::{HttpsLink, HttpsSettings};
use super::link::{Item, Link, LinkConfig, MqttTarget, Settle, Settled, CONNECTS_AT_ONCE};
use super::topic::CommandFilter;
use super::{MqttVersion, Shared, TelemetryError};
use crate::clock;
use crate::cloud::UpstreamTransport;
use crate::device_id::DeviceId;
use crate::identity::Sealer;
use crate::mqtt::props::MessageProperties;
use crate::store::OutboxMessage;

/// What the intake hands over, in outbox order.
pub(crate) enum Handoff {
    /// Messages just inserted into the outbox (their flush may still be running), with their
    /// sequence numbers, thing names and when the gateway got them.
    Appended(Vec<(u64, OutboxMessage, Arc<str>, Instant)>),
    /// Sequence numbers deleted by `drop-oldest`.
    Dropped(Vec<u64>),
    /// Close the device's link: its certificate was replaced (admin reprovision).
    Close(DeviceId),
}

/// Messages read from the outbox per scan.
const SCAN_PAGE: usize = 512;
/// Housekeeping period (idle links, expiry, parked devices, missed wake-ups).
const TICK: Duration = Duration::from_secs(1);
/// A device whose credentials could not be loaded is tried again after this.
const CREDENTIALS_RETRY: Duration = Duration::from_secs(30);
/// How long closing one link may take.
const LINK_STOP: Duration = Duration::from_secs(2);

/// What the dispatcher does with an open link.
pub(crate) trait UpstreamLink: Send + 'static {
    /// Client id (thing name) for logs.
    fn client_id(&self) -> &str;
    /// Queues messages (in order) for sending.
    fn enqueue(&self, items: impl IntoIterator<Item = Item>);
    /// Adds a thing whose commands this link should receive.
    fn add_command_thing(&self, thing: &str, device: &DeviceId, filter: &CommandFilter);
    /// Nothing queued, in flight or settling.
    fn is_empty(&self) -> bool;
    /// When the link last had traffic.
    fn last_activity(&self) -> Option<Instant>;
    /// Drops queued (not yet sent) messages for which `drop` says yes; returns them.
    fn remove_queued(&self, drop: impl FnMut(&Item) -> bool) -> Vec<Item>;
    /// Closes the link, waiting at most `within`; returns what was still queued.
    fn stop(self, within: Duration) -> impl Future<Output = Vec<Item>> + Send + 'static;
}

/// How the dispatcher opens links.
pub(crate) trait Upstream: Send + 'static {
    type Link: UpstreamLink;
    /// The gateway identity's one link (opened at start), or `None` in device mode.
    fn open_gateway(&mut self, cfg: &LinkConfig) -> Option<Self::Link>;
    /// A link under `device`'s own identity, with its thing name; an error when its
    /// credentials cannot be loaded.
    fn open_device(
        &mut self,
        device: &DeviceId,
        cfg: &LinkConfig,
    ) -> Result<(String, Self::Link), TelemetryError>;
}

/// An open link: MQTT, or HTTPS to IoT Hub.
pub(crate) enum AnyLink {
    Mqtt(Link),
    Https(HttpsLink),
}

impl UpstreamLink for AnyLink {
    fn client_id(&self) -> &str {
        match self {
            AnyLink::Mqtt(l) => &l.shared.client_id,
            AnyLink::Https(l) => &l.shared.client_id,
        }
    }

    fn enqueue(&self, items: impl IntoIterator<Item = Item>) {
        match self {
            AnyLink::Mqtt(l) => l.shared.enqueue(items),
            AnyLink::Https(l) => l.shared.enqueue(items),
        }
    }

    fn add_command_thing(&self, thing: &str, device: &DeviceId, filter: &CommandFilter) {
        match self {
            AnyLink::Mqtt(l) => l.shared.add_command_thing(thing, device, filter),
            // Cloud-to-device messages come over MQTT only (see the README's Azure section).
            AnyLink::Https(_) => {}
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            AnyLink::Mqtt(l) => l.shared.is_empty(),
            AnyLink::Https(l) => l.shared.is_empty(),
        }
    }

    fn last_activity(&self) -> Option<Instant> {
        match self {
            AnyLink::Mqtt(l) => l.shared.last_activity(),
            AnyLink::Https(l) => l.shared.last_activity(),
        }
    }

    fn remove_queued(&self, drop: impl FnMut(&Item) -> bool) -> Vec<Item> {
        match self {
            AnyLink::Mqtt(l) => l.shared.remove_queued(drop),
            AnyLink::Https(l) => l.shared.remove_queued(drop),
        }
    }

    async fn stop(self, within: Duration) -> Vec<Item> {
        match self {
            AnyLink::Mqtt(l) => l.stop(within).await,
            AnyLink::Https(l) => l.stop(within).await,
        }
    }
}

/// The gateway's links: MQTT connections to the cloud, with the gateway's certificate or
/// each device's own (from the store).
pub(crate) struct MqttUpstream {
    shared: Arc<Shared>,
    sealer: Option<Arc<Sealer>>,
    gateway_tls: Option<(String, Arc<rustls::ClientConfig>)>,
    settled: mpsc::UnboundedSender<Settled>,
    shutdown: watch::Receiver<bool>,
}

impl MqttUpstream {
    fn start(&self, target: MqttTarget, cfg: &LinkConfig) -> Link {
        Link::start(
            target,
            cfg,
            self.shared.counters.clone(),
            self.settled.clone(),
            self.shared.downstream.clone(),
            self.shutdown.clone(),
        )
    }
}

impl Upstream for MqttUpstream {
    type Link = AnyLink;

    fn open_gateway(&mut self, cfg: &LinkConfig) -> Option<AnyLink> {
        let (client_id, tls) = self.gateway_tls.take()?;
        let endpoint = &self.shared.opts.endpoint;
        let target = MqttTarget {
            client_id,
            address: (endpoint.host.clone(), endpoint.port),
            tls,
            username: None,
            password: None,
        };
        Some(AnyLink::Mqtt(self.start(target, cfg)))
    }

    fn open_device(
        &mut self,
        device: &DeviceId,
        cfg: &LinkConfig,
    ) -> Result<(String, AnyLink), TelemetryError> {
        let target = device_target(
            &self.shared.store,
            self.sealer.as_deref(),
            self.shared.opts.upstreams.as_ref(),
            device,
        )?;
        let cloud_id = target.cloud_id.clone();
        if target.transport == UpstreamTransport::Https {
            let o = &self.shared.opts;
            let link = HttpsLink::start(
                target,
                &HttpsSettings {
                    window: cfg.window,
                    request_timeout: o.connect_timeout,
                    reconnect_min: o.reconnect_min,
                    reconnect_max: o.reconnect_max,
                },
                self.shared.counters.clone(),
                self.settled.clone(),
                self.shutdown.clone(),
            );
            return Ok((cloud_id, AnyLink::Https(link)));
        }
        let link = self.start(
            MqttTarget {
                client_id: target.client_id,
                address: target.address,
                tls: target.tls,
                username: target.username,
                password: target.password,
            },
            cfg,
        );
        Ok((cloud_id, AnyLink::Mqtt(link)))
    }
}

struct Parked {
    items: VecDeque<Item>,
    retry_at: Option<Instant>,
}

pub(crate) struct Dispatcher<U: Upstream = MqttUpstream> {
    shared: Arc<Shared>,
    upstream: U,
    handoff: Option<mpsc::Receiver<Handoff>>,
    settled: mpsc::UnboundedSender<Settled>,
    shutdown: watch::Receiver<bool>,
    link_cfg: LinkConfig,
    /// Device mode: one link per device.
    links: HashMap<DeviceId, U::Link>,
    /// Gateway mode: the one link, and the devices whose commands it subscribes to.
    gateway: Option<U::Link>,
    gateway_things: HashSet<DeviceId>,
    parked: HashMap<DeviceId, Parked>,
    parked_order: VecDeque<DeviceId>,
    things: HashMap<DeviceId, Arc<str>>,
    live: bool,
    cursor: u64,
    last_scan_error: Option<Instant>,
}

impl Dispatcher<MqttUpstream> {
    pub fn new(
        shared: Arc<Shared>,
        sealer: Option<Arc<Sealer>>,
        gateway_tls: Option<(String, Arc<rustls::ClientConfig>)>,
        handoff: mpsc::Receiver<Handoff>,
        settled: mpsc::UnboundedSender<Settled>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let upstream = MqttUpstream {
            shared: shared.clone(),
            sealer,
            gateway_tls,
            settled: settled.clone(),
            shutdown: shutdown.clone(),
        };
        Self::with_upstream(shared, upstream, handoff, settled, shutdown)
    }
}

impl<U: Upstream> Dispatcher<U> {
    /// A dispatcher opening its links through `upstream`.
    pub fn with_upstream(
        shared: Arc<Shared>,
        mut upstream: U,
        handoff: mpsc::Receiver<Handoff>,
        settled: mpsc::UnboundedSender<Settled>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let o = &shared.opts;
        let link_cfg = LinkConfig {
            window: o.inflight,
            keep_alive: o.keep_alive,
            connect_timeout: o.connect_timeout,
            reconnect_min: o.reconnect_min,
            reconnect_max: o.reconnect_max,
            // Topic, header and length bytes on top of the payload.
            max_packet_bytes: o.max_payload_bytes + 64 * 1024,
            commands: o.commands.clone(),
            command_timeout: o.command_timeout,
            version: o.mqtt_version,
            connect_attempts: Arc::new(tokio::sync::Semaphore::new(CONNECTS_AT_ONCE)),
        };
        let gateway = upstream.open_gateway(&LinkConfig {
            window: o.gateway_inflight,
            ..link_cfg.clone()
        });
        Self {
            shared,
            upstream,
            handoff: Some(handoff),
            settled,
            shutdown,
            link_cfg,
            links: HashMap::new(),
            gateway,
            gateway_things: HashSet::new(),
            parked: HashMap::new(),
            parked_order: VecDeque::new(),
            things: HashMap::new(),
            live: false,
            cursor: 0,
            last_scan_error: None,
        }
    }

    pub async fn run(mut self) {
        if self.gateway.is_some() {
            self.shared.counters.open_links.store(1, Ordering::Relaxed);
        }
        let backlog = self.shared.store.outbox_len();
        if backlog > 0 {
            tracing::info!(
                messages = backlog,
                bytes = self.shared.store.outbox_bytes(),
                "telemetry outbox holds messages from before; sending them first"
            );
        }
        self.load_backlog();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                _ = super::stopped(&mut shutdown) => break,
                h = recv(&mut self.handoff) => match h {
                    Some(h) => self.on_handoff(h),
                    None => self.handoff = None,
                },
                _ = self.shared.freed.notified() => {
                    // A link may have become idle: give the longest-waiting parked device a
                    // chance now rather than at the next tick (the full pass runs there).
                    if let Some(d) = self.parked_order.front().cloned() {
                        if self.try_unpark(&d) {
                            self.parked_order.pop_front();
                        }
                    }
                    if !self.live {
                        self.load_backlog();
                    }
                }
                _ = tick.tick() => self.housekeeping().await,
            }
        }
        self.stop_all().await;
        tracing::debug!("telemetry dispatcher stopped");
    }

    fn on_handoff(&mut self, h: Handoff) {
        match h {
            Handoff::Appended(items) => {
                if !self.live {
                    // On disk already; the scan from the cursor will load them.
                    return;
                }
                for (seq, msg, thing, accepted) in items {
                    if seq < self.cursor {
                        continue;
                    }
                    if self.memory() >= self.shared.opts.max_memory_bytes {
                        self.live = false;
                        tracing::debug!(
                            cursor = self.cursor,
                            "telemetry backlog exceeds memory; reading the outbox instead"
                        );
                        return;
                    }
                    self.cursor = seq + 1;
                    self.things.insert(msg.device.clone(), thing.clone());
                    self.route(seq, msg, &thing, Some(accepted));
                }
            }
            Handoff::Dropped(seqs) => self.forget(&seqs.into_iter().collect()),
            Handoff::Close(device) => self.close_device(&device),
        }
    }

    /// Stops the device's link; its unsent messages wait (parked) for the next link, which
    /// loads the device's credentials afresh. Messages already sent on the old link and not
    /// yet acknowledged stay in the outbox and go again after the next start.
    fn close_device(&mut self, device: &DeviceId) {
        let Some(link) = self.links.remove(device) else {
            return;
        };
        let queued = link.remove_queued(|_| true);
        self.stop_in_background(link);
        tracing::info!(%device, unsent = queued.len(), "telemetry: upstream link closed (certificate replaced)");
        if queued.is_empty() {
            return;
        }
        if !self.parked.contains_key(device) {
            self.parked_order.push_back(device.clone());
        }
        self.parked
            .entry(device.clone())
            .or_insert_with(|| Parked {
                items: VecDeque::new(),
                retry_at: None,
            })
            .items
            .extend(queued);
    }

    fn memory(&self) -> usize {
        self.shared.counters.memory_bytes.load(Ordering::Relaxed)
    }

    fn release(&self, mem: usize) {
        self.shared
            .counters
            .memory_bytes
            .fetch_sub(mem, Ordering::Relaxed);
    }

    /// Reads the outbox from the cursor while memory allows; live again at its end.
    fn load_backlog(&mut self) {
        while self.memory() < self.shared.opts.max_memory_bytes {
            let page = match self.shared.store.outbox_scan(self.cursor, SCAN_PAGE) {
                Ok(page) => page,
                Err(e) => {
                    // Retried on the next tick; logged at most every 10 s.
                    let now = Instant::now();
                    if self
                        .last_scan_error
                        .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
                    {
                        self.last_scan_error = Some(now);
                        tracing::error!(cursor = self.cursor, "reading the telemetry outbox: {e}");
                    }
                    return;
                }
            };
            let complete = page.len() < SCAN_PAGE;
            for (seq, msg) in page {
                self.cursor = seq + 1;
                match self.thing_name(&msg.device) {
                    Some(thing) => self.route(seq, msg, &thing, None),
                    None => self.undeliverable(seq, &msg.device),
                }
            }
            if complete {
                self.live = true;
                return;
            }
        }
    }

    /// The device's thing name (cached); `None` when its record or thing name is gone.
    fn thing_name(&mut self, device: &DeviceId) -> Option<Arc<str>> {
        if let Some(t) = self.things.get(device) {
            return Some(t.clone());
        }
        let rec = self.shared.store.device(device).ok().flatten()?;
        let thing: Arc<str> = Arc::from(rec.provision.thing_name?.as_str());
        self.things.insert(device.clone(), thing.clone());
        Some(thing)
    }

    fn undeliverable(&self, seq: u64, device: &DeviceId) {
        self.shared
            .counters
            .undeliverable
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%device, seq, "telemetry message dropped: the device's record or thing name is gone");
        let _ = self.settled.send(Settled {
            seq,
            mem: 0,
            link: None,
        });
    }

    fn is_expired(&self, enqueued_at_ms: u64, now: u64) -> bool {
        now.saturating_sub(enqueued_at_ms) > self.shared.opts.max_age.as_millis() as u64
    }

    fn expire(&self, seq: u64) {
        self.shared.counters.expired.fetch_add(1, Ordering::Relaxed);
        let _ = self.settled.send(Settled {
            seq,
            mem: 0,
            link: None,
        });
    }

    fn route(&mut self, seq: u64, msg: OutboxMessage, thing: &str, accepted: Option<Instant>) {
        if self.is_expired(msg.enqueued_at_ms, clock::unix_ms()) {
            self.expire(seq);
            return;
        }
        let topic = self.shared.opts.topic.render_with(
            thing,
            msg.device.as_str(),
            &msg.topic,
            &msg.properties,
        );
        // MQTT 5 links carry the properties in the PUBLISH; 3.1.1 links have them in the
        // topic (IoT Hub) or cannot carry them.
        let properties = match self.shared.opts.mqtt_version {
            MqttVersion::V5 => MessageProperties::from_stored(&msg.properties),
            MqttVersion::V4 => None,
        };
        let item = Item::new(
            seq,
            msg.device,
            topic,
            Bytes::from(msg.payload),
            msg.enqueued_at_ms,
        )
        .with_properties(properties)
        .accepted_at(accepted);
        self.shared
            .counters
            .memory_bytes
            .fetch_add(item.mem_size(), Ordering::Relaxed);
        if let Some(gw) = &self.gateway {
            if let Some(filter) = &self.link_cfg.commands {
                if self.gateway_things.insert(item.device.clone()) {
                    gw.add_command_thing(thing, &item.device, filter);
                }
            }
            gw.enqueue([item]);
            return;
        }
        if let Some(link) = self.links.get(&item.device) {
            link.enqueue([item]);
            return;
        }
        let device = item.device.clone();
        if let Some(p) = self.parked.get_mut(&device) {
            p.items.push_back(item);
            return;
        }
        self.parked.insert(
            device.clone(),
            Parked {
                items: VecDeque::from([item]),
                retry_at: None,
            },
        );
        self.parked_order.push_back(device.clone());
        self.try_unpark(&device);
    }

    /// Opens a link for a parked device if a slot is free (evicting an idle link if needed)
    /// and its credentials load; true if the device is no longer parked.
    fn try_unpark(&mut self, device: &DeviceId) -> bool {
        let now = Instant::now();
        match self.parked.get(device) {
            None => return true,
            Some(p) if p.retry_at.is_some_and(|t| t > now) => return false,
            Some(_) => {}
        }
        if self.links.len() >= self.shared.opts.max_upstream_connections && !self.evict_idle() {
            return false;
        }
        let (thing, link) = match self.upstream.open_device(device, &self.link_cfg) {
            Ok(v) => v,
            Err(e) => {
                let gone = matches!(self.shared.store.device(device), Ok(None));
                if gone {
                    if let Some(p) = self.parked.remove(device) {
                        for item in p.items {
                            self.release(item.mem_size());
                            self.undeliverable(item.seq, device);
                        }
                    }
                } else if let Some(p) = self.parked.get_mut(device) {
                    tracing::error!(
                        "{e}; retrying in {CREDENTIALS_RETRY:?}, its messages stay in the outbox"
                    );
                    p.retry_at = Some(now + CREDENTIALS_RETRY);
                    return false;
                }
                return true;
            }
        };
        if let Some(filter) = &self.link_cfg.commands {
            link.add_command_thing(&thing, device, filter);
        }
        if let Some(p) = self.parked.remove(device) {
            link.enqueue(p.items);
        }
        self.links.insert(device.clone(), link);
        self.shared
            .counters
            .open_links
            .store(self.links.len(), Ordering::Relaxed);
        true
    }

    /// Closes the least recently used link that has nothing queued or in flight.
    fn evict_idle(&mut self) -> bool {
        let victim = self
            .links
            .iter()
            .filter(|(_, l)| l.is_empty())
            .min_by_key(|(_, l)| l.last_activity())
            .map(|(d, _)| d.clone());
        match victim.and_then(|d| self.links.remove(&d)) {
            Some(link) => {
                tracing::debug!(client_id = %link.client_id(), "closing the least recently used idle upstream connection");
                self.stop_in_background(link);
                true
            }
            None => false,
        }
    }

    fn stop_in_background(&self, link: U::Link) {
        let counters = self.shared.counters.clone();
        counters
            .open_links
            .store(self.links.len(), Ordering::Relaxed);
        tokio::spawn(async move {
            // Only empty links are closed while running; anything left is still in the outbox.
            let left = link.stop(LINK_STOP).await;
            let mem: usize = left.iter().map(Item::mem_size).sum();
            counters.memory_bytes.fetch_sub(mem, Ordering::Relaxed);
        });
    }

    /// Forgets queued (unsent) messages deleted by drop-oldest.
    fn forget(&mut self, seqs: &HashSet<u64>) {
        let mut mem = 0;
        let links = self.links.values().chain(self.gateway.as_ref());
        for link in links {
            for item in link.remove_queued(|i| seqs.contains(&i.seq)) {
                mem += item.mem_size();
            }
        }
        for p in self.parked.values_mut() {
            p.items.retain(|i| {
                let drop = seqs.contains(&i.seq);
                if drop {
                    mem += i.mem_size();
                }
                !drop
            });
        }
        self.release(mem);
        self.shared.freed.notify_one();
    }

    async fn housekeeping(&mut self) {
        let now = Instant::now();
        let now_ms = clock::unix_ms();
        // Idle device links.
        let idle = self.shared.opts.idle;
        let idle_links: Vec<DeviceId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.is_empty()
                    && l.last_activity()
                        .is_none_or(|t| now.duration_since(t) >= idle)
            })
            .map(|(d, _)| d.clone())
            .collect();
        for d in idle_links {
            if let Some(link) = self.links.remove(&d) {
                tracing::debug!(client_id = %link.client_id(), "closing idle upstream connection");
                self.stop_in_background(link);
            }
        }
        // Expired messages that have not been sent.
        let max_age_ms = self.shared.opts.max_age.as_millis() as u64;
        let expired = |i: &Item| now_ms.saturating_sub(i.enqueued_at_ms) > max_age_ms;
        let mut gone = Vec::new();
        for link in self.links.values().chain(self.gateway.as_ref()) {
            gone.extend(link.remove_queued(expired));
        }
        for p in self.parked.values_mut() {
            while p.items.front().is_some_and(expired) {
                gone.extend(p.items.pop_front());
            }
        }
        if !gone.is_empty() {
            tracing::warn!(
                messages = gone.len(),
                "telemetry older than max_age dropped unsent"
            );
            for item in gone {
                self.release(item.mem_size());
                self.expire(item.seq);
            }
            self.shared.freed.notify_one();
        }
        // Parked devices, oldest first.
        self.parked.retain(|_, p| !p.items.is_empty());
        let mut still = VecDeque::new();
        while let Some(d) = self.parked_order.pop_front() {
            if !self.parked.contains_key(&d) {
                continue;
            }
            if !self.try_unpark(&d) {
                still.push_back(d);
            }
        }
        self.parked_order = still;
        self.shared
            .counters
            .parked_devices
            .store(self.parked.len(), Ordering::Relaxed);
        if !self.live {
            self.load_backlog();
        }
    }

    async fn stop_all(&mut self) {
        let mut tasks = tokio::task::JoinSet::new();
        for (_, link) in self.links.drain() {
            tasks.spawn(link.stop(LINK_STOP));
        }
        if let Some(gw) = self.gateway.take() {
            tasks.spawn(gw.stop(LINK_STOP));
        }
        while tasks.join_next().await.is_some() {}
        self.shared.counters.open_links.store(0, Ordering::Relaxed);
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<Handoff>>) -> Option<Handoff> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Deletes acknowledged (or expired, or undeliverable) messages from the outbox in batches and
/// then frees their links' window slots. Ends when every sender is gone.
///
/// Each message's sequence number goes to `finished` (the intake's acknowledgements) as soon
/// as it arrives, also while the deletion of the batch before it waits for its flush: the
/// device need not wait for the disk once the cloud has its message (see `ack.rs`).
pub(crate) async fn remover(
    shared: Arc<Shared>,
    mut settled: mpsc::UnboundedReceiver<Settled>,
    finished: mpsc::UnboundedSender<Vec<u64>>,
) {
    const MAX_BATCH: usize = 8192;
    // Arrived while the previous deletion was flushing, and reported already.
    let mut next: Vec<Settled> = Vec::with_capacity(256);
    let mut batch: Vec<Settled> = Vec::with_capacity(256);
    let mut seqs: Vec<u64> = Vec::with_capacity(256);
    let mut open = true;
    loop {
        std::mem::swap(&mut batch, &mut next);
        let reported = batch.len();
        if batch.is_empty() {
            match settled.recv().await {
                Some(s) => batch.push(s),
                None => break,
            }
        }
        take_ready(&mut settled, &mut batch, MAX_BATCH);
        report(&finished, &batch[reported..]);
        seqs.extend(batch.iter().map(|s| s.seq));
        let removed = {
            let removal = shared.store.outbox_remove(&seqs);
            tokio::pin!(removal);
            loop {
                tokio::select! {
                    biased;
                    r = &mut removal => break r,
                    s = settled.recv(), if open && next.len() < MAX_BATCH => match s {
                        Some(s) => {
                            let from = next.len();
                            next.push(s);
                            take_ready(&mut settled, &mut next, MAX_BATCH);
                            report(&finished, &next[from..]);
                        }
                        None => open = false,
                    },
                }
            }
        };
        if let Err(e) = removed {
            // They stay in the outbox and are sent once more after a restart: a duplicate,
            // never a loss.
            tracing::error!(
                messages = seqs.len(),
                "deleting sent telemetry from the outbox: {e}"
            );
        }
        seqs.clear();
        let mut forwarded = 0u64;
        let mut mem = 0usize;
        // Consecutive messages of one link are settled with one lock.
        let mut run: Option<(Arc<dyn Settle>, usize)> = None;
        for s in batch.drain(..) {
            mem += s.mem;
            let Some(link) = s.link else { continue };
            forwarded += 1;
            match &mut run {
                Some((l, n)) if std::ptr::addr_eq(Arc::as_ptr(l), Arc::as_ptr(&link)) => *n += 1,
                _ => {
                    if let Some((l, n)) = run.replace((link, 1)) {
                        l.settle(n);
                    }
                }
            }
        }
        if let Some((l, n)) = run {
            l.settle(n);
        }
        let c = &shared.counters;
        c.forwarded.fetch_add(forwarded, Ordering::Relaxed);
        c.remove_batches.fetch_add(1, Ordering::Relaxed);
        c.memory_bytes.fetch_sub(mem, Ordering::Relaxed);
        shared.freed.notify_one();
        shared.room.notify_waiters();
    }
    tracing::debug!("telemetry remover stopped");
}

/// Moves what is already in `settled` into `batch`, up to `max` in all.
fn take_ready(
    settled: &mut mpsc::UnboundedReceiver<Settled>,
    batch: &mut Vec<Settled>,
    max: usize,
) {
    while batch.len() < max {
        match settled.try_recv() {
            Ok(s) => batch.push(s),
            Err(_) => break,
        }
    }
}

/// Tells the intake's acknowledgements that these messages are finished upstream.
fn report(finished: &mpsc::UnboundedSender<Vec<u64>>, settled: &[Settled]) {
    if !settled.is_empty() {
        // The intake's acknowledgements stop only when the intake does.
        let _ = finished.send(settled.iter().map(|s| s.seq).collect());
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
