//! Who may do what on the embedded broker: the local trust boundary.
//!
//! The local network is hostile: any process that reaches a listener is untrusted. With
//! [`AccessRules`] installed (the gateway always installs them), every connection gets a
//! [`Principal`] at CONNECT and each PUBLISH and SUBSCRIBE is checked against it:
//!
//! - a device (its client id is a valid device id X) may publish only its provisioning
//!   request `{prefix}/X/provision/{json|cbor}` and its telemetry `{prefix}/X/telemetry[/...]`,
//!   and subscribe only inside `{prefix}/X/` (its answers, status and commands). It never
//!   creates retained messages: only the gateway publishes the retained `/status`;
//! - the gateway's own session is not a network client at all (`local.rs`): its client id is
//!   reserved and refused at CONNECT before these rules are asked, so its session (and the
//!   end-to-end acknowledgements that hang on it) cannot be taken over;
//! - a local application listed in `[[downstream.users]]` connects with its user name and
//!   gets exactly the topic filters listed for it;
//! - any other client id is refused at CONNECT.
//!
//! A broker started without rules (the library default, used by the broker's own
//! conformance suite) lets every client do everything, as a plain MQTT broker does.

use std::sync::Arc;

use crate::device_id::DeviceId;
use crate::mqtt::wire;

/// A local application's rights (`[[downstream.users]]`), already authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRights {
    /// The user name it connects with.
    pub name: String,
    /// Topic filters it may publish to (a topic matching any of them).
    pub publish: Vec<String>,
    /// Topic filters it may subscribe within (a filter covered by any of them).
    pub subscribe: Vec<String>,
}

/// A local application allowed to connect (`[[downstream.users]]`).
#[derive(Clone, Debug)]
pub struct LocalUser {
    /// Its rights.
    pub rights: Arc<UserRights>,
    /// Argon2 PHC string of its password (`fleetgw passwd`).
    pub password_hash: String,
}

/// Checks a device's CONNECT credentials: (device id, user name, password, TLS client
/// certificate chain in DER, leaf first) -> authenticated (`true`), admitted without proof
/// (`false`, e.g. an unprovisioned device in approve mode) or `Err(why)`.
pub type DeviceAuthenticator = Arc<
    dyn Fn(&DeviceId, Option<&str>, Option<&[u8]>, &[Vec<u8>]) -> Result<bool, String>
        + Send
        + Sync,
>;

/// The rules of a broker that serves the device contract.
#[derive(Clone)]
pub struct AccessRules {
    /// The device topic prefix (`[downstream] topic_prefix`), e.g. `fleetgw`.
    pub prefix: String,
    /// Local applications, by user name, as the broker starts
    /// ([`super::EmbeddedBroker::set_users`] replaces them later).
    pub users: Vec<LocalUser>,
    /// `[downstream] auth = "device"`: every device must prove its id at CONNECT. `None`
    /// (`auth = "none"`): a device is who its client id says.
    pub device_auth: Option<DeviceAuthenticator>,
}

impl std::fmt::Debug for AccessRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessRules")
            .field("prefix", &self.prefix)
            .field("users", &self.users)
            .field("device_auth", &self.device_auth.is_some())
            .finish()
    }
}

/// What a connection is, decided once at CONNECT.
#[derive(Clone, Debug)]
pub enum Principal {
    /// No rules installed: a plain MQTT broker.
    Unrestricted,
    /// A device; `own` is `{prefix}/{id}/`.
    Device {
        /// The device's topic root, with the trailing slash.
        own: Arc<str>,
        /// It proved its id at CONNECT (`auth = "device"`).
        authenticated: bool,
    },
    /// A local application from `[[downstream.users]]`.
    User(Arc<UserRights>),
}

/// The owner of a session (see [`Principal::owner`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Owner {
    /// No rules installed.
    #[default]
    Anyone,
    /// The gateway's own (in-process) session.
    Gateway,
    /// A device (its client id names it).
    Device,
    /// The `[[downstream.users]]` entry of this name.
    User(Arc<str>),
}

/// Why a CONNECT is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client id is not a device id, or is reserved (MQTT: identifier rejected).
    BadClientId(String),
    /// Missing or wrong credentials (MQTT: not authorized / bad user name or password).
    NotAuthorized(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::BadClientId(why) | Refusal::NotAuthorized(why) => f.write_str(why),
        }
    }
}

impl AccessRules {
    /// Rules for the device contract under `prefix`, with no users and no device
    /// authentication.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            users: Vec::new(),
            device_auth: None,
        }
    }

    /// Decides who a CONNECT is. `user` is the `[[downstream.users]]` entry whose password
    /// the connection proved (the caller verifies it: that costs a deliberate hash), if any.
    pub fn admit(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        client_chain: &[Vec<u8>],
        user: Option<Arc<UserRights>>,
    ) -> Result<Principal, Refusal> {
        if let Some(user) = user {
            return Ok(Principal::User(user));
        }
        match DeviceId::parse(client_id) {
            Ok(id) => {
                let authenticated = match &self.device_auth {
                    Some(check) => check(&id, username, password, client_chain).map_err(|why| {
                        Refusal::NotAuthorized(format!("device {client_id:?}: {why}"))
                    })?,
                    None => false,
                };
                Ok(Principal::Device {
                    own: Arc::from(format!("{}/{client_id}/", self.prefix)),
                    authenticated,
                })
            }
            Err(e) => Err(Refusal::BadClientId(format!(
                "client id {:?} is not a device id: {e}",
                truncated(client_id)
            ))),
        }
    }
}

impl Principal {
    /// May this connection publish on `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Principal::Unrestricted => true,
            Principal::Device { own, .. } => match topic.strip_prefix(&**own) {
                Some(rest) => {
                    rest == "provision/json"
                        || rest == "provision/cbor"
                        || rest == "telemetry"
                        || rest.starts_with("telemetry/")
                }
                None => false,
            },
            Principal::User(u) => u.publish.iter().any(|f| wire::topic_matches(topic, f)),
        }
    }

    /// May this connection subscribe to `filter`?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Principal::Unrestricted => true,
            // Inside `{prefix}/X/`: the rest may use wildcards, the id level may not.
            Principal::Device { own, .. } => filter.len() > own.len() && filter.starts_with(&**own),
            Principal::User(u) => u.subscribe.iter().any(|f| filter_covers(f, filter)),
        }
    }

    /// May this connection's PUBLISH be stored as retained?
    pub fn may_retain(&self) -> bool {
        !matches!(self, Principal::Device { .. })
    }

    /// Who owns a session this connection makes or resumes: a kept session is resumed only
    /// by a connection of the same owner, so a device can never inherit a local
    /// application's subscriptions (or the reverse) by reusing its client id.
    pub fn owner(&self) -> Owner {
        match self {
            Principal::Unrestricted => Owner::Anyone,
            Principal::Device { .. } => Owner::Device,
            Principal::User(u) => Owner::User(Arc::from(u.name.as_str())),
        }
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Unrestricted => "client",
            Principal::Device { .. } => "device",
            Principal::User(_) => "user",
        }
    }
}

/// True when every topic `inner` matches is also matched by `outer` (both valid filters).
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    // A filter starting with a wildcard matches no `$` topic (MQTT 3.1.1 §4.7.2).
    if outer.starts_with(['+', '#']) && inner.starts_with('$') {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// At most 64 characters of untrusted text, for log lines and refusals.
pub fn truncated(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> AccessRules {
        AccessRules::new("fleetgw")
    }

    fn device(id: &str) -> Principal {
        rules().admit(id, None, None, &[], None).unwrap()
    }

    #[test]
    fn a_device_publishes_only_its_request_and_telemetry() {
        let a = device("sensor-a");
        for ok in [
            "fleetgw/sensor-a/provision/json",
            "fleetgw/sensor-a/provision/cbor",
            "fleetgw/sensor-a/telemetry",
            "fleetgw/sensor-a/telemetry/temp/1",
        ] {
            assert!(a.may_publish(ok), "{ok}");
        }
        for refused in [
            "fleetgw/sensor-b/telemetry",
            "fleetgw/sensor-b/provision/json",
            "fleetgw/sensor-a/provision/json/accepted",
            "fleetgw/sensor-a/status",
            "fleetgw/sensor-a/commands/x",
            "fleetgw/sensor-a/telemetryx",
            "fleetgw/sensor-a/provision/xml",
            "other/sensor-a/telemetry",
            "fleetgw/sensor-a",
        ] {
            assert!(!a.may_publish(refused), "{refused}");
        }
        assert!(!a.may_retain());
    }

    #[test]
    fn a_device_subscribes_only_inside_its_own_root() {
        let a = device("sensor-a");
        for ok in [
            "fleetgw/sensor-a/#",
            "fleetgw/sensor-a/provision/json/+",
            "fleetgw/sensor-a/status",
            "fleetgw/sensor-a/commands/#",
        ] {
            assert!(a.may_subscribe(ok), "{ok}");
        }
        for refused in [
            "#",
            "fleetgw/#",
            "fleetgw/+/status",
            "fleetgw/sensor-b/#",
            "fleetgw/sensor-a",
            "fleetgw/sensor-a/",
            "+/sensor-a/#",
            "$SYS/#",
        ] {
            assert!(!a.may_subscribe(refused), "{refused}");
        }
    }

    #[test]
    fn client_ids_that_are_not_device_ids_are_refused() {
        for bad in ["", "a/b", "has space", "trailing.", &"x".repeat(129), "#"] {
            assert!(
                matches!(
                    rules().admit(bad, None, None, &[], None),
                    Err(Refusal::BadClientId(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn users_get_exactly_their_filters() {
        let user = Arc::new(UserRights {
            name: "historian".into(),
            publish: vec![],
            subscribe: vec!["fleetgw/+/status".into(), "plant/#".into()],
        });
        let p = rules()
            .admit("historian-1 x", None, None, &[], Some(user.clone()))
            .unwrap();
        assert!(p.may_subscribe("fleetgw/+/status"));
        assert!(p.may_subscribe("fleetgw/sensor-a/status"));
        assert!(p.may_subscribe("plant/line1/#"));
        assert!(!p.may_subscribe("fleetgw/#"));
        assert!(!p.may_subscribe("fleetgw/sensor-a/provision/json/accepted"));
        assert!(!p.may_publish("fleetgw/sensor-a/telemetry"));
        assert!(p.may_retain());
        // A user's sessions are its own, whatever client id it uses.
        let as_device_id = rules()
            .admit("sensor-a", None, None, &[], Some(user))
            .unwrap();
        assert_eq!(as_device_id.owner(), Owner::User(Arc::from("historian")));
        assert_ne!(as_device_id.owner(), device("sensor-a").owner());
    }

    #[test]
    fn filter_coverage() {
        assert!(filter_covers("#", "a/b/#"));
        assert!(!filter_covers("#", "$SYS/x"));
        assert!(filter_covers("a/#", "a"));
        assert!(filter_covers("a/#", "a/+/c"));
        assert!(filter_covers("a/+/c", "a/b/c"));
        assert!(filter_covers("a/+/c", "a/+/c"));
        assert!(!filter_covers("a/+/c", "a/#"));
        assert!(!filter_covers("a/+/c", "a/b/c/d"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(!filter_covers("a/b", "a/b/c"));
    }

    #[test]
    fn untrusted_text_is_truncated() {
        assert_eq!(truncated("short"), "short");
        let long = "é".repeat(100);
        assert_eq!(truncated(&long).chars().count(), 67);
    }
}
