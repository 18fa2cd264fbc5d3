//! MQTT topic names of the AWS IoT fleet provisioning API.
//!
//! Built by the gateway's claim sessions (publish requests, subscribe to `accepted`/`rejected`)
//! and parsed by the AWS emulator (route an incoming publish to its handler). The downstream
//! broker uses [`is_provisioning_topic`] to keep devices away from the reserved `$aws/` names.

use crate::cloud::codec::PayloadFormat;

const TEMPLATES: &str = "$aws/provisioning-templates/";
const CREATE_FROM_CSR: &str = "$aws/certificates/create-from-csr/";
const CREATE_KEYS: &str = "$aws/certificates/create/";
const PROVISION: &str = "/provision/";
const ACCEPTED: &str = "/accepted";
const REJECTED: &str = "/rejected";

/// CreateCertificateFromCsr request topic, e.g. `$aws/certificates/create-from-csr/json`.
pub fn create_from_csr(fmt: PayloadFormat) -> String {
    concat(&[CREATE_FROM_CSR, fmt.as_str()])
}

/// CreateKeysAndCertificate request topic, e.g. `$aws/certificates/create/json`.
pub fn create_keys(fmt: PayloadFormat) -> String {
    concat(&[CREATE_KEYS, fmt.as_str()])
}

/// RegisterThing request topic, e.g. `$aws/provisioning-templates/{template}/provision/json`.
pub fn register_thing(template: &str, fmt: PayloadFormat) -> String {
    concat(&[TEMPLATES, template, PROVISION, fmt.as_str()])
}

/// The topic AWS answers a successful request on: `{request_topic}/accepted`.
pub fn accepted(request_topic: &str) -> String {
    concat(&[request_topic, ACCEPTED])
}

/// The topic AWS answers a failed request on: `{request_topic}/rejected`.
pub fn rejected(request_topic: &str) -> String {
    concat(&[request_topic, REJECTED])
}

fn concat(parts: &[&str]) -> String {
    let mut topic = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        topic.push_str(part);
    }
    topic
}

/// A fleet provisioning request topic, parsed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProvisioningTopic {
    /// `$aws/certificates/create-from-csr/{fmt}`
    CreateFromCsr(PayloadFormat),
    /// `$aws/certificates/create/{fmt}`
    CreateKeys(PayloadFormat),
    /// `$aws/provisioning-templates/{template}/provision/{fmt}`
    RegisterThing {
        /// Provisioning template name.
        template: String,
        /// Payload format.
        fmt: PayloadFormat,
    },
}

impl ProvisioningTopic {
    /// Payload format named by the topic.
    pub fn format(&self) -> PayloadFormat {
        match self {
            ProvisioningTopic::CreateFromCsr(fmt)
            | ProvisioningTopic::CreateKeys(fmt)
            | ProvisioningTopic::RegisterThing { fmt, .. } => *fmt,
        }
    }

    /// The request topic this value was parsed from (or would be published on).
    pub fn request_topic(&self) -> String {
        match self {
            ProvisioningTopic::CreateFromCsr(fmt) => create_from_csr(*fmt),
            ProvisioningTopic::CreateKeys(fmt) => create_keys(*fmt),
            ProvisioningTopic::RegisterThing { template, fmt } => register_thing(template, *fmt),
        }
    }
}

/// Which answer a response topic carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseKind {
    /// `.../accepted`
    Accepted,
    /// `.../rejected`
    Rejected,
}

/// Parses a request topic; `None` for anything else (including the response topics and MQTT
/// filters with wildcards).
pub fn parse_request_topic(topic: &str) -> Option<ProvisioningTopic> {
    if let Some(fmt) = topic.strip_prefix(CREATE_FROM_CSR) {
        return parse_format(fmt).map(ProvisioningTopic::CreateFromCsr);
    }
    if let Some(fmt) = topic.strip_prefix(CREATE_KEYS) {
        return parse_format(fmt).map(ProvisioningTopic::CreateKeys);
    }
    let rest = topic.strip_prefix(TEMPLATES)?;
    let (template, fmt) = rest.split_once(PROVISION)?;
    if !is_template_name(template) {
        return None;
    }
    Some(ProvisioningTopic::RegisterThing {
        template: template.to_owned(),
        fmt: parse_format(fmt)?,
    })
}

/// Parses an `accepted` / `rejected` response topic into its request and kind.
pub fn parse_response_topic(topic: &str) -> Option<(ProvisioningTopic, ResponseKind)> {
    if let Some(request) = topic.strip_suffix(ACCEPTED) {
        return parse_request_topic(request).map(|t| (t, ResponseKind::Accepted));
    }
    let request = topic.strip_suffix(REJECTED)?;
    parse_request_topic(request).map(|t| (t, ResponseKind::Rejected))
}

fn parse_format(level: &str) -> Option<PayloadFormat> {
    level.parse().ok()
}

/// AWS template names are 1 to 36 characters of `[0-9A-Za-z_-]`.
fn is_template_name(name: &str) -> bool {
    (1..=36).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether a topic or subscription filter is (or may match) a fleet provisioning topic:
/// `$aws/certificates/...`, `$aws/provisioning-templates/...`, or a `$aws/+/...` / `$aws/#`
/// filter that covers them. Errs on the side of `true` because the broker uses it to refuse.
pub fn is_provisioning_topic(topic_or_filter: &str) -> bool {
    let mut levels = topic_or_filter.split('/');
    if levels.next() != Some("$aws") {
        return false;
    }
    matches!(
        levels.next(),
        Some("certificates" | "provisioning-templates" | "+" | "#")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every topic named in seed 002 (AWS fleet provisioning MQTT API), for both formats.
    fn seed_topics(fmt: &str, template: &str) -> Vec<String> {
        vec![
            format!("$aws/certificates/create-from-csr/{fmt}"),
            format!("$aws/certificates/create-from-csr/{fmt}/accepted"),
            format!("$aws/certificates/create-from-csr/{fmt}/rejected"),
            format!("$aws/certificates/create/{fmt}"),
            format!("$aws/certificates/create/{fmt}/accepted"),
            format!("$aws/certificates/create/{fmt}/rejected"),
            format!("$aws/provisioning-templates/{template}/provision/{fmt}"),
            format!("$aws/provisioning-templates/{template}/provision/{fmt}/accepted"),
            format!("$aws/provisioning-templates/{template}/provision/{fmt}/rejected"),
        ]
    }

    #[test]
    fn builders_match_the_seed_topics() {
        for fmt in [PayloadFormat::Json, PayloadFormat::Cbor] {
            let seed = seed_topics(fmt.as_str(), "FleetTemplate");
            let csr = create_from_csr(fmt);
            let keys = create_keys(fmt);
            let reg = register_thing("FleetTemplate", fmt);
            let built = vec![
                csr.clone(),
                accepted(&csr),
                rejected(&csr),
                keys.clone(),
                accepted(&keys),
                rejected(&keys),
                reg.clone(),
                accepted(&reg),
                rejected(&reg),
            ];
            assert_eq!(built, seed);
        }
        assert_eq!(
            create_from_csr(PayloadFormat::Json),
            "$aws/certificates/create-from-csr/json"
        );
        assert_eq!(
            register_thing("t_1-x", PayloadFormat::Cbor),
            "$aws/provisioning-templates/t_1-x/provision/cbor"
        );
    }

    #[test]
    fn parse_request_topic_recognises_every_seed_request_topic() {
        for fmt in [PayloadFormat::Json, PayloadFormat::Cbor] {
            let seed = seed_topics(fmt.as_str(), "FleetTemplate");
            assert_eq!(
                parse_request_topic(&seed[0]),
                Some(ProvisioningTopic::CreateFromCsr(fmt))
            );
            assert_eq!(
                parse_request_topic(&seed[3]),
                Some(ProvisioningTopic::CreateKeys(fmt))
            );
            let reg = ProvisioningTopic::RegisterThing {
                template: "FleetTemplate".into(),
                fmt,
            };
            assert_eq!(parse_request_topic(&seed[6]), Some(reg.clone()));
            assert_eq!(reg.format(), fmt);
            assert_eq!(reg.request_topic(), seed[6]);
            // Response topics are not request topics, but parse as responses.
            for (i, topic) in seed.iter().enumerate() {
                let is_request = i % 3 == 0;
                assert_eq!(parse_request_topic(topic).is_some(), is_request, "{topic}");
                let parsed = parse_response_topic(topic);
                match i % 3 {
                    0 => assert_eq!(parsed, None, "{topic}"),
                    1 => {
                        let (req, kind) = parsed.unwrap();
                        assert_eq!(kind, ResponseKind::Accepted);
                        assert_eq!(req, parse_request_topic(&seed[i - 1]).unwrap());
                    }
                    _ => {
                        let (req, kind) = parsed.unwrap();
                        assert_eq!(kind, ResponseKind::Rejected);
                        assert_eq!(req, parse_request_topic(&seed[i - 2]).unwrap());
                    }
                }
                assert!(is_provisioning_topic(topic), "{topic}");
            }
        }
    }

    #[test]
    fn parse_request_topic_rejects_near_misses() {
        for topic in [
            "",
            "$aws/certificates/create-from-csr/xml",
            "$aws/certificates/create-from-csr/JSON",
            "$aws/certificates/create-from-csr/json/",
            "$aws/certificates/create-from-csr/+",
            "$aws/certificates/create/#",
            "$aws/certificates/delete/json",
            "$aws/provisioning-templates//provision/json",
            "$aws/provisioning-templates/+/provision/json",
            "$aws/provisioning-templates/a/b/provision/json",
            "$aws/provisioning-templates/FleetTemplate/provision",
            "$aws/provisioning-templates/FleetTemplate/provision/json/extra",
            "aws/certificates/create/json",
            "fleetgw/dev-1/provision/json",
        ] {
            assert_eq!(parse_request_topic(topic), None, "{topic:?}");
        }
        let too_long = "a".repeat(37);
        assert_eq!(
            parse_request_topic(&register_thing(&too_long, PayloadFormat::Json)),
            None
        );
        let longest = "a".repeat(36);
        assert!(parse_request_topic(&register_thing(&longest, PayloadFormat::Json)).is_some());
    }

    #[test]
    fn provisioning_topic_filters_are_recognised_conservatively() {
        for yes in [
            "$aws/certificates/#",
            "$aws/provisioning-templates/+/provision/+/accepted",
            "$aws/+/create/json",
            "$aws/#",
            "$aws/certificates",
        ] {
            assert!(is_provisioning_topic(yes), "{yes}");
        }
        for no in [
            "$aws/things/dev/shadow/update",
            "$aws",
            "#",
            "+/certificates/create/json",
            "fleetgw/dev-1/provision/json",
            "aws/certificates/create/json",
        ] {
            assert!(!is_provisioning_topic(no), "{no}");
        }
    }
}
