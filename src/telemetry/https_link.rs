//! One device's HTTPS link to IoT Hub (`hub_transport = "https"`): each message is a
//! `POST /devices/{id}/messages/events` answered 204, sent one at a time in outbox order.
//!
//! It keeps the MQTT link's accounting: a message is `queued`, then `sending`, then
//! `settling` (204 received, outbox removal not yet durable); the window counts the last two,
//! so after a crash at most `window` messages of a device are sent again. A failed request
//! (network, 5xx, 429, a refused token) puts the message back in front and waits a jittered,
//! doubling delay (or the hub's `Retry-After`): nothing is dropped. The subtopic travels as
//! the `iothub-app-subtopic` header, as the MQTT topic's property bag carries it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::directory::{LinkTarget, PasswordSource};
use super::link::{take_matching, Item, Settle, Settled};
use super::Counters;
use crate::backoff::Backoff;
use crate::cloud::azure::hub;
use crate::cloud::azure::{AzureError, Endpoint};

#[derive(Default)]
struct State {
    queued: VecDeque<Item>,
    /// The message whose POST is running.
    sending: Option<Item>,
    settling: usize,
    closing: bool,
    last_activity: Option<Instant>,
}

/// What the dispatcher and the remover share with the link's task.
pub(crate) struct HttpsShared {
    /// Device id (for logs).
    pub client_id: String,
    window: usize,
    state: Mutex<State>,
    wake: Notify,
}

impl HttpsShared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues messages (in order).
    pub fn enqueue(&self, items: impl IntoIterator<Item = Item>) {
        let mut st = self.lock();
        st.queued.extend(items);
        st.last_activity = Some(Instant::now());
        drop(st);
        self.wake.notify_one();
    }

    /// Nothing queued, being sent or settling.
    pub fn is_empty(&self) -> bool {
        let st = self.lock();
        st.queued.is_empty() && st.sending.is_none() && st.settling == 0
    }

    /// When the link last had traffic.
    pub fn last_activity(&self) -> Option<Instant> {
        self.lock().last_activity
    }

    /// Drops queued (not yet sent) messages for which `drop` says yes; returns them.
    pub fn remove_queued(&self, drop: impl FnMut(&Item) -> bool) -> Vec<Item> {
        take_matching(&mut self.lock().queued, drop)
    }
}

impl Settle for HttpsShared {
    fn settle(&self, n: usize) {
        let mut st = self.lock();
        st.settling = st.settling.saturating_sub(n);
        st.last_activity = Some(Instant::now());
        // As on the MQTT link: only a queued message waits for the slot.
        let waiting = !st.queued.is_empty();
        drop(st);
        if waiting {
            self.wake.notify_one();
        }
    }
}

/// Owns a link's task.
pub(crate) struct HttpsLink {
    pub shared: Arc<HttpsShared>,
    task: JoinHandle<()>,
}

/// Connection settings of one HTTPS link.
pub(crate) struct HttpsSettings {
    pub window: u16,
    pub request_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl HttpsLink {
    /// Starts the link's task for `target`.
    pub fn start(
        target: LinkTarget,
        settings: &HttpsSettings,
        counters: Arc<Counters>,
        settled: mpsc::UnboundedSender<Settled>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let shared = Arc::new(HttpsShared {
            client_id: target.client_id.clone(),
            window: usize::from(settings.window.max(1)),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        let endpoint = Endpoint {
            host: target.host.clone(),
            connect: format!("{}:{}", target.address.0, target.address.1)
                .parse()
                .ok(),
        };
        let sender = Sender {
            shared: shared.clone(),
            endpoint,
            tls: target.tls,
            password: target.password,
            device_id: target.cloud_id,
            counters,
            settled,
            within: settings.request_timeout,
            backoff: Backoff::new(settings.reconnect_min, settings.reconnect_max),
            shutdown,
        };
        let task = tokio::spawn(sender.run());
        Self { shared, task }
    }

    /// Stops the task (waiting at most `within` for a POST in flight) and returns what was not
    /// acknowledged, in order.
    pub async fn stop(self, within: Duration) -> Vec<Item> {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
        let mut st = self.shared.lock();
        let mut left: Vec<Item> = st.sending.take().into_iter().collect();
        left.extend(st.queued.drain(..));
        left
    }
}

struct Sender {
    shared: Arc<HttpsShared>,
    endpoint: Endpoint,
    tls: Arc<rustls::ClientConfig>,
    password: Option<PasswordSource>,
    device_id: String,
    counters: Arc<Counters>,
    settled: mpsc::UnboundedSender<Settled>,
    within: Duration,
    backoff: Backoff,
    shutdown: watch::Receiver<bool>,
}

impl Sender {
    async fn run(mut self) {
        loop {
            let Some((payload, properties)) = self.next().await else {
                return;
            };
            let props: Vec<(&str, &str)> = properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let result = hub::post_event(
                &self.endpoint,
                self.tls.clone(),
                self.password.as_ref().map(|p| p()),
                &self.device_id,
                &payload,
                &props,
                self.within,
            )
            .await;
            let failed = {
                let mut st = self.shared.lock();
                let Some(item) = st.sending.take() else {
                    return;
                };
                match result {
                    Ok(()) => {
                        st.settling += 1;
                        st.last_activity = Some(Instant::now());
                        let _ = self.settled.send(Settled {
                            seq: item.seq,
                            mem: item.mem_size(),
                            link: Some(self.shared.clone()),
                        });
                        None
                    }
                    Err(e) => {
                        st.queued.push_front(item);
                        Some(e)
                    }
                }
            };
            let Some(e) = failed else {
                self.backoff.reset();
                continue;
            };
            self.counters
                .upstream_disconnects
                .fetch_add(1, Ordering::Relaxed);
            let delay = match e {
                AzureError::Throttled { retry_after, .. } => retry_after,
                _ => self.backoff.next_delay(),
            };
            tracing::warn!(device = %self.device_id, retry_in = ?delay, "IoT Hub HTTPS: {e}");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = super::stopped(&mut self.shutdown) => return,
            }
        }
    }

    /// Waits for a message the window allows and marks it sending; `None` when closing.
    async fn next(&mut self) -> Option<(bytes::Bytes, Vec<(String, String)>)> {
        loop {
            {
                let mut st = self.shared.lock();
                if st.closing {
                    return None;
                }
                if st.settling < self.shared.window {
                    if let Some(item) = st.queued.pop_front() {
                        let payload = item.payload.clone();
                        let properties = topic_properties(&item.topic);
                        if let Some(at) = item.accepted {
                            self.counters.forward_delay.record(at.elapsed());
                        }
                        st.sending = Some(item);
                        return Some((payload, properties));
                    }
                }
            }
            tokio::select! {
                _ = self.shared.wake.notified() => {}
                _ = super::stopped(&mut self.shutdown) => return None,
            }
        }
    }
}

/// The property bag of an IoT Hub telemetry topic (`devices/{id}/messages/events/{bag}`),
/// without what HTTP headers cannot carry (a name that is not a header token, a value with
/// control characters): those are dropped with a log line rather than holding the device's
/// messages back for good.
fn topic_properties(topic: &str) -> Vec<(String, String)> {
    let bag = match topic.split_once("/messages/events/") {
        Some((_, bag)) if !bag.is_empty() => hub::decode_properties(bag),
        _ => return Vec::new(),
    };
    bag.into_iter()
        .filter(|(k, v)| {
            let name_ok = k.starts_with("$.")
                || hyper::header::HeaderName::from_bytes(format!("iothub-app-{k}").as_bytes())
                    .is_ok();
            let ok = name_ok && hyper::header::HeaderValue::from_str(v).is_ok();
            if !ok {
                tracing::debug!(property = %k, "property cannot travel as an HTTP header; not sent");
            }
            ok
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subtopic_property_comes_back_from_the_topic() {
        assert_eq!(
            topic_properties("devices/d/messages/events/subtopic=room%201%2Ftemp"),
            vec![("subtopic".to_string(), "room 1/temp".to_string())]
        );
        assert!(topic_properties("devices/d/messages/events/").is_empty());
        // A name HTTP cannot carry is left out; the rest goes.
        assert_eq!(
            topic_properties("devices/d/messages/events/a%20b=1&ok=2"),
            vec![("ok".to_string(), "2".to_string())]
        );
    }
}
