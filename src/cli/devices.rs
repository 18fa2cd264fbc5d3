//! `fleetgw devices ...` and `fleetgw status`: the admin API from a shell, as tables or, with
//! `--json`, as JSON for scripts. `devices list` walks every page (`nextLink`) itself.

use std::process::ExitCode;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use hyper::Method;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;

use super::admin_client::{call, CliFailure, SocketArgs};

/// Arguments of `fleetgw devices`.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub socket: SocketArgs,

    #[command(subcommand)]
    pub command: DevicesCommand,
}

/// The verbs of `fleetgw devices`.
#[derive(Debug, clap::Subcommand)]
pub enum DevicesCommand {
    /// List devices (every page), optionally filtered and ordered.
    List {
        /// An OData-like filter, e.g. "status eq 'failed'" or "contains(displayName, 'pump')".
        #[arg(long, value_name = "EXPR")]
        filter: Option<String>,
        /// Sort field and direction, e.g. "updatedAt desc" (id breaks ties).
        #[arg(long, value_name = "F")]
        orderby: Option<String>,
    },
    /// Show one device.
    Show {
        /// Device id.
        id: String,
    },
    /// Approve a device waiting for approval; provisioning starts.
    Approve {
        /// Device id.
        id: String,
    },
    /// Block a device: its requests are refused and its connection closed.
    Block {
        /// Device id.
        id: String,
    },
    /// Unblock a device (back to waiting for approval in approve mode).
    Unblock {
        /// Device id.
        id: String,
    },
    /// Delete a device with its key and token; its connection is closed.
    Delete {
        /// Device id.
        id: String,
    },
    /// Get the device a new certificate (and key, unless it brought its own CSR); the old
    /// certificate is refused from now on. Prints the operation; --wait waits for its end.
    Reprovision {
        /// Device id.
        id: String,
        /// Wait until the operation ends (exit 70 when it failed).
        #[arg(long)]
        wait: bool,
    },
    /// Write the device's certificate (DIR/ID.crt) and, when the gateway generated it, its
    /// private key (DIR/ID.key), both 0600; never overwrites (root only, for the key).
    Export {
        /// Device id.
        id: String,
        /// Directory to write to.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

/// Arguments of `fleetgw enrollment`.
#[derive(Debug, clap::Args)]
pub struct EnrollmentArgs {
    #[command(flatten)]
    pub socket: SocketArgs,

    #[command(subcommand)]
    pub command: EnrollmentCommand,
}

/// The verbs of `fleetgw enrollment`.
#[derive(Debug, clap::Subcommand)]
pub enum EnrollmentCommand {
    /// List enrollment groups (keys redacted).
    List,
    /// Show one group.
    Show {
        /// Group id.
        id: String,
    },
    /// Create (or replace) a group; symmetricKey groups get generated keys.
    Create {
        /// Group id.
        id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// Attestation: symmetricKey or x509.
        #[arg(long = "type", value_name = "TYPE", default_value = "symmetricKey")]
        kind: String,
    },
    /// Print a symmetricKey group's keys (admin.group members only).
    Keys {
        /// Group id.
        id: String,
    },
    /// Enable a group.
    Enable {
        /// Group id.
        id: String,
    },
    /// Disable a group: its devices are no longer admitted.
    Disable {
        /// Group id.
        id: String,
    },
    /// Delete a group.
    Delete {
        /// Group id.
        id: String,
    },
}

/// Runs `fleetgw enrollment ...`.
pub fn enrollment(args: EnrollmentArgs) -> ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let socket = args.socket.socket_path()?;
            let path = |id: &str| format!("/enrollmentGroups/{}", enc(id));
            let reply = match &args.command {
                EnrollmentCommand::List => {
                    call(&socket, Method::GET, "/enrollmentGroups", None).await?
                }
                EnrollmentCommand::Show { id } => {
                    call(&socket, Method::GET, &path(id), None).await?
                }
                EnrollmentCommand::Create { id, name, kind } => {
                    let body = serde_json::json!({
                        "displayName": name.clone().unwrap_or_else(|| id.clone()),
                        "attestation": {"type": kind},
                    });
                    call(&socket, Method::PUT, &path(id), Some(&body)).await?
                }
                EnrollmentCommand::Keys { id } => {
                    call(&socket, Method::GET, &format!("{}/keys", path(id)), None).await?
                }
                EnrollmentCommand::Enable { id } | EnrollmentCommand::Disable { id } => {
                    let enabled = matches!(args.command, EnrollmentCommand::Enable { .. });
                    let body = serde_json::json!({ "enabled": enabled });
                    call(&socket, Method::PATCH, &path(id), Some(&body)).await?
                }
                EnrollmentCommand::Delete { id } => {
                    call(&socket, Method::DELETE, &path(id), None).await?
                }
            };
            let v = reply.ok()?.json();
            if args.socket.json || matches!(args.command, EnrollmentCommand::Keys { .. }) {
                if !v.is_null() {
                    println!("{v}");
                }
                return Ok(());
            }
            let groups = match v.get("value").and_then(Value::as_array) {
                Some(list) => list.clone(),
                None if v.is_null() => return Ok(()),
                None => vec![v],
            };
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(["ID", "NAME", "TYPE", "ENABLED", "CERTIFICATES", "UPDATED"]);
            for g in &groups {
                let certs = g["attestation"]["x509"]["signingCertificates"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, c)| {
                                format!(
                                    "{k}{}",
                                    if c["verified"] == true {
                                        " (verified)"
                                    } else {
                                        " (unverified)"
                                    }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                t.add_row([
                    text(&g["id"]),
                    text(&g["displayName"]),
                    text(&g["attestation"]["type"]),
                    text(&g["enabled"]),
                    certs,
                    text(&g["updatedAt"]),
                ]);
            }
            println!("{t}");
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

/// Arguments of `fleetgw ops`.
#[derive(Debug, clap::Args)]
pub struct OpsArgs {
    #[command(flatten)]
    pub socket: SocketArgs,

    #[command(subcommand)]
    pub command: OpsCommand,
}

/// The verbs of `fleetgw ops`.
#[derive(Debug, clap::Subcommand)]
pub enum OpsCommand {
    /// Show an operation (e.g. a reprovisioning); --wait waits for its end.
    Show {
        /// Operation id.
        id: String,
        /// Wait until it ends (exit 70 when it failed).
        #[arg(long)]
        wait: bool,
    },
}

/// Longest `--wait`.
const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(20 * 60);

async fn wait_operation(socket: &std::path::Path, location: &str) -> Result<Value, CliFailure> {
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    loop {
        let reply = call(socket, Method::GET, location, None).await?.ok()?;
        let op = reply.json();
        if op["status"] != "Running" {
            return Ok(op);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CliFailure::new(
                super::EX_SOFTWARE,
                format!("{location} still running after {} minutes; check it later with `fleetgw ops show`", WAIT_LIMIT.as_secs() / 60),
            ));
        }
        // The server's Retry-After, bounded: 1 s by default.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn print_operation(op: &Value, json: bool) -> Result<(), CliFailure> {
    if json {
        println!("{op}");
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        for (label, key) in [
            ("id", "id"),
            ("kind", "kind"),
            ("device", "deviceId"),
            ("status", "status"),
            ("previous certificate", "previousCertificateId"),
            ("new certificate", "certificateId"),
            ("created", "createdAt"),
            ("updated", "updatedAt"),
        ] {
            if !op[key].is_null() {
                t.add_row([label.to_string(), text(&op[key])]);
            }
        }
        if !op["error"].is_null() {
            t.add_row([
                "error".to_string(),
                format!(
                    "{}: {}",
                    text(&op["error"]["code"]),
                    text(&op["error"]["message"])
                ),
            ]);
        }
        println!("{t}");
    }
    if op["status"] == "Failed" {
        return Err(CliFailure::new(
            super::EX_SOFTWARE,
            format!(
                "operation {} failed: {}; see `fleetgw devices show {}`",
                text(&op["id"]),
                text(&op["error"]["message"]),
                text(&op["deviceId"])
            ),
        ));
    }
    Ok(())
}

/// Runs `fleetgw ops ...`.
pub fn ops(args: OpsArgs) -> ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let socket = args.socket.socket_path()?;
            let OpsCommand::Show { id, wait } = &args.command;
            let location = format!("/operations/{}", enc(id));
            let op = if *wait {
                wait_operation(&socket, &location).await?
            } else {
                call(&socket, Method::GET, &location, None)
                    .await?
                    .ok()?
                    .json()
            };
            print_operation(&op, args.socket.json)
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

/// Arguments of `fleetgw status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
}

fn runtime() -> Result<tokio::runtime::Runtime, CliFailure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliFailure::new(super::EX_SOFTWARE, format!("starting the runtime: {e}")))
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// Runs `fleetgw devices ...`.
pub fn run(args: DevicesArgs) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(devices(args))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

async fn devices(args: DevicesArgs) -> Result<(), CliFailure> {
    let socket = args.socket.socket_path()?;
    let json = args.socket.json;
    let (method, path) = match &args.command {
        DevicesCommand::List { filter, orderby } => {
            let mut path = "/devices?maxpagesize=100".to_string();
            if let Some(f) = filter {
                path.push_str(&format!("&%24filter={}", enc(f)));
            }
            if let Some(o) = orderby {
                path.push_str(&format!("&%24orderby={}", enc(o)));
            }
            let mut all = Vec::new();
            let mut next = Some(path);
            while let Some(p) = next.take() {
                let page = call(&socket, Method::GET, &p, None).await?.ok()?.json();
                if let Some(items) = page["value"].as_array() {
                    all.extend(items.iter().cloned());
                }
                next = page["nextLink"].as_str().map(str::to_string);
            }
            if json {
                println!("{}", Value::Array(all));
            } else {
                print_devices(&all);
            }
            return Ok(());
        }
        DevicesCommand::Show { id } => (Method::GET, format!("/devices/{}", enc(id))),
        DevicesCommand::Approve { id } => (Method::POST, format!("/devices/{}/approve", enc(id))),
        DevicesCommand::Block { id } => (Method::POST, format!("/devices/{}/block", enc(id))),
        DevicesCommand::Unblock { id } => (Method::POST, format!("/devices/{}/unblock", enc(id))),
        DevicesCommand::Delete { id } => (Method::DELETE, format!("/devices/{}", enc(id))),
        DevicesCommand::Export { id, out } => return export(&socket, id, out, json).await,
        DevicesCommand::Reprovision { id, wait } => {
            let reply = call(
                &socket,
                Method::POST,
                &format!("/devices/{}/reprovision", enc(id)),
                None,
            )
            .await?
            .ok()?;
            let op = reply.json();
            let op = if *wait {
                let location = format!("/operations/{}", text(&op["id"]));
                wait_operation(&socket, &location).await?
            } else {
                op
            };
            return print_operation(&op, json);
        }
    };
    let reply = call(&socket, method, &path, None).await?.ok()?;
    if let DevicesCommand::Delete { id } = &args.command {
        if reply.status == hyper::StatusCode::NO_CONTENT {
            return Err(CliFailure::new(
                super::EX_SOFTWARE,
                format!("no device {id:?}; `fleetgw devices list` shows the ids"),
            ));
        }
    }
    let v = reply.json();
    if json {
        println!("{v}");
    } else {
        print_device(&v);
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_devices(devices: &[Value]) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "ID",
        "NAME",
        "STATUS",
        "STATE",
        "ENABLED",
        "THING",
        "LAST ERROR",
        "UPDATED",
    ]);
    for d in devices {
        t.add_row([
            text(&d["id"]),
            text(&d["displayName"]),
            text(&d["status"]),
            text(&d["state"]),
            text(&d["enabled"]),
            text(&d["thingName"]),
            text(&d["lastError"]["errorCode"]),
            text(&d["updatedAt"]),
        ]);
    }
    println!("{t}");
    println!("{} device(s)", devices.len());
}

fn print_device(d: &Value) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    let fields = [
        ("id", "id"),
        ("display name", "displayName"),
        ("status", "status"),
        ("state", "state"),
        ("enabled", "enabled"),
        ("approved", "approved"),
        ("provisioned", "provisioned"),
        ("thing name", "thingName"),
        ("certificate id", "certificateId"),
        ("attempts", "attempts"),
        ("created", "createdAt"),
        ("updated", "updatedAt"),
        ("etag", "etag"),
    ];
    for (label, key) in fields {
        if !d[key].is_null() {
            t.add_row([label.to_string(), text(&d[key])]);
        }
    }
    if let Some(e) = d.get("lastError").filter(|e| !e.is_null()) {
        t.add_row([
            "last error".to_string(),
            format!(
                "{} {}: {}",
                text(&e["statusCode"]),
                text(&e["errorCode"]),
                text(&e["errorMessage"])
            ),
        ]);
    }
    if let Some(c) = d.get("connection").filter(|c| !c.is_null()) {
        t.add_row([
            "connected from".to_string(),
            format!(
                "{} (tls: {}, authenticated: {})",
                text(&c["remoteAddress"]),
                text(&c["tls"]),
                text(&c["authenticated"])
            ),
        ]);
    }
    println!("{t}");
}

/// Runs `fleetgw status`.
pub fn status(args: StatusArgs) -> ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let socket = args.socket.socket_path()?;
            let v = call(&socket, Method::GET, "/status", None)
                .await?
                .ok()?
                .json();
            if args.socket.json {
                println!("{v}");
                return Ok(());
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.add_row(["version".to_string(), text(&v["version"])]);
            t.add_row(["uptime (s)".to_string(), text(&v["uptimeSecs"])]);
            t.add_row(["admission mode".to_string(), text(&v["admissionMode"])]);
            if let Some(devs) = v["devices"].as_object() {
                for (status, n) in devs {
                    t.add_row([format!("devices {status}"), text(n)]);
                }
            }
            t.add_row([
                "provisioning now".to_string(),
                text(&v["provisioningActive"]),
            ]);
            t.add_row(["outbox messages".to_string(), text(&v["outboxMessages"])]);
            t.add_row(["outbox bytes".to_string(), text(&v["outboxBytes"])]);
            t.add_row(["upstream links".to_string(), text(&v["upstreamLinks"])]);
            if !v["brokerSessions"].is_null() {
                t.add_row(["broker sessions".to_string(), text(&v["brokerSessions"])]);
            }
            let store = &v["store"];
            let mut state = text(&store["state"]);
            if !store["error"].is_null() {
                state = format!(
                    "{state} since {} ms: {}",
                    text(&store["fullSinceMs"]),
                    text(&store["error"])
                );
            }
            t.add_row(["store".to_string(), state]);
            t.add_row(["store path".to_string(), text(&store["path"])]);
            t.add_row([
                "store full episodes".to_string(),
                format!(
                    "{} (reopens {})",
                    text(&store["fullEpisodes"]),
                    text(&store["reopens"])
                ),
            ]);
            println!("{t}");
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

/// `devices export`: fetches the credentials (with the private key) and writes them without
/// ever replacing a file: each is written to a temporary name (fsynced, 0600) and then
/// hard-linked to its final name, which fails if the name exists.
async fn export(
    socket: &std::path::Path,
    id: &str,
    out: &std::path::Path,
    json: bool,
) -> Result<(), CliFailure> {
    let v = call(
        socket,
        Method::GET,
        &format!("/devices/{}/credentials?includePrivateKey=true", enc(id)),
        None,
    )
    .await?
    .ok()?
    .json();
    let Some(cert) = v["x509"]["certificatePem"].as_str() else {
        return Err(CliFailure::new(
            super::EX_SOFTWARE,
            format!("device {id} has no certificate yet; see `fleetgw devices show {id}`"),
        ));
    };
    let mut files = vec![(out.join(format!("{id}.crt")), cert.to_string())];
    if let Some(key) = v["privateKey"].as_str() {
        files.push((out.join(format!("{id}.key")), key.to_string()));
    }
    for (path, _) in &files {
        if path.exists() {
            return Err(CliFailure::new(
                super::admin_client::EX_CANTCREAT,
                format!(
                    "{} exists; move it away or choose another --out",
                    path.display()
                ),
            ));
        }
    }
    for (path, text) in &files {
        write_new(path, text.as_bytes())?;
    }
    let written: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    if json {
        println!("{}", serde_json::json!({ "written": written }));
    } else {
        for w in &written {
            println!("wrote {w}");
        }
        if files.len() == 1 {
            println!("no private key: the device made its own (it sent a CSR)");
        }
    }
    Ok(())
}

fn write_new(path: &std::path::Path, bytes: &[u8]) -> Result<(), CliFailure> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    crate::identity::write_file_atomic(&tmp, bytes, 0o600)
        .map_err(|e| CliFailure::new(super::EX_IOERR, format!("writing {}: {e}", tmp.display())))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CliFailure::new(
                super::admin_client::EX_CANTCREAT,
                format!(
                    "{} exists; move it away or choose another --out",
                    path.display()
                ),
            )
        } else {
            CliFailure::new(super::EX_IOERR, format!("writing {}: {e}", path.display()))
        }
    })
}
