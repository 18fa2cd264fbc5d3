//! Scale figures for the AWS IoT emulator (issue 5), run by hand:
//! `cargo test --test emulator_aws_bench -- --ignored --nocapture`.
//!
//! The emulator runs as its own process (`fleetgw emulate aws`) so its RSS can be read from
//! /proc; the load generators run in this process on the same cores, so the throughput
//! figures are lower bounds. Sizes can be changed with `BENCH_CSR_REQUESTS`,
//! `BENCH_TELEMETRY_MESSAGES`, `BENCH_CONNECTIONS`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use fleetgw::cloud::aws::topics;
use fleetgw::cloud::codec::{
    self, CreateCertificateFromCsrRequest, CreateCertificateFromCsrResponse, PayloadFormat,
    RegisterThingRequest, RegisterThingResponse,
};
use fleetgw::identity::{self, KeyType, PrivateKey};

use common::env_or;
use common::process::EmulatorProcess;

const JSON: PayloadFormat = PayloadFormat::Json;

fn env_usize(name: &str, default: usize) -> usize {
    env_or(name, default as u64) as usize
}

/// The emulator process and the claim credentials it made.
struct Emulator {
    process: EmulatorProcess,
    mqtt: SocketAddr,
    ca_pem: String,
    claim_tls: Arc<rustls::ClientConfig>,
}

impl Emulator {
    async fn start(dir: &std::path::Path) -> Emulator {
        let emu_dir = dir.join("emu");
        let process = EmulatorProcess::start(&emu_dir, dir.join("emulator.log"), |l| l).await;
        let claim = std::fs::read_to_string(emu_dir.join("claim.pem")).unwrap();
        let key =
            PrivateKey::from_pem(&std::fs::read_to_string(emu_dir.join("claim.key")).unwrap())
                .unwrap();
        let claim_tls =
            identity::tls::client_config(&process.ca_pem, Some((&claim, &key))).unwrap();
        Emulator {
            mqtt: process.mqtt,
            ca_pem: process.ca_pem.clone(),
            claim_tls,
            process,
        }
    }

    /// CPU time (user + system) the emulator process used so far.
    fn cpu(&self) -> Duration {
        self.process.process.cpu()
    }

    fn rss_kib(&self) -> u64 {
        self.process.process.rss_kib()
    }
}

/// A rumqttc client whose publishes and acks arrive on a channel.
fn client(
    addr: SocketAddr,
    id: &str,
    tls: Arc<rustls::ClientConfig>,
    inflight: u16,
) -> (AsyncClient, mpsc::UnboundedReceiver<Option<Packet>>) {
    let mut opts = MqttOptions::new(id, "localhost", addr.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    opts.set_inflight(inflight);
    opts.set_keep_alive(Duration::from_secs(60));
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 1024);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Some(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("client error: {e}");
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    (mqtt, rx)
}

async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<Option<Packet>>,
    want: fn(&Packet) -> bool,
) -> Packet {
    loop {
        let p = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("packet in time")
            .expect("channel open")
            .expect("connection open");
        if want(&p) {
            return p;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
async fn emulator_scale_figures() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path()).await;
    let rss_idle = emu.rss_kib();

    // 1. CreateCertificateFromCsr over 8 claim connections, requests pipelined per connection.
    let total = env_usize("BENCH_CSR_REQUESTS", 8_000);
    let per_conn = total / 8;
    let csr_topic = topics::create_from_csr(JSON);
    let accepted = topics::accepted(&csr_topic);
    let mut sessions = Vec::new();
    for i in 0..8 {
        let (mqtt, mut rx) = client(
            emu.mqtt,
            &format!("bench-claim-{i}"),
            emu.claim_tls.clone(),
            64,
        );
        wait_for(&mut rx, |p| matches!(p, Packet::ConnAck(_))).await;
        mqtt.subscribe(accepted.clone(), QoS::AtMostOnce)
            .await
            .unwrap();
        wait_for(&mut rx, |p| matches!(p, Packet::SubAck(_))).await;
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let csr = identity::create_csr(&format!("bench-{i}"), &key).unwrap();
        let payload = codec::encode(
            JSON,
            &CreateCertificateFromCsrRequest {
                certificate_signing_request: csr,
            },
        );
        sessions.push((mqtt, rx, payload));
    }
    let started = Instant::now();
    let cpu_before = emu.cpu();
    let mut tasks = Vec::new();
    for (mqtt, mut rx, payload) in sessions {
        let topic = csr_topic.clone();
        tasks.push(tokio::spawn(async move {
            let window = 32;
            let mut sent = 0;
            let mut received = 0;
            while received < per_conn {
                while sent < per_conn && sent - received < window {
                    mqtt.publish(topic.clone(), QoS::AtMostOnce, false, payload.clone())
                        .await
                        .unwrap();
                    sent += 1;
                }
                wait_for(&mut rx, |p| matches!(p, Packet::Publish(_))).await;
                received += 1;
            }
            mqtt
        }));
    }
    let mut claims = Vec::new();
    for t in tasks {
        claims.push(t.await.unwrap());
    }
    let csr_elapsed = started.elapsed();
    let csr_cpu = emu.cpu() - cpu_before;
    let csr_rate = (per_conn * 8) as f64 / csr_elapsed.as_secs_f64();
    println!(
        "CreateCertificateFromCsr: {} requests over 8 connections in {:.2} s = {:.0}/s; \
         emulator CPU {:.0} us per request (= {:.0}/s per core)",
        per_conn * 8,
        csr_elapsed.as_secs_f64(),
        csr_rate,
        csr_cpu.as_micros() as f64 / (per_conn * 8) as f64,
        (per_conn * 8) as f64 / csr_cpu.as_secs_f64()
    );
    drop(claims);

    // 2. QoS 1 telemetry from 50 device connections.
    let devices = 50;
    let messages = env_usize("BENCH_TELEMETRY_MESSAGES", 200_000) / devices;
    let (claim, mut claim_rx) = client(emu.mqtt, "bench-provisioner", emu.claim_tls.clone(), 8);
    wait_for(&mut claim_rx, |p| matches!(p, Packet::ConnAck(_))).await;
    let reg_topic = topics::register_thing("FleetTemplate", JSON);
    for t in [&accepted, &topics::accepted(&reg_topic)] {
        claim.subscribe(t.clone(), QoS::AtMostOnce).await.unwrap();
        wait_for(&mut claim_rx, |p| matches!(p, Packet::SubAck(_))).await;
    }
    let mut device_clients = Vec::new();
    for d in 0..devices {
        let name = format!("bench-dev-{d}");
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let csr = identity::create_csr(&name, &key).unwrap();
        claim
            .publish(
                csr_topic.clone(),
                QoS::AtMostOnce,
                false,
                codec::encode(
                    JSON,
                    &CreateCertificateFromCsrRequest {
                        certificate_signing_request: csr,
                    },
                ),
            )
            .await
            .unwrap();
        let Packet::Publish(p) = wait_for(&mut claim_rx, |p| matches!(p, Packet::Publish(_))).await
        else {
            unreachable!()
        };
        let cert: CreateCertificateFromCsrResponse = codec::decode(JSON, &p.payload).unwrap();
        let req = RegisterThingRequest {
            certificate_ownership_token: cert.certificate_ownership_token,
            parameters: [("SerialNumber".to_string(), name.clone())].into(),
        };
        claim
            .publish(
                reg_topic.clone(),
                QoS::AtMostOnce,
                false,
                codec::encode(JSON, &req),
            )
            .await
            .unwrap();
        let Packet::Publish(p) = wait_for(&mut claim_rx, |p| matches!(p, Packet::Publish(_))).await
        else {
            unreachable!()
        };
        let reg: RegisterThingResponse = codec::decode(JSON, &p.payload).unwrap();
        let tls =
            identity::tls::client_config(&emu.ca_pem, Some((&cert.certificate_pem, &key))).unwrap();
        let (mqtt, mut rx) = client(emu.mqtt, &reg.thing_name, tls, 100);
        wait_for(&mut rx, |p| matches!(p, Packet::ConnAck(_))).await;
        device_clients.push((reg.thing_name, mqtt, rx));
    }
    let payload = vec![b'x'; 100];
    let started = Instant::now();
    let cpu_before = emu.cpu();
    let mut tasks = Vec::new();
    for (name, mqtt, mut rx) in device_clients {
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let topic = format!("dt/{name}/telemetry");
            let publisher = {
                let mqtt = mqtt.clone();
                tokio::spawn(async move {
                    for _ in 0..messages {
                        mqtt.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                            .await
                            .unwrap();
                    }
                })
            };
            let mut acked = 0;
            while acked < messages {
                wait_for(&mut rx, |p| matches!(p, Packet::PubAck(_))).await;
                acked += 1;
            }
            publisher.await.unwrap();
            mqtt
        }));
    }
    let mut keep = Vec::new();
    for t in tasks {
        keep.push(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let cpu = emu.cpu() - cpu_before;
    let rate = (messages * devices) as f64 / elapsed.as_secs_f64();
    println!(
        "QoS 1 telemetry: {} messages from {devices} connections in {:.2} s = {:.0}/s; \
         emulator CPU {:.1} us per message (= {:.0}/s per core); RSS now {} MiB",
        messages * devices,
        elapsed.as_secs_f64(),
        rate,
        cpu.as_micros() as f64 / (messages * devices) as f64,
        (messages * devices) as f64 / cpu.as_secs_f64(),
        emu.rss_kib() / 1024
    );
    drop(keep);
    drop(claim);

    // 3. RSS per held connection (TLS + CONNECT, then idle).
    let count = env_usize("BENCH_CONNECTIONS", 10_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = emu.rss_kib();
    let connector = tokio_rustls::TlsConnector::from(emu.claim_tls.clone());
    let mut held = Vec::with_capacity(count);
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..count {
        let connector = connector.clone();
        let addr = emu.mqtt;
        pending.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let mut connect = v4::Connect::new(format!("held-{i}"));
            connect.keep_alive = 1200;
            let mut buf = BytesMut::new();
            v4::Packet::Connect(connect)
                .write(&mut buf, usize::MAX)
                .unwrap();
            tls.write_all(&buf).await.unwrap();
            let mut ack = [0u8; 4];
            tls.read_exact(&mut ack).await.unwrap();
            assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
            tls
        }));
        if pending.len() == 200 {
            for p in pending.drain(..) {
                held.push(p.await.unwrap());
            }
        }
    }
    for p in pending.drain(..) {
        held.push(p.await.unwrap());
    }
    let connect_elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = emu.rss_kib();
    println!(
        "held {count} TLS connections (opened in {:.1} s): emulator RSS {} -> {} MiB = {:.1} KiB per connection (idle RSS {} MiB)",
        connect_elapsed.as_secs_f64(),
        rss_before / 1024,
        rss_after / 1024,
        (rss_after.saturating_sub(rss_before)) as f64 / count as f64,
        rss_idle / 1024
    );
    assert_eq!(held.len(), count);
}
