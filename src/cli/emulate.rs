//! `fleetgw emulate aws|azure`: runs a cloud emulator in the foreground until SIGINT/SIGTERM.
//!
//! Everything a client needs is written to `DIR` once the listeners are bound
//! (`emulator.json`, `ca.pem`, `claim.pem`, `claim.key`, `gateway.pem`, `gateway.key`,
//! `gateway.toml`), so scripts can start it with `--mqtt 127.0.0.1:0` and read the chosen port
//! from `DIR/emulator.json`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::emulator::aws::{self, AwsEmulatorOptions};
use crate::emulator::azure::{self, AzureEmulatorOptions};
use crate::emulator::EmulatorError;

use super::{EX_IOERR, EX_SOFTWARE, EX_USAGE};

/// Arguments of `fleetgw emulate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cloud: Cloud,
}

/// Which cloud to emulate.
#[derive(Debug, clap::Subcommand)]
enum Cloud {
    /// AWS IoT: fleet provisioning (CreateCertificateFromCsr, CreateKeysAndCertificate,
    /// RegisterThing) and IoT Core telemetry over MQTT with mutual TLS.
    Aws(AwsArgs),
    /// Azure IoT Hub Device Provisioning Service and IoT Hub, each over MQTT and HTTPS (TLS,
    /// SAS tokens and X.509), with an ID scope and two enrollment groups.
    Azure(AzureArgs),
}

/// Arguments of `fleetgw emulate azure`.
#[derive(Debug, clap::Args)]
struct AzureArgs {
    /// State directory: CA, server and X.509 group CA credentials, ID scope and group keys,
    /// registrations, emulator.json and gateway.toml (created if missing; reused on restart).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    /// DPS over MQTT/TLS listen address (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value_t = azure::DEFAULT_DPS_MQTT)]
    dps_mqtt: SocketAddr,

    /// DPS over HTTPS listen address.
    #[arg(long, value_name = "ADDR", default_value_t = azure::DEFAULT_DPS_HTTPS)]
    dps_https: SocketAddr,

    /// IoT Hub over MQTT/TLS listen address.
    #[arg(long, value_name = "ADDR", default_value_t = azure::DEFAULT_HUB_MQTT)]
    hub_mqtt: SocketAddr,

    /// IoT Hub over HTTPS listen address.
    #[arg(long, value_name = "ADDR", default_value_t = azure::DEFAULT_HUB_HTTPS)]
    hub_https: SocketAddr,

    /// The hub's host name in assignedHub and SAS tokens (default: the --hub-mqtt IP); the
    /// server certificate gets it as a SAN.
    #[arg(long, value_name = "NAME")]
    hub_host: Option<String>,

    /// HTTP inspection and fault API listen address.
    #[arg(long, value_name = "ADDR", default_value_t = azure::DEFAULT_API)]
    api: SocketAddr,

    /// DPS requests per second; more are answered 429 with retry-after (default: unlimited).
    #[arg(long, value_name = "N")]
    tps: Option<f64>,

    /// Device messages kept for GET /messages (the newest; /stats counts all).
    #[arg(long, value_name = "N", default_value_t = azure::DEFAULT_MAX_MESSAGES)]
    max_messages: usize,

    /// How long a registration stays "assigning" before it is "assigned", milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1500)]
    assigning_ms: u64,
}

/// Arguments of `fleetgw emulate aws`.
#[derive(Debug, clap::Args)]
struct AwsArgs {
    /// State directory: CA, server, claim and gateway credentials, things and certificates,
    /// emulator.json and gateway.toml (created if missing; reused on restart).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    /// MQTT over TLS listen address (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value_t = aws::DEFAULT_MQTT_ADDR)]
    mqtt: SocketAddr,

    /// HTTP inspection and fault API listen address (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value_t = aws::DEFAULT_API_ADDR)]
    api: SocketAddr,

    /// Provisioning templates to serve in addition to the built-in FleetTemplate (JSON:
    /// {"templates":[{"templateName","templateBody","preProvisioningHook"?}]}).
    #[arg(long, value_name = "FILE")]
    templates: Option<PathBuf>,

    /// Ownership-token lifetime in seconds; unactivated certificates are deleted after it.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    token_ttl: u64,

    /// Requests per second allowed per provisioning API; more are rejected with 429
    /// (default: unlimited).
    #[arg(long, value_name = "N")]
    tps: Option<f64>,

    /// Device messages kept for GET /messages (the newest; /stats counts all).
    #[arg(long, value_name = "N", default_value_t = aws::DEFAULT_MAX_MESSAGES)]
    max_messages: usize,
}

/// Runs `fleetgw emulate`.
pub fn run(args: Args) -> ExitCode {
    match args.cloud {
        Cloud::Aws(a) => run_aws(a),
        Cloud::Azure(a) => run_azure(a),
    }
}

fn run_azure(args: AzureArgs) -> ExitCode {
    if let Some(tps) = args.tps {
        if !(tps.is_finite() && tps >= 0.0) {
            eprintln!("fleetgw emulate azure: --tps {tps}: must be a number >= 0 (0 = unlimited)");
            return ExitCode::from(EX_USAGE);
        }
    }
    if args.hub_host.as_deref().is_some_and(|h| {
        h.is_empty() || h.contains(['/', ' ', ':']) && h.parse::<std::net::IpAddr>().is_err()
    }) {
        eprintln!("fleetgw emulate azure: --hub-host must be a host name or an IP address");
        return ExitCode::from(EX_USAGE);
    }
    let opts = AzureEmulatorOptions {
        dir: args.dir,
        dps_mqtt: args.dps_mqtt,
        dps_https: args.dps_https,
        hub_mqtt: args.hub_mqtt,
        hub_https: args.hub_https,
        hub_host: args.hub_host,
        api: args.api,
        tps: args.tps,
        max_messages: args.max_messages,
        assigning: Duration::from_millis(args.assigning_ms),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetgw emulate azure: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    runtime.block_on(async move {
        let handle = match azure::start(opts).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("fleetgw emulate azure: {e}");
                return ExitCode::from(exit_code(&e));
            }
        };
        let e = handle.endpoints();
        println!(
            "Azure emulator: ID scope {}, DPS mqtt {} https {}, IoT Hub {} mqtt {} https {}, api {}",
            handle.id_scope(),
            e.dps_mqtt,
            e.dps_https,
            e.hub_host,
            e.hub_mqtt,
            e.hub_https,
            handle.api_url()
        );
        println!(
            "wrote {} and {}",
            handle.dir().join("emulator.json").display(),
            handle.gateway_config_path().display()
        );
        if let Err(e) = super::wait_for_signal().await {
            eprintln!("fleetgw emulate azure: cannot wait for signals: {e}");
            handle.shutdown().await;
            return ExitCode::from(EX_SOFTWARE);
        }
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn run_aws(args: AwsArgs) -> ExitCode {
    if let Some(tps) = args.tps {
        if !(tps.is_finite() && tps >= 0.0) {
            eprintln!("fleetgw emulate aws: --tps {tps}: must be a number >= 0 (0 = unlimited)");
            return ExitCode::from(EX_USAGE);
        }
    }
    let opts = AwsEmulatorOptions {
        dir: args.dir,
        mqtt: args.mqtt,
        api: args.api,
        templates: args.templates,
        token_ttl: Duration::from_secs(args.token_ttl),
        tps: args.tps,
        max_messages: args.max_messages,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetgw emulate aws: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    runtime.block_on(async move {
        let handle = match aws::start(opts).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("fleetgw emulate aws: {e}");
                return ExitCode::from(exit_code(&e));
            }
        };
        println!(
            "AWS IoT emulator: mqtt {} (mutual TLS), api {}, templates {}",
            handle.mqtt_addr(),
            handle.api_url(),
            handle.templates().join(", ")
        );
        println!(
            "wrote {} and {}",
            handle.dir().join("emulator.json").display(),
            handle.gateway_config_path().display()
        );
        if let Err(e) = super::wait_for_signal().await {
            eprintln!("fleetgw emulate aws: cannot wait for signals: {e}");
            handle.shutdown().await;
            return ExitCode::from(EX_SOFTWARE);
        }
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn exit_code(e: &EmulatorError) -> u8 {
    match e {
        EmulatorError::Io { .. } | EmulatorError::Bind { .. } => EX_IOERR,
        EmulatorError::Templates { .. } => EX_USAGE,
        EmulatorError::Corrupt { .. } | EmulatorError::Identity { .. } => EX_SOFTWARE,
    }
}
