#!/bin/sh
# Telemetry benchmark, side by side on this machine (issue 7):
#   1. baseline: mosquitto bridged to the AWS IoT emulator (default bridge settings),
#   2. fleetgw in-process: embedded broker -> durable outbox -> emulator, optional outage,
#   3. fleetgw daemon: mosquitto -> `fleetgw run` -> emulator, outage + kill -9 + restart.
# Every run counts loss by per-device sequence numbers on the emulator side and prints one
# line (BASELINE / BENCH / DAEMON). Sizes come from the environment:
#   FLEETGW_BENCH_DEVICES (50), FLEETGW_BENCH_PER_DEVICE (400), FLEETGW_BENCH_OUTAGE_SECS,
#   FLEETGW_BENCH_BROKER_INFLIGHT (embedded broker -> gateway window, 100).
# The issue's full run: FLEETGW_BENCH_PER_DEVICE=20000 FLEETGW_BENCH_OUTAGE_SECS=60.
# Add --release to CARGO_FLAGS for figures worth comparing (debug builds are several times slower).
set -eu
cd "$(dirname "$0")/.."
flags=${CARGO_FLAGS:-}
export FLEETGW_BENCH_DEVICES="${FLEETGW_BENCH_DEVICES:-50}"
export FLEETGW_BENCH_PER_DEVICE="${FLEETGW_BENCH_PER_DEVICE:-400}"
run() {
    # shellcheck disable=SC2086
    cargo test $flags --test "$1" "$2" -- --include-ignored --nocapture --test-threads 1 2>&1 |
        grep -oE '(BASELINE|BENCH|DAEMON) .*|panicked.*|FAILED.*' || true
}
run telemetry bench_mosquitto_bridge_baseline
FLEETGW_BENCH_OUTAGE_SECS=0 run telemetry bench_devices_through_an_outage
FLEETGW_BENCH_OUTAGE_SECS="${FLEETGW_BENCH_OUTAGE_SECS:-10}" run telemetry bench_devices_through_an_outage
FLEETGW_BENCH_OUTAGE_SECS="${FLEETGW_BENCH_OUTAGE_SECS:-10}" run telemetry_daemon daemon_sigkill_during_an_outage_loses_nothing
