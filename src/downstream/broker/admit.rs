//! Settings every connection of the embedded broker shares, and the CONNECT admission check
//! against them: which local application a user name is, whether a topic is within the size
//! limits, and who a CONNECT is under the trust boundary ([`super::rules`]).

use std::sync::Arc;
use std::time::Duration;

use super::rules::{truncated, AccessRules, LocalUser, Principal, Refusal};
use crate::identity;
use crate::mqtt::wire::{ConnectInfo, ConnectOutcome};

/// Settings every connection shares.
#[derive(Debug)]
pub struct ConnectionConfig {
    /// Largest packet a client may send.
    pub max_packet: usize,
    /// Time from TCP accept to a complete CONNECT.
    pub connect_timeout: Duration,
    /// The trust boundary; `None` for a plain broker.
    pub rules: Option<AccessRules>,
    /// The local applications that may connect: `rules.users` at start, replaced on a
    /// config reload ([`super::EmbeddedBroker::set_users`]). Connections already admitted
    /// keep the rights they were admitted with.
    pub users: std::sync::RwLock<Arc<Vec<LocalUser>>>,
    /// Longest topic name or filter, in bytes.
    pub max_topic_bytes: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// PUBLISH packets per second one connection may send.
    pub max_inbound_per_second: u32,
}

impl ConnectionConfig {
    /// The local application called `name`, if there is one. A CONNECT with that user name
    /// must carry its password; any other user name is not a user's (devices may send one).
    pub(super) fn user(&self, name: &str) -> Option<LocalUser> {
        let users = self.users.read().unwrap_or_else(|p| p.into_inner());
        users.iter().find(|u| u.rights.name == name).cloned()
    }

    /// Whether `topic` (a name or a filter) is within the length and depth limits.
    pub(super) fn topic_within_limits(&self, topic: &str) -> bool {
        topic.len() <= self.max_topic_bytes
            && topic.bytes().filter(|b| *b == b'/').count() < self.max_topic_levels
    }

    /// Who this CONNECT is, or why it is refused.
    pub(super) async fn admit(
        &self,
        connect: &ConnectInfo,
        client_id: &str,
        assigned: bool,
        client_chain: &[Vec<u8>],
    ) -> Result<Principal, (ConnectOutcome, String)> {
        let Some(rules) = &self.rules else {
            return Ok(Principal::Unrestricted);
        };
        let user = match connect.username.as_deref().and_then(|n| self.user(n)) {
            Some(user) => {
                let phc = user.password_hash.clone();
                let password = connect.password.clone();
                // Argon2 costs tens of milliseconds on purpose: keep it off the workers.
                let proved = tokio::task::spawn_blocking(move || {
                    password.is_some_and(|p| identity::verify_password(&phc, p.expose()))
                })
                .await
                .unwrap_or(false);
                if !proved {
                    return Err((
                        ConnectOutcome::BadCredentials,
                        format!("wrong password for user {:?}", user.rights.name),
                    ));
                }
                Some(user.rights.clone())
            }
            None => None,
        };
        if assigned && user.is_none() {
            return Err((
                ConnectOutcome::BadClientId,
                "an empty client id: a device connects with its device id".to_string(),
            ));
        }
        let password = connect.password.as_ref().map(|p| p.expose());
        let principal = rules
            .admit(
                client_id,
                connect.username.as_deref(),
                password,
                client_chain,
                user,
            )
            .map_err(|refusal| match refusal {
                Refusal::BadClientId(why) => (ConnectOutcome::BadClientId, why),
                Refusal::NotAuthorized(why) => (ConnectOutcome::BadCredentials, why),
            })?;
        if let Some(will) = &connect.will {
            if !self.topic_within_limits(&will.topic) || !principal.may_publish(&will.topic) {
                return Err((
                    ConnectOutcome::NotAuthorized,
                    format!(
                        "will topic {:?} is outside the client's rights",
                        truncated(&will.topic)
                    ),
                ));
            }
        }
        Ok(principal)
    }
}
