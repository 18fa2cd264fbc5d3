//! The Azure emulator's DIR: credentials (root CA, server certificate, X.509 group CA), the
//! scope and symmetric group keys (`azure.json`), and the discovery files written once the
//! listeners are bound (`gateway.toml`, then `emulator.json`, whose appearance means ready).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::{Groups, SymmetricGroup, X509Group};
use super::AzureEmulatorHandle;
use crate::clock;
use crate::emulator::dir::{self, read_opt, write, write_secret};
use crate::emulator::EmulatorError;
use crate::identity::{self, CertificateAuthority, PrivateKey};

/// X.509 group CA certificate file.
pub const GROUP_CA_CERT: &str = "group-ca.pem";
/// X.509 group CA key file.
pub const GROUP_CA_KEY: &str = "group-ca.key";
const CA_CN: &str = "fleetgw Azure emulator root CA";
const GROUP_CA_CN: &str = "fleetgw Azure emulator X.509 group CA";
const SERVER_CN: &str = "fleetgw Azure emulator";
const VALIDITY_DAYS: u32 = 3650;
/// Enrollment group names.
const SYMMETRIC_GROUP: &str = "fleetgw-symmetric";
const X509_GROUP: &str = "fleetgw-x509";

/// The emulator's TLS and group credentials.
pub struct Pki {
    /// Root CA certificate.
    pub ca_pem: String,
    /// Server certificate (leaf, issued by the root).
    pub server_pem: String,
    /// Its key.
    pub server_key: PrivateKey,
    /// The X.509 group CA certificate.
    pub group_ca_pem: String,
}

fn identity_err(what: impl Into<String>) -> impl FnOnce(identity::IdentityError) -> EmulatorError {
    let what = what.into();
    move |source| EmulatorError::Identity { what, source }
}

/// Loads `{name}.pem` + `{name}.key` as a CA, or generates one with `generate`.
fn load_or_create_ca(
    dir: &Path,
    name: &str,
    generate: impl FnOnce() -> Result<CertificateAuthority, identity::IdentityError>,
) -> Result<CertificateAuthority, EmulatorError> {
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    match (read_opt(&cert_path)?, read_opt(&key_path)?) {
        (Some(cert), Some(key)) => CertificateAuthority::from_pem(&cert, &key)
            .map_err(identity_err(cert_path.display().to_string())),
        (None, None) => {
            let ca = generate().map_err(identity_err(format!("emulator {name}")))?;
            write_secret(&key_path, &ca.key_pem())?;
            write(&cert_path, ca.cert_pem().as_bytes(), 0o644)?;
            Ok(ca)
        }
        _ => Err(EmulatorError::Corrupt {
            path: dir.to_path_buf(),
            reason: format!("{name}.pem and {name}.key must both exist or both be absent"),
        }),
    }
}

impl Pki {
    /// Loads or creates the credentials; the server certificate is reissued when its SAN list
    /// (the listen IPs and the hub host) changed or it no longer chains to the root.
    pub fn load_or_create(
        dir: &Path,
        listen_ips: &[IpAddr],
        hub_host: &str,
    ) -> Result<Self, EmulatorError> {
        let ca = load_or_create_ca(dir, "ca", || CertificateAuthority::generate(CA_CN))?;
        let group_ca = load_or_create_ca(dir, "group-ca", || ca.issue_intermediate(GROUP_CA_CN))?;

        let mut ips: Vec<IpAddr> = listen_ips.to_vec();
        let mut dns: Vec<String> = vec!["localhost".into()];
        match hub_host.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(hub_host.to_string()),
        }
        ips.sort();
        ips.dedup();
        dns.sort();
        dns.dedup();
        let sans = ips
            .iter()
            .map(|ip| format!("IP:{ip}"))
            .chain(dns.iter().map(|d| format!("DNS:{d}")))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";

        let (cert_path, key_path, sans_path) = (
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("server.sans"),
        );
        let existing = match (
            read_opt(&cert_path)?,
            read_opt(&key_path)?,
            read_opt(&sans_path)?,
        ) {
            (Some(pem), Some(key_pem), Some(old_sans)) if old_sans == sans => {
                let key = PrivateKey::from_pem(&key_pem)
                    .map_err(identity_err(key_path.display().to_string()))?;
                let valid = identity::verify_chain(&pem, ca.cert_pem(), clock::unix_secs()).is_ok()
                    && identity::cert_matches_key(&pem, &key).unwrap_or(false);
                valid.then_some((pem, key))
            }
            _ => None,
        };
        let (server_pem, server_key) = match existing {
            Some(pair) => pair,
            None => {
                let dns_refs: Vec<&str> = dns.iter().map(String::as_str).collect();
                let (pem, key) = ca
                    .issue_server(SERVER_CN, &dns_refs, &ips, VALIDITY_DAYS)
                    .map_err(identity_err("emulator server certificate"))?;
                write_secret(&key_path, &key.to_pkcs8_pem())?;
                write(&cert_path, pem.as_bytes(), 0o644)?;
                write(&sans_path, sans.as_bytes(), 0o644)?;
                tracing::info!(sans = %sans.trim().replace('\n', ", "), "Azure emulator issued its server certificate");
                (pem, key)
            }
        };
        Ok(Self {
            ca_pem: ca.cert_pem().to_string(),
            server_pem,
            server_key,
            group_ca_pem: group_ca.cert_pem().to_string(),
        })
    }
}

/// `azure.json`: what must stay the same across restarts for devices to keep working.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    /// The DPS ID scope.
    pub id_scope: String,
    /// The symmetric-key group.
    pub symmetric: SymmetricKeys,
    /// The X.509 group's name.
    pub x509_group: String,
}

/// The symmetric-key group as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SymmetricKeys {
    /// Group name.
    pub name: String,
    /// Primary key, base64 of 64 random bytes (as DPS generates them).
    pub primary_key: String,
    /// Secondary key.
    pub secondary_key: String,
}

impl Identity {
    /// Loads `DIR/azure.json` or creates it with a fresh scope and keys.
    pub fn load_or_create(dir: &Path) -> Result<Self, EmulatorError> {
        let path = dir.join("azure.json");
        if let Some(text) = read_opt(&path)? {
            let ident: Identity =
                serde_json::from_str(&text).map_err(|e| EmulatorError::Corrupt {
                    path: path.clone(),
                    reason: format!("not an Azure emulator identity file: {e}"),
                })?;
            return Ok(ident);
        }
        let key = || {
            let mut bytes = rand::random::<[u8; 32]>().to_vec();
            bytes.extend_from_slice(&rand::random::<[u8; 32]>());
            BASE64.encode(bytes)
        };
        let ident = Identity {
            // DPS scopes look like 0ne00ABCDEF: "0ne" and eight upper-case hex digits.
            id_scope: format!("0ne{}", hex::encode_upper(rand::random::<[u8; 4]>())),
            symmetric: SymmetricKeys {
                name: SYMMETRIC_GROUP.into(),
                primary_key: key(),
                secondary_key: key(),
            },
            x509_group: X509_GROUP.into(),
        };
        let json = serde_json::to_vec_pretty(&ident).map_err(|e| EmulatorError::Corrupt {
            path: path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        write_secret(&path, &identity::Secret::new(json))?;
        Ok(ident)
    }

    /// The enrollment groups with decoded keys.
    pub fn groups(&self, dir: &Path, group_ca_pem: &str) -> Result<Groups, EmulatorError> {
        let decode = |field: &str, value: &str| {
            BASE64.decode(value).map_err(|e| EmulatorError::Corrupt {
                path: dir.join("azure.json"),
                reason: format!("symmetric.{field} is not base64: {e}"),
            })
        };
        Ok(Groups {
            symmetric: SymmetricGroup {
                name: self.symmetric.name.clone(),
                primary: decode("primaryKey", &self.symmetric.primary_key)?,
                secondary: decode("secondaryKey", &self.symmetric.secondary_key)?,
            },
            x509: X509Group {
                name: self.x509_group.clone(),
                ca_pem: group_ca_pem.to_string(),
            },
        })
    }
}

/// `gateway.toml`, then `emulator.json`.
pub fn write_discovery_files(handle: &AzureEmulatorHandle) -> Result<(), EmulatorError> {
    let path_str = |p: PathBuf| p.display().to_string();
    let e = handle.endpoints();
    let discovery = json!({
        "idScope": handle.id_scope(),
        "dpsMqtt": e.dps_mqtt.to_string(),
        "dpsHttps": e.dps_https.to_string(),
        "hubMqtt": e.hub_mqtt.to_string(),
        "hubHttps": e.hub_https.to_string(),
        "hubHost": e.hub_host,
        "api": handle.api_url(),
        "ca": path_str(handle.ca_path()),
        "groups": {
            "symmetricKey": {
                "name": handle.identity.symmetric.name,
                "primaryKey": handle.primary_key(),
                "secondaryKey": handle.secondary_key(),
            },
            "x509": {
                "name": handle.identity.x509_group,
                "caCert": path_str(handle.group_ca_cert_path()),
                "caKey": path_str(handle.group_ca_key_path()),
            },
        },
    });
    // emulator.json holds the group keys, hence 0600 like azure.json.
    dir::write_discovery(handle.dir(), gateway_toml(handle), &discovery, 0o600)
}

/// A fleetgw config for this emulator: DPS over MQTT with the symmetric-key group, telemetry
/// to the emulated hub over MQTT. The header says how to switch to X.509 or HTTPS.
fn gateway_toml(handle: &AzureEmulatorHandle) -> Result<String, toml::ser::Error> {
    use toml::{Table, Value};
    let s = |v: String| Value::String(v);
    let section = dir::toml_section;
    let dir = handle.dir();
    let mut cloud = Table::new();
    cloud.insert("provider".into(), s("azure".into()));
    cloud.insert(
        "azure".into(),
        section(vec![
            ("id_scope", s(handle.id_scope().to_string())),
            ("dps_endpoint", s(handle.endpoints().dps_mqtt.to_string())),
            ("transport", s("mqtt".into())),
            ("attestation", s("symmetric-key".into())),
            ("ca", s(handle.ca_path().display().to_string())),
            ("group_key", s(handle.primary_key().to_string())),
            ("hub_transport", s("mqtt".into())),
            ("hub_connect", s(handle.endpoints().hub_mqtt.to_string())),
        ]),
    );
    let mut root = dir::gateway_toml_base(dir);
    root.insert("cloud".into(), Value::Table(cloud));
    let e = handle.endpoints();
    Ok(format!(
        "# Written by `fleetgw emulate azure`: a gateway config naming the emulated DPS and IoT Hub\n\
         # in {}.\n# The ID scope, addresses and group keys are also in emulator.json.\n\
         # X.509 instead of the symmetric-key group: attestation = \"x509\",\n\
         #   group_ca_cert = \"{}\", group_ca_key = \"{}\".\n\
         # DPS over HTTPS: transport = \"https\", dps_endpoint = \"{}\".\n\
         # Telemetry over HTTPS: hub_transport = \"https\", hub_connect = \"{}\".\n\n{}",
        dir.display(),
        handle.group_ca_cert_path().display(),
        handle.group_ca_key_path().display(),
        e.dps_https,
        e.hub_https,
        toml::to_string(&root)?
    ))
}
