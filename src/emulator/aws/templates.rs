//! Provisioning templates: the subset of the AWS provisioning-template language the emulator
//! evaluates for RegisterThing, the built-in `FleetTemplate`, and the `--templates FILE` format.
//!
//! The file mirrors the CreateProvisioningTemplate API:
//!
//! ```json
//! { "templates": [ {
//!     "templateName": "FleetTemplate",
//!     "templateBody": { "Parameters": {..}, "Resources": {..}, "DeviceConfiguration": {..} },
//!     "preProvisioningHook": { "deny": { "SerialNumber": ["denied-*", "SN-0001"] } }
//! } ] }
//! ```
//!
//! `templateBody` may be the JSON object or, as the AWS CLI passes it, a string holding it.
//! Supported: `Parameters` (`Type`, `Default`), `Resources` of type `AWS::IoT::Thing`
//! (`ThingName`, `AttributePayload`; other properties are accepted and ignored),
//! `AWS::IoT::Certificate` (`Status` `Active`/`Inactive`) and `AWS::IoT::Policy` (accepted,
//! not enforced: the emulator's device policy is "client id = thing name"), and values that
//! are strings, `{"Ref": NAME}` or `{"Fn::Join": [DELIM, [VALUES..]]}`. `Ref` may name a
//! parameter or `AWS::IoT::Certificate::Id`. The pre-provisioning hook stands in for a Lambda
//! that answers `allowProvisioning: false` when a parameter matches one of the patterns (exact,
//! or a prefix ending in `*`). Templates from the file are added to the built-in
//! `FleetTemplate` (a file template with that name replaces it).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::emulator::EmulatorError;

/// Name of the built-in template.
pub const DEFAULT_TEMPLATE: &str = "FleetTemplate";

/// The built-in template: `SerialNumber` required, thing name = serial number, serial numbers
/// starting with `denied-` refused by the pre-provisioning hook.
const DEFAULT_TEMPLATE_FILE: &str = r#"{ "templates": [ {
  "templateName": "FleetTemplate",
  "templateBody": {
    "Parameters": { "SerialNumber": { "Type": "String" } },
    "Resources": {
      "thing": {
        "Type": "AWS::IoT::Thing",
        "Properties": {
          "ThingName": { "Ref": "SerialNumber" },
          "AttributePayload": { "SerialNumber": { "Ref": "SerialNumber" } }
        }
      },
      "certificate": {
        "Type": "AWS::IoT::Certificate",
        "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": "Active" }
      },
      "policy": { "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "FleetDevicePolicy" } }
    },
    "DeviceConfiguration": {
      "TelemetryTopic": { "Fn::Join": ["", ["dt/", { "Ref": "SerialNumber" }, "/telemetry"]] },
      "FirmwareChannel": "stable"
    }
  },
  "preProvisioningHook": { "deny": { "SerialNumber": ["denied-*"] } }
} ] }"#;

/// The built-in certificate-id pseudo parameter.
const CERTIFICATE_ID_REF: &str = "AWS::IoT::Certificate::Id";

/// A template value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expr {
    Literal(String),
    Ref(String),
    Join(String, Vec<Expr>),
}

/// One parsed template.
#[derive(Clone, Debug)]
pub struct Template {
    /// Declared parameters and their defaults.
    parameters: BTreeMap<String, Option<String>>,
    thing_name: Expr,
    attributes: BTreeMap<String, Expr>,
    activate: bool,
    device_configuration: BTreeMap<String, Expr>,
    deny: BTreeMap<String, Vec<String>>,
}

/// What a template produced for one RegisterThing request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluated {
    /// Thing to create or update.
    pub thing_name: String,
    /// Thing attributes.
    pub attributes: BTreeMap<String, String>,
    /// Whether the certificate becomes ACTIVE.
    pub activate: bool,
    /// Device configuration returned to the device.
    pub device_configuration: BTreeMap<String, String>,
}

/// Why a RegisterThing request does not satisfy its template.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// A parameter without a default was not supplied.
    #[error("parameter {0} is required by the template and was not supplied")]
    MissingParameter(String),
    /// The pre-provisioning hook refused the request.
    #[error("pre-provisioning hook denied provisioning: {parameter}={value:?} is not allowed")]
    Denied {
        /// The parameter that matched a deny pattern.
        parameter: String,
        /// Its value.
        value: String,
    },
    /// The evaluated thing name is not a valid AWS thing name.
    #[error("thing name {0:?} is invalid: 1-128 characters of a-z A-Z 0-9 : _ -")]
    InvalidThingName(String),
}

impl Template {
    /// Evaluates the template for `supplied` parameters and the certificate being registered.
    pub fn evaluate(
        &self,
        supplied: &BTreeMap<String, String>,
        certificate_id: &str,
    ) -> Result<Evaluated, EvalError> {
        let mut values: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, default) in &self.parameters {
            match (supplied.get(name), default) {
                (Some(v), _) => values.insert(name, v),
                (None, Some(d)) => values.insert(name, d),
                (None, None) => return Err(EvalError::MissingParameter(name.clone())),
            };
        }
        values.insert(CERTIFICATE_ID_REF, certificate_id);
        for (parameter, patterns) in &self.deny {
            if let Some(value) = values.get(parameter.as_str()) {
                if patterns.iter().any(|p| pattern_matches(p, value)) {
                    return Err(EvalError::Denied {
                        parameter: parameter.clone(),
                        value: (*value).to_string(),
                    });
                }
            }
        }
        let eval_map = |m: &BTreeMap<String, Expr>| {
            m.iter()
                .map(|(k, e)| (k.clone(), eval(e, &values)))
                .collect::<BTreeMap<_, _>>()
        };
        let thing_name = eval(&self.thing_name, &values);
        if !valid_thing_name(&thing_name) {
            return Err(EvalError::InvalidThingName(thing_name));
        }
        Ok(Evaluated {
            thing_name,
            attributes: eval_map(&self.attributes),
            activate: self.activate,
            device_configuration: eval_map(&self.device_configuration),
        })
    }
}

fn eval(expr: &Expr, values: &BTreeMap<&str, &str>) -> String {
    match expr {
        Expr::Literal(s) => s.clone(),
        // Refs are checked against the declared parameters when the template is loaded.
        Expr::Ref(name) => values.get(name.as_str()).copied().unwrap_or("").to_string(),
        Expr::Join(delim, parts) => parts
            .iter()
            .map(|p| eval(p, values))
            .collect::<Vec<_>>()
            .join(delim),
    }
}

fn pattern_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => value == pattern,
    }
}

fn valid_thing_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

/// The templates the emulator serves, by name.
#[derive(Clone, Debug)]
pub struct TemplateSet {
    templates: BTreeMap<String, Template>,
}

impl TemplateSet {
    /// The built-in `FleetTemplate`, plus the templates of `file` if given.
    pub fn load(file: Option<&Path>) -> Result<Self, EmulatorError> {
        let builtin =
            parse_file(DEFAULT_TEMPLATE_FILE).map_err(|reason| EmulatorError::Templates {
                path: "(built-in)".into(),
                reason,
            })?;
        let mut templates = builtin;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| EmulatorError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let loaded = parse_file(&text).map_err(|reason| EmulatorError::Templates {
                path: path.to_path_buf(),
                reason,
            })?;
            templates.extend(loaded);
        }
        Ok(Self { templates })
    }

    /// The template called `name`.
    pub fn get(&self, name: &str) -> Option<&Template> {
        self.templates.get(name)
    }

    /// Template names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.templates.keys().cloned().collect()
    }
}

fn parse_file(text: &str) -> Result<BTreeMap<String, Template>, String> {
    let root: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = root
        .get("templates")
        .and_then(Value::as_array)
        .ok_or("expected an object with a \"templates\" array")?;
    let mut out = BTreeMap::new();
    for (i, entry) in list.iter().enumerate() {
        let name = entry
            .get("templateName")
            .and_then(Value::as_str)
            .ok_or(format!(
                "templates[{i}].templateName: missing or not a string"
            ))?;
        if name.is_empty() || name.contains(['/', '+', '#']) {
            return Err(format!(
                "templates[{i}].templateName {name:?}: must be non-empty without / + #"
            ));
        }
        let template = parse_template(entry).map_err(|e| format!("template {name:?}: {e}"))?;
        if out.insert(name.to_string(), template).is_some() {
            return Err(format!("template {name:?} is defined twice"));
        }
    }
    Ok(out)
}

fn parse_template(entry: &Value) -> Result<Template, String> {
    let body_value = entry.get("templateBody").ok_or("templateBody: missing")?;
    let parsed_body;
    let body = match body_value {
        Value::String(s) => {
            parsed_body = serde_json::from_str::<Value>(s)
                .map_err(|e| format!("templateBody: string is not JSON: {e}"))?;
            &parsed_body
        }
        other => other,
    };
    let body = body.as_object().ok_or("templateBody: not an object")?;

    let mut parameters = BTreeMap::new();
    if let Some(params) = body.get("Parameters") {
        let params = params.as_object().ok_or("Parameters: not an object")?;
        for (name, spec) in params {
            let default = match spec.get("Default") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(_) => return Err(format!("Parameters.{name}.Default: not a string")),
            };
            parameters.insert(name.clone(), default);
        }
    }

    let resources = body
        .get("Resources")
        .and_then(Value::as_object)
        .ok_or("Resources: missing or not an object")?;
    let mut thing = None;
    let mut activate = false;
    for (id, resource) in resources {
        let kind = resource
            .get("Type")
            .and_then(Value::as_str)
            .ok_or(format!("Resources.{id}.Type: missing"))?;
        let props = resource
            .get("Properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let at = |key: &str| format!("Resources.{id}.Properties.{key}");
        match kind {
            "AWS::IoT::Thing" => {
                let name = props
                    .get("ThingName")
                    .ok_or(format!("{}: missing", at("ThingName")))?;
                let name = parse_expr(name, &parameters, &at("ThingName"))?;
                let attributes = match props.get("AttributePayload") {
                    None => BTreeMap::new(),
                    Some(v) => parse_expr_map(v, &parameters, &at("AttributePayload"))?,
                };
                if thing.replace((name, attributes)).is_some() {
                    return Err("more than one AWS::IoT::Thing resource".into());
                }
            }
            "AWS::IoT::Certificate" => {
                activate = match props.get("Status").and_then(Value::as_str) {
                    Some("Active") | Some("ACTIVE") => true,
                    Some("Inactive") | Some("INACTIVE") | None => false,
                    Some(other) => {
                        return Err(format!(
                            "{}: {other:?} is not Active or Inactive",
                            at("Status")
                        ))
                    }
                };
            }
            "AWS::IoT::Policy" => {}
            other => return Err(format!("Resources.{id}.Type: {other:?} is not supported")),
        }
    }
    let (thing_name, attributes) =
        thing.ok_or("Resources: an AWS::IoT::Thing resource is required")?;
    let device_configuration = match body.get("DeviceConfiguration") {
        None => BTreeMap::new(),
        Some(v) => parse_expr_map(v, &parameters, "DeviceConfiguration")?,
    };

    let mut deny = BTreeMap::new();
    if let Some(hook) = entry.get("preProvisioningHook") {
        let rules = hook
            .get("deny")
            .and_then(Value::as_object)
            .ok_or("preProvisioningHook.deny: missing or not an object")?;
        for (param, patterns) in rules {
            let patterns = patterns
                .as_array()
                .ok_or(format!("preProvisioningHook.deny.{param}: not an array"))?
                .iter()
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(format!(
                    "preProvisioningHook.deny.{param}: patterns must be strings"
                ))?;
            deny.insert(param.clone(), patterns);
        }
    }
    Ok(Template {
        parameters,
        thing_name,
        attributes,
        activate,
        device_configuration,
        deny,
    })
}

fn parse_expr_map(
    v: &Value,
    params: &BTreeMap<String, Option<String>>,
    at: &str,
) -> Result<BTreeMap<String, Expr>, String> {
    let obj: &Map<String, Value> = v.as_object().ok_or(format!("{at}: not an object"))?;
    obj.iter()
        .map(|(k, v)| Ok((k.clone(), parse_expr(v, params, &format!("{at}.{k}"))?)))
        .collect()
}

fn parse_expr(
    v: &Value,
    params: &BTreeMap<String, Option<String>>,
    at: &str,
) -> Result<Expr, String> {
    match v {
        Value::String(s) => Ok(Expr::Literal(s.clone())),
        Value::Number(n) => Ok(Expr::Literal(n.to_string())),
        Value::Bool(b) => Ok(Expr::Literal(b.to_string())),
        Value::Object(obj) if obj.len() == 1 => {
            if let Some(name) = obj.get("Ref") {
                let name = name.as_str().ok_or(format!("{at}.Ref: not a string"))?;
                if name != CERTIFICATE_ID_REF && !params.contains_key(name) {
                    return Err(format!("{at}.Ref: {name:?} is not a declared parameter"));
                }
                return Ok(Expr::Ref(name.to_string()));
            }
            if let Some(join) = obj.get("Fn::Join") {
                let parts = join.as_array().filter(|a| a.len() == 2);
                let (delim, list) = match parts.map(|a| (&a[0], &a[1])) {
                    Some((Value::String(d), Value::Array(list))) => (d, list),
                    _ => return Err(format!("{at}.Fn::Join: expected [DELIMITER, [VALUES..]]")),
                };
                let items = list
                    .iter()
                    .enumerate()
                    .map(|(i, item)| parse_expr(item, params, &format!("{at}.Fn::Join[1][{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Expr::Join(delim.clone(), items));
            }
            Err(format!(
                "{at}: only strings, Ref and Fn::Join are supported"
            ))
        }
        _ => Err(format!(
            "{at}: only strings, Ref and Fn::Join are supported"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::codec::test_util::params;

    #[test]
    fn builtin_template_derives_the_thing_from_the_serial_number() {
        let set = TemplateSet::load(None).unwrap();
        assert_eq!(set.names(), [DEFAULT_TEMPLATE]);
        let t = set.get(DEFAULT_TEMPLATE).unwrap();
        let out = t
            .evaluate(&params(&[("SerialNumber", "sn-1")]), "cid")
            .unwrap();
        assert_eq!(out.thing_name, "sn-1");
        assert!(out.activate);
        assert_eq!(out.attributes["SerialNumber"], "sn-1");
        assert_eq!(
            out.device_configuration["TelemetryTopic"],
            "dt/sn-1/telemetry"
        );
        assert_eq!(
            t.evaluate(&params(&[]), "cid"),
            Err(EvalError::MissingParameter("SerialNumber".into()))
        );
        assert!(matches!(
            t.evaluate(&params(&[("SerialNumber", "denied-7")]), "cid"),
            Err(EvalError::Denied { .. })
        ));
        assert!(matches!(
            t.evaluate(&params(&[("SerialNumber", "a.b")]), "cid"),
            Err(EvalError::InvalidThingName(_))
        ));
    }

    #[test]
    fn file_templates_with_string_bodies_defaults_and_joins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let body = serde_json::json!({
            "Parameters": {"Serial": {"Type": "String"}, "Site": {"Type": "String", "Default": "lab"}},
            "Resources": {
                "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                    "ThingName": {"Fn::Join": ["_", ["plant", {"Ref": "Site"}, {"Ref": "Serial"}]]},
                    "AttributePayload": {"cert": {"Ref": "AWS::IoT::Certificate::Id"}}}},
                "cert": {"Type": "AWS::IoT::Certificate", "Properties": {"Status": "Inactive"}}
            }
        });
        let file = serde_json::json!({"templates": [
            {"templateName": "Plant", "templateBody": body.to_string(),
             "preProvisioningHook": {"deny": {"Serial": ["X1"]}}}
        ]});
        std::fs::write(&path, file.to_string()).unwrap();
        let set = TemplateSet::load(Some(&path)).unwrap();
        assert_eq!(set.names(), ["FleetTemplate", "Plant"]);
        let t = set.get("Plant").unwrap();
        let out = t.evaluate(&params(&[("Serial", "42")]), "abc").unwrap();
        assert_eq!(out.thing_name, "plant_lab_42");
        assert_eq!(out.attributes["cert"], "abc");
        assert!(!out.activate);
        assert!(t.evaluate(&params(&[("Serial", "X1")]), "abc").is_err());
        assert!(t.evaluate(&params(&[("Serial", "X10")]), "abc").is_ok());
    }

    #[test]
    fn errors_name_the_template_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let file = serde_json::json!({"templates": [{"templateName": "T", "templateBody": {
            "Resources": {"thing": {"Type": "AWS::IoT::Thing",
                "Properties": {"ThingName": {"Ref": "Nope"}}}}}}]});
        std::fs::write(&path, file.to_string()).unwrap();
        let err = TemplateSet::load(Some(&path)).unwrap_err().to_string();
        assert!(
            err.contains("template \"T\": Resources.thing.Properties.ThingName.Ref: \"Nope\" is not a declared parameter"),
            "{err}"
        );
    }
}
