//! The run of one simulated device: the fleet-wide start of the device tasks, the MQTT
//! options of a device, and the per-device loop on one connection, a small stage machine
//! (connecting, subscribing, waiting for the answer, publishing telemetry) that drives the
//! device's rumqttc event loop directly.
//!
//! A connection lost before the answer is re-established with jittered back-off
//! ([`Backoff`]), re-subscribed, and the request re-published; a request left unanswered for
//! `resend_after` is sent again; a transient rejection (429, 5xx) is retried. The answer is
//! verified before the device counts as provisioned. In the telemetry phase the
//! [`Publisher`] keeps track of which sequence numbers are queued, in flight, acknowledged or
//! to be published again after a reconnect.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::clock;
use crate::downstream::contract::{
    self, AcceptedResponse, PayloadFormat, RejectedResponse, StatusReport,
};
use crate::downstream::TopicPrefix;
use crate::identity::{self, IdentityError, PrivateKey, Secret};

use super::arrival;
use super::plan::{
    prepare_request, DevicePlan, FleetOptions, PreparedRequest, SimCloud, TelemetryPlan,
    MAX_OUTGOING_PACKET,
};
use super::report::{
    DeviceReport, DeviceTelemetry, FailureReason, Outcome, Provisioned, Stage, TelemetryDone,
};

/// Largest packet a simulated device accepts (certificate + private key answers are ~3 KiB;
/// RSA chains more).
const MAX_INCOMING_PACKET: usize = 256 * 1024;
/// MQTT keep-alive of a simulated device.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Longest a single TCP/TLS/MQTT connect may take before it counts as a failed attempt.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// First and largest pause between reconnect (or retry) attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a device waits for its DISCONNECT to be written when it is done.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What device tasks share.
pub(super) struct Fleet {
    pub(super) opts: FleetOptions,
    pub(super) prefix: TopicPrefix,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    /// `true` once devices may start their telemetry phase.
    pub(super) telemetry_gate: watch::Receiver<bool>,
}

/// Starts every device (paced by `rate`, at most `max_in_flight` between connect and answer)
/// and waits for all of them; each reports on `tx`.
pub(super) async fn start_devices(
    fleet: Arc<Fleet>,
    plans: Vec<DevicePlan>,
    tx: mpsc::UnboundedSender<DeviceReport>,
) {
    let in_flight = Arc::new(Semaphore::new(fleet.opts.max_in_flight));
    let rate = fleet.opts.rate;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (k, plan) in plans.into_iter().enumerate() {
        if rate > 0.0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
        }
        // The semaphore is never closed, so acquiring only fails if it were.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let fleet = fleet.clone();
        let tx = tx.clone();
        tasks.spawn(async move { run_device(&fleet, plan, permit, &tx).await });
        // Reap finished tasks as we go so a 100k-device run does not keep 100k join results.
        while tasks.try_join_next().is_some() {}
    }
    drop(tx);
    while tasks.join_next().await.is_some() {}
}

/// The topics of one device.
struct DeviceTopics {
    request: String,
    accepted: String,
    rejected: String,
    status: String,
    watch_status: bool,
}

impl DeviceTopics {
    fn new(prefix: &TopicPrefix, plan: &DevicePlan, watch_status: bool) -> Self {
        Self {
            request: prefix.provision_request(&plan.id, plan.format),
            accepted: prefix.accepted(&plan.id, plan.format),
            rejected: prefix.rejected(&plan.id, plan.format),
            status: prefix.status(&plan.id),
            watch_status,
        }
    }

    /// `{request}/+` covers `/accepted` and `/rejected` in one filter.
    fn filters(&self) -> Vec<SubscribeFilter> {
        let mut filters = vec![SubscribeFilter::new(
            format!("{}/+", self.request),
            QoS::AtLeastOnce,
        )];
        if self.watch_status {
            filters.push(SubscribeFilter::new(self.status.clone(), QoS::AtLeastOnce));
        }
        filters
    }
}

fn mqtt_options(fleet: &Fleet, plan: &DevicePlan) -> MqttOptions {
    let opts = &fleet.opts;
    let mut mqtt = MqttOptions::new(plan.id.as_str(), opts.host.clone(), opts.port);
    mqtt.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_inflight(opts.telemetry.as_ref().map_or(4, |t| t.window.max(4)))
        .set_request_channel_capacity(channel_capacity(fleet));
    if let Some(username) = &opts.username {
        let password = opts
            .password
            .as_ref()
            .and_then(Secret::expose_str)
            .map(|p| p.replace("{id}", plan.id.as_str()))
            .unwrap_or_default();
        mqtt.set_credentials(username.replace("{id}", plan.id.as_str()), password);
    }
    if let Some(tls) = &fleet.tls {
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    mqtt
}

/// One device, start to finish: provisioning (reported as soon as it ends, and the
/// in-flight slot freed), then the telemetry phase when the plan asks for it.
async fn run_device(
    fleet: &Fleet,
    plan: DevicePlan,
    permit: OwnedSemaphorePermit,
    tx: &mpsc::UnboundedSender<DeviceReport>,
) {
    let started = Instant::now();
    let deadline = started + fleet.opts.timeout;
    let mut device = DeviceRun {
        started,
        deadline,
        timeout: fleet.opts.timeout,
        resend_after: fleet.opts.resend_after,
        stage: Stage::Connecting,
        connect: None,
        first_request: None,
        last_request: None,
        last_status: None,
        last_error: None,
        reconnects: 0,
        resent: 0,
        backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_MAX),
    };
    // Key generation and signing are CPU work of a few hundred microseconds: fine on the task.
    let request = match prepare_request(&fleet.opts, &plan) {
        Ok(request) => request,
        Err(e) => {
            let reason = FailureReason::Prepare(e.to_string());
            drop(permit);
            // The receiver only goes away when the run itself was dropped.
            let _ = tx.send(DeviceReport::Provisioning(Outcome {
                plan,
                result: Err(reason),
                connect: None,
                reconnects: 0,
                resent: 0,
            }));
            return;
        }
    };
    let (client, mut eventloop) =
        AsyncClient::new(mqtt_options(fleet, &plan), channel_capacity(fleet));
    eventloop
        .network_options
        .set_connection_timeout(CONNECT_TIMEOUT_SECS);
    // Small requests and answers: no Nagle delay on either.
    eventloop.network_options.set_tcp_nodelay(true);
    let topics = DeviceTopics::new(&fleet.prefix, &plan, fleet.opts.watch_status);
    let result = device
        .provision(fleet, &plan, &topics, &request, &client, &mut eventloop)
        .await;
    drop(permit);
    let provisioning_reconnects = device.reconnects;
    let telemetry = match (&result, &fleet.opts.telemetry) {
        (Ok(done), Some(t)) if t.publishes(&plan) => Some((done.thing_name.clone(), t)),
        _ => None,
    };
    let _ = tx.send(DeviceReport::Provisioning(Outcome {
        plan: plan.clone(),
        result,
        connect: device.connect,
        reconnects: provisioning_reconnects,
        resent: device.resent,
    }));
    if let Some((thing_name, t)) = telemetry {
        let mut publisher = Publisher::new(t, fleet.telemetry_gate.clone(), gate_wait(&fleet.opts));
        let error = match fleet.prefix.telemetry(&plan.id, None) {
            Ok(topic) => device
                .telemetry(&mut publisher, &topic, &topics, &client, &mut eventloop)
                .await
                .err(),
            Err(e) => Some(FailureReason::Prepare(format!("telemetry topic: {e}"))),
        };
        let _ = tx.send(DeviceReport::Telemetry(TelemetryDone {
            device: DeviceTelemetry {
                n: plan.n,
                id: plan.id,
                thing_name,
                published: publisher.next,
                acked: publisher.acked,
                reconnects: device.reconnects - provisioning_reconnects,
                error,
            },
            first_publish: publisher.first_publish,
            last_ack: publisher.last_ack,
        }));
    }
    close(&client, &mut eventloop).await;
}

/// The longest a provisioned device may wait for the rest of the fleet before its telemetry
/// phase starts: the provisioning budget of every wave of `max_in_flight` devices, plus the
/// pacing of the starts.
fn gate_wait(opts: &FleetOptions) -> Duration {
    let pacing = if opts.rate > 0.0 {
        Duration::from_secs_f64(f64::from(opts.devices) / opts.rate)
    } else {
        Duration::ZERO
    };
    let waves = (opts.devices as usize).div_ceil(opts.max_in_flight.max(1));
    opts.timeout
        .saturating_mul(u32::try_from(waves).unwrap_or(u32::MAX))
        + pacing
}

/// Request channel size: room for a full telemetry window plus the DISCONNECT.
fn channel_capacity(fleet: &Fleet) -> usize {
    let window = fleet
        .opts
        .telemetry
        .as_ref()
        .map_or(0, |t| usize::from(t.window));
    window.max(4) + 1
}

/// The telemetry state of one device: which sequence numbers are where.
struct Publisher<'a> {
    plan: &'a TelemetryPlan,
    /// Next new sequence number (= distinct sequence numbers published so far).
    next: u64,
    /// When the next new sequence number is due (pacing).
    next_due: Instant,
    /// Handed to the client, not yet written (no packet id yet), in order.
    queued: VecDeque<u64>,
    /// Written, waiting for the PUBACK, by packet id.
    in_flight: HashMap<u16, u64>,
    /// Unacknowledged when the connection dropped: published again first, in order.
    resend: VecDeque<u64>,
    acked: u64,
    connected: bool,
    /// The gateway has recorded the device as provisioned (or the plan does not wait).
    ready: bool,
    /// The fleet-wide start signal came (see [`TelemetryPlan::after_fleet`]).
    gate_open: bool,
    /// The fleet-wide start signal.
    gate: watch::Receiver<bool>,
    /// The longest to wait for it.
    gate_wait: Duration,
    first_publish: Option<Instant>,
    last_ack: Option<Instant>,
}

impl<'a> Publisher<'a> {
    fn new(plan: &'a TelemetryPlan, gate: watch::Receiver<bool>, gate_wait: Duration) -> Self {
        Self {
            plan,
            next: 0,
            next_due: Instant::now(),
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            resend: VecDeque::new(),
            acked: 0,
            // The provisioning connection is up when telemetry starts.
            connected: true,
            ready: !plan.await_status,
            gate_open: false,
            gate,
            gate_wait,
            first_publish: None,
            last_ack: None,
        }
    }

    fn total(&self) -> u64 {
        u64::from(self.plan.messages_per_device)
    }

    fn outstanding(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }

    /// Hands the client as many messages as the window, the pacing and the channel allow.
    fn fill(&mut self, client: &AsyncClient, topic: &str) {
        while self.connected
            && self.ready
            && self.gate_open
            && self.outstanding() < usize::from(self.plan.window)
        {
            let now = Instant::now();
            let seq = match self.resend.front() {
                Some(&seq) => seq,
                None if self.next < self.total() && now >= self.next_due => self.next,
                None => break,
            };
            let payload = arrival::payload(seq, clock::unix_us(), self.plan.payload_bytes);
            match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                Ok(()) => {}
                // The channel holds a full window; the event loop drains it.
                Err(_) => break,
            }
            self.first_publish.get_or_insert(now);
            self.queued.push_back(seq);
            if self.resend.front() == Some(&seq) {
                self.resend.pop_front();
            } else {
                self.next += 1;
                if self.plan.rate > 0.0 {
                    self.next_due += Duration::from_secs_f64(1.0 / self.plan.rate);
                }
            }
        }
    }

    /// When pacing, the moment the next new message is due (if the loop must wake for it).
    fn wake_for_pacing(&self) -> Option<Instant> {
        (self.plan.rate > 0.0
            && self.connected
            && self.ready
            && self.gate_open
            && self.resend.is_empty()
            && self.next < self.total()
            && self.outstanding() < usize::from(self.plan.window))
        .then_some(self.next_due)
    }

    /// The connection dropped: what was not acknowledged is lost with the clean session, so
    /// it is published again (in order) after the reconnect.
    fn connection_lost(&mut self) {
        self.connected = false;
        let mut unacked: Vec<u64> = self
            .in_flight
            .drain()
            .map(|(_, seq)| seq)
            .chain(self.queued.drain(..))
            .chain(self.resend.drain(..))
            .collect();
        unacked.sort_unstable();
        unacked.dedup();
        self.resend = unacked.into();
    }
}

/// The state of one device's run.
struct DeviceRun {
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    resend_after: Option<Duration>,
    stage: Stage,
    connect: Option<Duration>,
    first_request: Option<Instant>,
    last_request: Option<Instant>,
    last_status: Option<String>,
    last_error: Option<String>,
    reconnects: u32,
    resent: u32,
    backoff: Backoff,
}

impl DeviceRun {
    async fn provision(
        &mut self,
        fleet: &Fleet,
        plan: &DevicePlan,
        topics: &DeviceTopics,
        request: &PreparedRequest,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
    ) -> Result<Provisioned, FailureReason> {
        loop {
            let wake = match (self.stage, self.resend_after, self.last_request) {
                (Stage::WaitingForAnswer, Some(every), Some(sent)) => {
                    (sent + every).min(self.deadline)
                }
                _ => self.deadline,
            };
            // Cancelling `poll` is safe here: it only ever waits (Pending) for incoming bytes,
            // which it reads into its buffer; the small writes to a local socket complete
            // without waiting.
            let event = match tokio::time::timeout_at(wake, eventloop.poll()).await {
                Err(_) if wake < self.deadline => {
                    self.send_request(client, topics, request)?;
                    continue;
                }
                Err(_) => return Err(self.timed_out()),
                Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                    return Err(FailureReason::ConnectionRefused(format!("{code:?}")))
                }
                Ok(Err(e)) => {
                    // Polling again reconnects; pause first so a down broker is not hammered.
                    self.last_error = Some(e.to_string());
                    self.reconnects += 1;
                    self.stage = Stage::Connecting;
                    self.pause().await?;
                    continue;
                }
                Ok(Ok(event)) => event,
            };
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    // Clean session: subscriptions never survive a reconnect, so subscribe on
                    // every CONNACK and (re)send the request only after the SUBACK.
                    client
                        .try_subscribe_many(topics.filters())
                        .map_err(|e| FailureReason::Prepare(format!("subscribe: {e}")))?;
                    self.stage = Stage::Subscribing;
                    self.backoff.reset();
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    if let Some(i) = ack
                        .return_codes
                        .iter()
                        .position(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        let topic = topics.filters().get(i).map(|f| f.path.clone());
                        return Err(FailureReason::SubscribeRefused {
                            topic: topic.unwrap_or_default(),
                        });
                    }
                    if self.stage == Stage::Subscribing {
                        self.connect.get_or_insert_with(|| self.started.elapsed());
                        self.send_request(client, topics, request)?;
                    }
                }
                Event::Incoming(Packet::Publish(publish)) => {
                    if publish.topic == topics.accepted {
                        let latency = self.first_request.map(|t| t.elapsed()).unwrap_or_default();
                        let thing_name = verify_answer(fleet, plan, request, &publish.payload)
                            .map_err(|reason| match reason {
                                FailureReason::InvalidAnswer { reason, .. } => {
                                    FailureReason::InvalidAnswer {
                                        topic: publish.topic.clone(),
                                        reason,
                                    }
                                }
                                other => other,
                            })?;
                        return Ok(Provisioned {
                            latency,
                            thing_name,
                        });
                    } else if publish.topic == topics.rejected {
                        let rejected: RejectedResponse =
                            contract::decode(plan.format, &publish.payload).map_err(|e| {
                                FailureReason::InvalidAnswer {
                                    topic: publish.topic.clone(),
                                    reason: e.to_string(),
                                }
                            })?;
                        if rejected.status_code == 429 || rejected.status_code >= 500 {
                            self.last_error = Some(format!(
                                "{} {}: {}",
                                rejected.status_code, rejected.error_code, rejected.error_message
                            ));
                            self.pause().await?;
                            self.send_request(client, topics, request)?;
                        } else {
                            return Err(FailureReason::Rejected {
                                status_code: rejected.status_code,
                                error_code: rejected.error_code,
                                error_message: rejected.error_message,
                            });
                        }
                    } else if publish.topic == topics.status {
                        self.last_status = Some(
                            contract::decode::<StatusReport>(PayloadFormat::Json, &publish.payload)
                                .map(|s| s.status.as_str().to_string())
                                .unwrap_or_else(|_| {
                                    String::from_utf8_lossy(&publish.payload).into_owned()
                                }),
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// The telemetry phase on the provisioning connection: publishes every message and waits
    /// for every PUBACK, reconnecting (and republishing what was unacknowledged) as needed.
    async fn telemetry(
        &mut self,
        publisher: &mut Publisher<'_>,
        topic: &str,
        topics: &DeviceTopics,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
    ) -> Result<(), FailureReason> {
        self.stage = Stage::Telemetry;
        self.timeout = publisher.plan.timeout;
        // Until the fleet-wide start, the budget also covers the rest of the fleet's
        // provisioning; it starts afresh when the gate opens.
        let mut gate = publisher.gate.clone();
        publisher.gate_open = *gate.borrow_and_update();
        self.deadline = Instant::now()
            + publisher.plan.timeout
            + if publisher.gate_open {
                Duration::ZERO
            } else {
                publisher.gate_wait
            };
        self.backoff.reset();
        publisher.next_due = Instant::now();
        let subscribe_status = || {
            client
                .try_subscribe(topics.status.clone(), QoS::AtLeastOnce)
                .map_err(|e| FailureReason::Prepare(format!("subscribe: {e}")))
        };
        if !publisher.ready {
            subscribe_status()?;
        }
        while publisher.acked < publisher.total() {
            publisher.fill(client, topic);
            let wake = publisher
                .wake_for_pacing()
                .map_or(self.deadline, |due| due.min(self.deadline));
            let polled = tokio::select! {
                // A closed channel means the run is gone: nothing to wait for.
                _ = gate.wait_for(|open| *open), if !publisher.gate_open => {
                    publisher.gate_open = true;
                    publisher.next_due = Instant::now();
                    self.deadline = Instant::now() + publisher.plan.timeout;
                    continue;
                }
                polled = tokio::time::timeout_at(wake, eventloop.poll()) => polled,
            };
            let event = match polled {
                Err(_) if wake < self.deadline => continue,
                Err(_) => return Err(self.timed_out()),
                Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                    return Err(FailureReason::ConnectionRefused(format!("{code:?}")))
                }
                Ok(Err(e)) => {
                    self.last_error = Some(e.to_string());
                    self.reconnects += 1;
                    publisher.connection_lost();
                    self.pause().await?;
                    continue;
                }
                Ok(Ok(event)) => event,
            };
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    publisher.connected = true;
                    self.backoff.reset();
                    if !publisher.ready {
                        subscribe_status()?;
                    }
                }
                Event::Incoming(Packet::Publish(publish)) if publish.topic == topics.status => {
                    let Ok(report) =
                        contract::decode::<StatusReport>(PayloadFormat::Json, &publish.payload)
                    else {
                        continue;
                    };
                    let status = report.status.as_str();
                    self.last_status = Some(status.to_string());
                    match status {
                        "provisioned" if !publisher.ready => {
                            publisher.ready = true;
                            publisher.next_due = Instant::now();
                        }
                        "failed" | "blocked" => {
                            return Err(FailureReason::NotProvisioned(status.to_string()))
                        }
                        _ => {}
                    }
                }
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    if let Some(seq) = publisher.queued.pop_front() {
                        publisher.in_flight.insert(pkid, seq);
                    }
                }
                Event::Incoming(Packet::PubAck(ack))
                    if publisher.in_flight.remove(&ack.pkid).is_some() =>
                {
                    publisher.acked += 1;
                    publisher.last_ack = Some(Instant::now());
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn send_request(
        &mut self,
        client: &AsyncClient,
        topics: &DeviceTopics,
        request: &PreparedRequest,
    ) -> Result<(), FailureReason> {
        client
            .try_publish(
                topics.request.clone(),
                QoS::AtLeastOnce,
                false,
                request.payload.clone(),
            )
            .map_err(|e| FailureReason::Prepare(format!("publish: {e}")))?;
        let now = Instant::now();
        if self.first_request.is_some() {
            self.resent += 1;
        } else {
            self.first_request = Some(now);
        }
        self.last_request = Some(now);
        self.stage = Stage::WaitingForAnswer;
        Ok(())
    }

    /// Sleeps the current back-off (jittered, doubling up to a cap), or fails with a timeout
    /// when the deadline comes first.
    async fn pause(&mut self) -> Result<(), FailureReason> {
        let jittered = self.backoff.next_delay();
        if Instant::now() + jittered >= self.deadline {
            tokio::time::sleep_until(self.deadline).await;
            return Err(self.timed_out());
        }
        tokio::time::sleep(jittered).await;
        Ok(())
    }

    fn timed_out(&self) -> FailureReason {
        FailureReason::Timeout {
            timeout: self.timeout,
            stage: self.stage,
            last_status: self.last_status.clone(),
            last_error: self.last_error.clone(),
        }
    }
}

/// Checks an `/accepted` answer; returns the thing name.
fn verify_answer(
    fleet: &Fleet,
    plan: &DevicePlan,
    request: &PreparedRequest,
    payload: &[u8],
) -> Result<String, FailureReason> {
    let answer: AcceptedResponse =
        contract::decode(plan.format, payload).map_err(|e| FailureReason::InvalidAnswer {
            topic: String::new(),
            reason: e.to_string(),
        })?;
    if answer.device_id != plan.id {
        return Err(FailureReason::WrongDevice {
            got: answer.device_id.to_string(),
        });
    }
    if answer.thing_name.is_empty() {
        return Err(FailureReason::MissingThingName);
    }
    if fleet.opts.cloud == SimCloud::Azure {
        if answer.assigned_hub.as_deref().is_none_or(str::is_empty) {
            return Err(FailureReason::AzureAnswer("no assignedHub".into()));
        }
        let status = answer.device_configuration.get("status");
        if status.map(String::as_str) != Some("assigned") {
            return Err(FailureReason::AzureAnswer(format!(
                "registration status {status:?}, expected \"assigned\""
            )));
        }
        // Symmetric-key devices get no certificate and no key; X.509 ones are checked below.
        if answer.certificate_pem.is_empty() {
            if answer.private_key.is_some() {
                return Err(FailureReason::AzureAnswer(
                    "a privateKey without a certificate".into(),
                ));
            }
            return Ok(answer.thing_name);
        }
    }
    let certificate = |e: IdentityError| FailureReason::Certificate(e.to_string());
    identity::parse_certificates(&answer.certificate_pem).map_err(certificate)?;
    let matches = match (&request.own_key, &answer.private_key) {
        (Some(_), Some(_)) => return Err(FailureReason::UnexpectedPrivateKey),
        (None, None) => return Err(FailureReason::MissingPrivateKey),
        (Some(own), None) => identity::cert_matches_key(&answer.certificate_pem, own)
            .map_err(certificate)?
            .then_some(())
            .ok_or(FailureReason::KeyMismatch("the device's own key")),
        // Outside the sample, a returned key is checked for its form only: one PKCS#8 block.
        (None, Some(pem)) if !plan.full_check => match pem::parse(pem) {
            Ok(block) if block.tag() == "PRIVATE KEY" && !block.contents().is_empty() => Ok(()),
            _ => Err(FailureReason::Certificate(
                "the returned private key is not a PEM PKCS#8 key".into(),
            )),
        },
        (None, Some(pem)) => {
            let key = PrivateKey::from_pem(pem).map_err(certificate)?;
            identity::cert_matches_key(&answer.certificate_pem, &key)
                .map_err(certificate)?
                .then_some(())
                .ok_or(FailureReason::KeyMismatch("the returned private key"))
        }
    };
    matches?;
    if let Some(ca) = fleet.opts.cloud_ca_pem.as_ref().filter(|_| plan.full_check) {
        identity::verify_chain(&answer.certificate_pem, ca, clock::unix_secs())
            .map_err(|e| FailureReason::Chain(e.to_string()))?;
    }
    Ok(answer.thing_name)
}

/// Sends DISCONNECT so the broker does not log a dropped connection per device.
async fn close(client: &AsyncClient, eventloop: &mut EventLoop) {
    if eventloop.network.is_none() || client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}
