//! The AWS chapter of the user guide (docs/src/aws-setup.md) asks for exactly what the gateway
//! uses. Its provisioning template is loaded into the emulator with `--templates` and provisions
//! a fleet by the chapter's own run block (tests/docs_blocks.rs); here its IoT policies are
//! evaluated, as AWS IoT evaluates them (actions, resource ARNs with `*` wildcards and the
//! `${iot:Connection.Thing.ThingName}` variable), against the topics and client ids the gateway
//! really uses (built by `cloud::aws::topics` and the config defaults): the claim policy must
//! allow the claim sessions everything they do and nothing a device does, the device policy
//! each device its own topics and not another's. The names the CLI steps create must match
//! the names the template and the config use. (The emulator does not enforce IoT policies,
//! hence this check.)

mod docs_support;

use std::path::Path;

use fleetgw::cloud::aws::topics;
use fleetgw::config::{Config, PayloadFormat};
use serde_json::Value;

use docs_support::{blocks, named_files};

const CHAPTER: &str = "docs/src/aws-setup.md";
const ARN: &str = "arn:aws:iot:eu-west-1:123456789012";

fn file(chapter: &str, name: &str) -> String {
    named_files(Path::new(chapter))
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{chapter}: no file {name}"))
        .1
}

/// A policy document with REGION and ACCOUNT filled in, as the chapter's `sed` does.
struct Policy(Value);

impl Policy {
    fn from(chapter: &str, name: &str) -> Self {
        let text = file(chapter, name)
            .replace("REGION", "eu-west-1")
            .replace("ACCOUNT", "123456789012");
        Policy(serde_json::from_str(&text).expect("the policy is JSON"))
    }

    /// Whether an Allow statement grants `action` on `resource` (an ARN suffix such as
    /// `topic/dt/x/telemetry`) to a connection of `thing`.
    fn allows(&self, action: &str, resource: &str, thing: &str) -> bool {
        let resource = format!("{ARN}:{resource}");
        let list = |v: &Value| -> Vec<String> {
            match v {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a
                    .iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect(),
                _ => vec![],
            }
        };
        self.0["Statement"]
            .as_array()
            .expect("Statement")
            .iter()
            .any(|st| {
                st["Effect"] == "Allow"
                    && list(&st["Action"])
                        .iter()
                        .any(|a| a == action || a == "iot:*")
                    && list(&st["Resource"]).iter().any(|r| {
                        glob(
                            &r.replace("${iot:Connection.Thing.ThingName}", thing),
                            &resource,
                        )
                    })
            })
    }
}

/// AWS policy wildcards: `*` any run of characters, `?` one character.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The template name and gateway id of the chapter's gateway.toml.
fn site_config() -> (String, String) {
    let block = blocks(Path::new(CHAPTER))
        .into_iter()
        .find(|b| b.kind() == Some("check-config"))
        .expect("the chapter's gateway config");
    let config: toml::Value = toml::from_str(&block.text).unwrap();
    (
        config["cloud"]["aws"]["template"]
            .as_str()
            .unwrap()
            .to_string(),
        config["gateway"]["id"].as_str().unwrap().to_string(),
    )
}

#[test]
fn the_claim_policy_allows_the_claim_sessions_and_nothing_else() {
    let policy = Policy::from(CHAPTER, "claim-policy.json");
    let (template, gateway_id) = site_config();
    // the claim sessions' client ids (cli/run.rs: fleetgw-{gateway.id}-claim-{n})
    for n in 1..=4 {
        let client = format!("client/fleetgw-{gateway_id}-claim-{n}");
        assert!(policy.allows("iot:Connect", &client, ""), "{client}");
    }
    for fmt in [PayloadFormat::Json, PayloadFormat::Cbor] {
        for request in [
            topics::create_from_csr(fmt),
            topics::register_thing(&template, fmt),
        ] {
            assert!(
                policy.allows("iot:Publish", &format!("topic/{request}"), ""),
                "publish {request}"
            );
            for answer in [topics::accepted(&request), topics::rejected(&request)] {
                assert!(
                    policy.allows("iot:Subscribe", &format!("topicfilter/{answer}"), ""),
                    "{answer}"
                );
                assert!(
                    policy.allows("iot:Receive", &format!("topic/{answer}"), ""),
                    "{answer}"
                );
            }
        }
    }
    // nothing more: not another template, not the key-generating API, not a device's topics
    let other = topics::register_thing("OtherTemplate", PayloadFormat::Json);
    assert!(!policy.allows("iot:Publish", &format!("topic/{other}"), ""));
    let create_keys = topics::create_keys(PayloadFormat::Json);
    assert!(!policy.allows("iot:Publish", &format!("topic/{create_keys}"), ""));
    assert!(!policy.allows("iot:Publish", "topic/dt/sensor-1/telemetry", ""));
    assert!(!policy.allows("iot:Connect", "client/sensor-1", ""));
}

#[test]
fn the_device_policy_gives_each_device_its_own_topics_only() {
    let policy = Policy::from(CHAPTER, "device-policy.json");
    let defaults = Config::default().telemetry;
    let telemetry = |thing: &str, sub: &str| {
        defaults
            .topic
            .replace("{thingName}", thing)
            .replace("{/subtopic}", sub)
    };
    let commands = |thing: &str| defaults.commands_topic.replace("{thingName}", thing);
    let me = "sensor-1";
    assert!(policy.allows("iot:Connect", &format!("client/{me}"), me));
    assert!(!policy.allows("iot:Connect", "client/sensor-2", me));
    for sub in ["", "/line/a"] {
        let topic = telemetry(me, sub);
        assert!(
            policy.allows("iot:Publish", &format!("topic/{topic}"), me),
            "{topic}"
        );
        let theirs = telemetry("sensor-2", sub);
        assert!(
            !policy.allows("iot:Publish", &format!("topic/{theirs}"), me),
            "{theirs}"
        );
    }
    assert!(policy.allows(
        "iot:Subscribe",
        &format!("topicfilter/{}", commands(me)),
        me
    ));
    assert!(!policy.allows(
        "iot:Subscribe",
        &format!("topicfilter/{}", commands("sensor-2")),
        me
    ));
    assert!(policy.allows("iot:Receive", "topic/cmd/sensor-1/valve/close", me));
    assert!(!policy.allows("iot:Receive", "topic/cmd/sensor-2/valve/close", me));
}

#[test]
fn the_gateway_policy_lets_the_gateway_act_for_every_device() {
    let policy = Policy::from("docs/src/telemetry.md", "gateway-policy.json");
    let gw = "gw-01";
    assert!(policy.allows("iot:Connect", &format!("client/{gw}"), gw));
    for thing in ["sensor-1", "plc-7"] {
        assert!(policy.allows("iot:Publish", &format!("topic/dt/{thing}/telemetry"), gw));
        assert!(policy.allows("iot:Subscribe", &format!("topicfilter/cmd/{thing}/#"), gw));
        assert!(policy.allows("iot:Receive", &format!("topic/cmd/{thing}/x"), gw));
    }
}

#[test]
fn the_names_of_the_cli_steps_match_the_template_and_the_config() {
    let template: Value = serde_json::from_str(&file(CHAPTER, "template.json")).unwrap();
    let resources = template["Resources"].as_object().unwrap();
    let policy_name = resources
        .values()
        .find(|r| r["Type"] == "AWS::IoT::Policy")
        .and_then(|r| r["Properties"]["PolicyName"].as_str())
        .expect("the template attaches a policy");
    let (template_name, _) = site_config();
    let chapter = std::fs::read_to_string(docs_support::root().join(CHAPTER)).unwrap();
    assert!(
        chapter.contains(&format!("--policy-name {policy_name} ")),
        "{policy_name} is created"
    );
    assert!(
        chapter.contains(&format!("--template-name {template_name} ")),
        "{template_name} is created"
    );
    assert!(file(CHAPTER, "claim-policy.json")
        .contains(&format!("provisioning-templates/{template_name}/")));
    // fleetgw's default RegisterThing parameters fill the template's parameters
    let params = Config::default().provision.parameters;
    for (name, spec) in template["Parameters"].as_object().unwrap() {
        assert!(
            params.contains_key(name) || spec.get("Default").is_some(),
            "template parameter {name} is neither sent by fleetgw nor defaulted"
        );
    }
}
