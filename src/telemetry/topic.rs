//! Upstream topic templates: where a device's telemetry goes in the cloud
//! (`[telemetry] topic`, default `dt/{thingName}/telemetry{/subtopic}`) and which filter carries
//! its cloud-to-device commands (`[telemetry] commands_topic`, default `cmd/{thingName}/#`).
//!
//! Templates are parsed once at start so that rendering a topic per message is one allocation
//! and no parsing.

use percent_encoding::utf8_percent_encode;

use super::TelemetryError;
use crate::cloud::azure::hub::PROPERTY_SET;
use crate::mqtt::props::STORED_BINARY_CORRELATION_DATA;

/// One piece of a parsed topic template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    ThingName,
    DeviceId,
    /// `{/subtopic}`: `/` + the subtopic, or nothing when the device used none.
    SlashSubtopic,
    /// `{subtopic}`: the subtopic, or nothing.
    Subtopic,
    /// IoT Hub's property bag: `subtopic=` + the percent-encoded subtopic, or nothing (not
    /// available in configured templates).
    SubtopicProperty,
}

/// A parsed telemetry topic template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    source: String,
    parts: Vec<Part>,
    fixed_len: usize,
}

impl TopicTemplate {
    /// Parses a template with the placeholders `{thingName}`, `{deviceId}`, `{/subtopic}` and
    /// `{subtopic}`; wildcards and unknown placeholders are refused.
    pub fn parse(template: &str) -> Result<Self, TelemetryError> {
        let bad = |reason: String| TelemetryError::Topic {
            key: "telemetry.topic",
            template: template.to_string(),
            reason,
        };
        if template.is_empty() {
            return Err(bad("the template is empty".into()));
        }
        if template.contains(['+', '#', '\0']) {
            return Err(bad(
                "a publish topic cannot contain MQTT wildcards ('+', '#') or NUL".into(),
            ));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| bad(format!("unterminated '{{' at {:?}", &rest[open..])))?;
            let part = match &rest[open + 1..close] {
                "thingName" => Part::ThingName,
                "deviceId" => Part::DeviceId,
                "/subtopic" => Part::SlashSubtopic,
                "subtopic" => Part::Subtopic,
                other => {
                    return Err(bad(format!(
                        "unknown placeholder {{{other}}}; use {{thingName}}, {{deviceId}}, {{/subtopic}} or {{subtopic}}"
                    )))
                }
            };
            parts.push(part);
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(bad("'}' without a matching '{'".into()));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        let fixed_len = parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.len(),
                _ => 0,
            })
            .sum();
        Ok(Self {
            source: template.to_string(),
            parts,
            fixed_len,
        })
    }

    /// IoT Hub's device-to-cloud topic, `devices/{deviceId}/messages/events/`, with the
    /// device's subtopic carried as the message property `subtopic` (URL-encoded, as IoT Hub
    /// reads the property bag).
    pub fn azure_events() -> Self {
        let parts = vec![
            Part::Literal("devices/".into()),
            Part::ThingName,
            Part::Literal("/messages/events/".into()),
            Part::SubtopicProperty,
        ];
        Self {
            source: "devices/{thingName}/messages/events/{subtopicProperty}".into(),
            fixed_len: "devices/".len() + "/messages/events/".len(),
            parts,
        }
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The upstream topic for one message.
    pub fn render(&self, thing_name: &str, device_id: &str, subtopic: &str) -> String {
        self.render_with(thing_name, device_id, subtopic, &[])
    }

    /// The upstream topic for one message with its properties: where the template has IoT
    /// Hub's property bag they follow the subtopic, URL-encoded; other templates (MQTT 3.1.1
    /// topics) cannot carry them.
    pub fn render_with(
        &self,
        thing_name: &str,
        device_id: &str,
        subtopic: &str,
        properties: &[(String, String)],
    ) -> String {
        let mut out = String::with_capacity(
            self.fixed_len + thing_name.len().max(device_id.len()) + subtopic.len() + 1,
        );
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::ThingName => out.push_str(thing_name),
                Part::DeviceId => out.push_str(device_id),
                Part::SlashSubtopic if !subtopic.is_empty() => {
                    out.push('/');
                    out.push_str(subtopic);
                }
                Part::SlashSubtopic => {}
                Part::Subtopic => out.push_str(subtopic),
                Part::SubtopicProperty => {
                    let sub = (!subtopic.is_empty()).then_some(("subtopic", subtopic));
                    // Binary correlation data has no place in IoT Hub's string properties.
                    let props = properties
                        .iter()
                        .filter(|(k, _)| k != STORED_BINARY_CORRELATION_DATA)
                        .map(|(k, v)| (k.as_str(), v.as_str()));
                    for (i, (k, v)) in sub.into_iter().chain(props).enumerate() {
                        if i > 0 {
                            out.push('&');
                        }
                        out.extend(utf8_percent_encode(k, PROPERTY_SET));
                        out.push('=');
                        out.extend(utf8_percent_encode(v, PROPERTY_SET));
                    }
                }
            }
        }
        out
    }
}

/// A parsed commands filter template such as `cmd/{thingName}/#`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandFilter {
    source: String,
    /// Text before `{thingName}`.
    before: String,
    /// Text after `{thingName}` without a trailing `#` (e.g. `/`).
    after: String,
    /// The template ends with `#`: any subtopic below `after` matches.
    multi_level: bool,
}

impl CommandFilter {
    /// Parses a filter template containing `{thingName}` exactly once, optionally ending in
    /// `/#`; `+` is not supported (the thing name is the only variable level).
    pub fn parse(template: &str) -> Result<Self, TelemetryError> {
        let bad = |reason: &str| TelemetryError::Topic {
            key: "telemetry.commands_topic",
            template: template.to_string(),
            reason: reason.to_string(),
        };
        let (before, after) = template
            .split_once("{thingName}")
            .ok_or_else(|| bad("it must contain {thingName}"))?;
        if after.contains("{thingName}") {
            return Err(bad("{thingName} may appear only once"));
        }
        if template.contains('+') {
            return Err(bad(
                "'+' is not supported; {thingName} is the variable level",
            ));
        }
        if before.contains(['{', '}', '#']) || after.contains(['{', '}']) {
            return Err(bad("only {thingName} and a trailing '#' are allowed"));
        }
        if !before.is_empty() && !before.ends_with('/') {
            return Err(bad("{thingName} must be a whole topic level"));
        }
        let (after, multi_level) = match after.strip_suffix('#') {
            Some(a) if a.is_empty() || a.ends_with('/') => (a, true),
            Some(_) => return Err(bad("'#' must be a whole, last topic level")),
            None => (after, false),
        };
        if after.contains('#') {
            return Err(bad("'#' must be the last topic level"));
        }
        if !after.is_empty() && !after.starts_with('/') {
            return Err(bad("{thingName} must be a whole topic level"));
        }
        Ok(Self {
            source: template.to_string(),
            before: before.to_string(),
            after: after.to_string(),
            multi_level,
        })
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The MQTT filter to subscribe for one thing.
    pub fn filter(&self, thing_name: &str) -> String {
        format!(
            "{}{}{}{}",
            self.before,
            thing_name,
            self.after,
            if self.multi_level { "#" } else { "" }
        )
    }

    /// Splits a received topic into (thing name, subtopic for `fleetgw/{id}/commands/...`);
    /// `None` when the topic does not match the filter.
    pub fn match_topic<'t>(&self, topic: &'t str) -> Option<(&'t str, Option<&'t str>)> {
        let rest = topic.strip_prefix(self.before.as_str())?;
        let thing_end = rest.find('/').unwrap_or(rest.len());
        let (thing, remainder) = rest.split_at(thing_end);
        if thing.is_empty() {
            return None;
        }
        if !self.multi_level {
            return (remainder == self.after).then_some((thing, None));
        }
        // `a/#` also matches `a` itself (MQTT 3.1.1 §4.7.1.2).
        if remainder == self.after.trim_end_matches('/') {
            return Some((thing, None));
        }
        let sub = remainder.strip_prefix(self.after.as_str())?;
        Some((thing, (!sub.is_empty()).then_some(sub)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iot_hub_topic_carries_the_subtopic_as_an_encoded_property() {
        let t = TopicTemplate::azure_events();
        assert_eq!(
            t.render("dev-1", "dev-1", ""),
            "devices/dev-1/messages/events/"
        );
        assert_eq!(
            t.render("dev-1", "dev-1", "room 1/temp"),
            "devices/dev-1/messages/events/subtopic=room%201%2Ftemp"
        );
        let props = [
            ("$.ct".to_string(), "application/json".to_string()),
            ("site".to_string(), "a&b=c".to_string()),
        ];
        assert_eq!(
            t.render_with("dev-1", "dev-1", "", &props),
            "devices/dev-1/messages/events/%24.ct=application%2Fjson&site=a%26b%3Dc"
        );
        assert_eq!(
            t.render_with("dev-1", "dev-1", "x", &props[..1]),
            "devices/dev-1/messages/events/subtopic=x&%24.ct=application%2Fjson"
        );
        // Binary correlation data (stored as base64) is not an IoT Hub property.
        let binary = [
            ("$.cidb64".to_string(), "AP8=".to_string()),
            ("site".to_string(), "n".to_string()),
        ];
        assert_eq!(
            t.render_with("dev-1", "dev-1", "", &binary),
            "devices/dev-1/messages/events/site=n"
        );
        // AWS templates have no place for them.
        let aws = TopicTemplate::parse("dt/{thingName}/telemetry{/subtopic}").unwrap();
        assert_eq!(aws.render_with("t", "d", "", &props), "dt/t/telemetry");
    }

    #[test]
    fn default_template_renders_with_and_without_subtopic() {
        let t = TopicTemplate::parse("dt/{thingName}/telemetry{/subtopic}").unwrap();
        assert_eq!(t.render("thing-1", "dev-1", ""), "dt/thing-1/telemetry");
        assert_eq!(
            t.render("thing-1", "dev-1", "a/b"),
            "dt/thing-1/telemetry/a/b"
        );
        let t = TopicTemplate::parse("site/{deviceId}/{subtopic}x").unwrap();
        assert_eq!(t.render("t", "d", "s"), "site/d/sx");
    }

    #[test]
    fn bad_templates_name_the_key_and_the_problem() {
        for (tpl, needle) in [
            ("dt/+/x", "wildcards"),
            ("dt/{thing}/x", "unknown placeholder {thing}"),
            ("dt/{thingName", "unterminated"),
            ("dt/}", "without a matching"),
            ("", "empty"),
        ] {
            let msg = TopicTemplate::parse(tpl).unwrap_err().to_string();
            assert!(
                msg.contains("telemetry.topic") && msg.contains(needle),
                "{tpl}: {msg}"
            );
        }
    }

    #[test]
    fn command_filter_renders_and_matches() {
        let f = CommandFilter::parse("cmd/{thingName}/#").unwrap();
        assert_eq!(f.filter("t1"), "cmd/t1/#");
        assert_eq!(
            f.match_topic("cmd/t1/reboot/now"),
            Some(("t1", Some("reboot/now")))
        );
        assert_eq!(f.match_topic("cmd/t1"), Some(("t1", None)));
        assert_eq!(f.match_topic("cmd/t1/"), Some(("t1", None)));
        assert_eq!(f.match_topic("dt/t1/x"), None);
        let f = CommandFilter::parse("things/{thingName}/cmds/#").unwrap();
        assert_eq!(f.filter("t"), "things/t/cmds/#");
        assert_eq!(f.match_topic("things/t/cmds/a"), Some(("t", Some("a"))));
        assert_eq!(f.match_topic("things/t/other/a"), None);
        let f = CommandFilter::parse("{thingName}/inbox").unwrap();
        assert_eq!(f.match_topic("t/inbox"), Some(("t", None)));
        assert_eq!(f.match_topic("t/inbox/x"), None);
    }

    #[test]
    fn bad_command_filters_are_refused() {
        for (tpl, needle) in [
            ("cmd/#", "must contain {thingName}"),
            ("cmd/+/{thingName}", "'+'"),
            ("cmd/x{thingName}/#", "whole topic level"),
            ("cmd/{thingName}/a#", "whole, last"),
            ("cmd/{thingName}/{thingName}", "only once"),
        ] {
            let msg = CommandFilter::parse(tpl).unwrap_err().to_string();
            assert!(
                msg.contains("telemetry.commands_topic") && msg.contains(needle),
                "{tpl}: {msg}"
            );
        }
    }
}
