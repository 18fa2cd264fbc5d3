#!/bin/sh
# Telemetry benchmark: a thin wrapper over `fleetgw bench telemetry`, run once per upstream
# identity (device, then gateway). Each run measures, against one AWS IoT emulator on this
# machine: the mosquitto bridge users run today (unpaced with unlimited queues: its no-loss
# rate; then paced at half of it: latency) and fleetgw (embedded broker -> durable outbox ->
# emulator; unpaced, then paced at half the bridge's no-loss rate). See docs/benchmarks.md.
#
# Environment:
#   FLEETGW                 the fleetgw binary (default: `cargo build --release`, then
#                           target/release/fleetgw; a debug build's figures are several times
#                           lower)
#   FLEETGW_BENCH_DEVICES   publishing devices (50)
#   FLEETGW_BENCH_SECONDS   seconds per phase (10)
#   FLEETGW_BENCH_RATE      total offered msg/s of the top-level run (0 = unpaced)
#   FLEETGW_BENCH_IDENTITY  device, gateway or both (both)
#   FLEETGW_BENCH_OUT       where telemetry-IDENTITY.json and .svg go (target/bench)
#   FLEETGW_BENCH_ARGS      further `fleetgw bench telemetry` arguments (e.g. --no-baselines)
# The outage runs of issue 7 are tests that assert no loss:
#   cargo test --release --test telemetry bench_devices_through_an_outage -- --ignored
#   cargo test --release --test telemetry_daemon daemon_sigkill_during_an_outage_loses_nothing
set -eu
cd "$(dirname "$0")/.."
if [ -z "${FLEETGW:-}" ]; then
    cargo build --release --locked --bin fleetgw >&2
    FLEETGW=target/release/fleetgw
fi
devices=${FLEETGW_BENCH_DEVICES:-50}
seconds=${FLEETGW_BENCH_SECONDS:-10}
rate=${FLEETGW_BENCH_RATE:-0}
out=${FLEETGW_BENCH_OUT:-target/bench}
case ${FLEETGW_BENCH_IDENTITY:-both} in
    both) identities="device gateway" ;;
    device | gateway) identities=$FLEETGW_BENCH_IDENTITY ;;
    *)
        echo "benches/telemetry.sh: FLEETGW_BENCH_IDENTITY must be device, gateway or both" >&2
        exit 2
        ;;
esac
mkdir -p "$out"
echo "uptime: $(uptime)"
status=0
for identity in $identities; do
    echo
    echo "== fleetgw bench telemetry --identity $identity"
    # shellcheck disable=SC2086
    "$FLEETGW" bench telemetry --devices "$devices" --seconds "$seconds" --rate "$rate" \
        --identity "$identity" --json "$out/telemetry-$identity.json" \
        --plot "$out/telemetry-$identity.svg" ${FLEETGW_BENCH_ARGS:-} || status=$?
done
echo
echo "JSON and plots in $out/"
exit "$status"
