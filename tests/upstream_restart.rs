//! The cloud goes away and comes back as a new process on the same ports: `fleetgw emulate aws`
//! (its own process, its state in its directory) is stopped while the daemon (`fleetgw run`)
//! keeps serving devices, and started again. Devices asking again meanwhile get their stored
//! answers, their telemetry waits in the outbox, and the restarted emulator receives every
//! message, in order, while the daemon never exits.

mod common;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use fleetgw::sim::{self, FleetOptions, FleetReport, TelemetryPlan};

use common::free_port;
use common::process::Fleetgw;
use common::wait::eventually;

const LIMIT: Duration = Duration::from_secs(120);

/// `fleetgw emulate aws` on fixed ports, once its discovery file is written.
async fn emulator(dir: &Path, mqtt: u16, api: u16, n: u32) -> Fleetgw {
    std::fs::create_dir_all(dir).unwrap();
    let discovery = dir.join("emulator.json");
    let _ = std::fs::remove_file(&discovery);
    let emu = Fleetgw::command("fleetgw emulate aws", dir.join(format!("emulator-{n}.log")))
        .args(["emulate", "aws", "--dir"])
        .arg(dir)
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(["--api", &format!("127.0.0.1:{api}")])
        .spawn();
    eventually("emulator.json", Duration::from_secs(30), || {
        emu.assert_running();
        let text = std::fs::read_to_string(&discovery).ok()?;
        serde_json::from_str::<Value>(&text).ok()
    })
    .await;
    emu
}

async fn fleet(port: u16) -> FleetReport {
    let mut opts = FleetOptions::new("127.0.0.1", port, 8);
    opts.run = "restart".into();
    opts.timeout = Duration::from_secs(60);
    opts.telemetry = Some(TelemetryPlan {
        messages_per_device: 40,
        ..TelemetryPlan::default()
    });
    let report = tokio::time::timeout(LIMIT, sim::run_fleet(opts, |_| {}))
        .await
        .expect("the fleet finishes in time")
        .expect("the fleet runs");
    assert!(report.all_provisioned(), "{:?}", report.failures);
    report
}

async fn delivered(api: &str, report: &FleetReport, gw: &Fleetgw) {
    let telemetry = report.telemetry.as_ref().expect("a telemetry phase");
    let check = sim::wait_for_delivery(api, telemetry, Duration::from_secs(90))
        .await
        .expect("the emulator's log reads");
    assert_eq!(check.lost, 0, "{check:?}\n{}", gw.log_tail());
    assert_eq!(check.out_of_order, 0, "{check:?}");
    assert_eq!(check.expected, 8 * 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cloud_restarting_on_the_same_ports_loses_nothing_and_the_daemon_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cloud");
    let (mqtt, api_port, port) = (free_port(), free_port(), free_port());
    let api = format!("http://127.0.0.1:{api_port}");
    let first = emulator(&dir, mqtt, api_port, 1).await;
    let gw = Fleetgw::run(&dir.join("gateway.toml"), tmp.path().join("gateway.log"))
        .sets([
            format!("downstream.listen=\"127.0.0.1:{port}\""),
            format!(
                "admin.socket=\"{}\"",
                tmp.path().join("admin.sock").display()
            ),
        ])
        .spawn();
    gw.wait_for_log("ready", Duration::from_secs(30)).await;

    let before = fleet(port).await;
    delivered(&api, &before, &gw).await;

    // The cloud stops (its state saved, as AWS never loses it). The same devices ask again and
    // send more: answers come from the gateway's store, telemetry waits in the outbox.
    first.signal(libc::SIGTERM);
    let status = first.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}\n{}", first.log_tail());
    let during = fleet(port).await;
    gw.assert_running();

    let _second = emulator(&dir, mqtt, api_port, 2).await;
    delivered(&api, &during, &gw).await;
    gw.assert_running();
}
