#!/bin/sh
# Telemetry benchmark (issue 7): the mosquitto bridge users run today against fleetgw, side by
# side in one run on this machine. Device -> local broker -> AWS IoT emulator, 50 publishers,
# QoS 1, 200-byte payloads, at most 10 unacknowledged per publisher; loss, order and latency
# are counted by per-device sequence numbers and send times at the emulator.
#
#   a  bridge, default settings, unpaced: msg/s acknowledged to the publishers, msg/s delivered
#      upstream, % lost (mosquitto drops what exceeds its queue limits after acknowledging it).
#   b  bridge, unlimited queue (max_queued_messages 0), unpaced: nothing is dropped, so the rate
#      it delivers is its highest no-loss rate; p99 latency at that rate (queueing included).
#   c  bridge, unlimited queue and max_inflight_messages 100, paced at 20k msg/s (or half of
#      b if lower): p99 latency.
#   d  fleetgw (embedded broker -> durable fsynced outbox -> emulator), unpaced: the rate
#      delivered with 0 lost (the run fails if anything is lost or reordered).
#   e  fleetgw paced at half of b: p99 added latency (device publish -> emulator receipt).
#   f, g  d and e with identity = "gateway": one connection with the gateway's certificate, as
#      the bridge has, window `gateway_inflight` (300); d and e: a connection per device
#      (AWS's default), window `inflight` (10) each.
#   fleetgw's runs send one warm-up message per device first, so that its upstream
#   connections are open when the measurement starts, as the bridge's is.
#   Then, unless FLEETGW_BENCH_OUTAGE_SECS=0: fleetgw in-process with an emulator outage, and
#   the daemon (mosquitto -> `fleetgw run` -> emulator) with an outage, kill -9 and restart.
#
# "Delivered" rates run from the first send to the last arrival at the emulator; "acked" rates
# from the first send to the last PUBACK at the publishers. Paced runs split the offered rate
# evenly over the publishers (each still at most 10 in flight); `late` is how far the slowest
# publisher fell behind its schedule (large = the system did not take the offered rate). Every
# figure is printed with the 1-minute load average before/after it: the box is shared, so
# compare figures taken at a low load only.
#
# Environment: CARGO_FLAGS (default --release; set it empty for a debug build, whose figures
# are several times lower), FLEETGW_BENCH_DEVICES (50), FLEETGW_BENCH_PER_DEVICE (2000 per
# publisher for a..g), FLEETGW_BENCH_BROKER_INFLIGHT (fleetgw's embedded broker -> gateway
# window, 1000), FLEETGW_BENCH_IDENTITY (device or gateway) and FLEETGW_BENCH_UPSTREAM_INFLIGHT
# (the upstream window: 10 per device, 300 for the gateway) for a single fleetgw run, FLEETGW_BENCH_OUTAGE_SECS (10),
# FLEETGW_BENCH_OUTAGE_PER_DEVICE (400).
# The issue's full outage run: FLEETGW_BENCH_OUTAGE_PER_DEVICE=20000 FLEETGW_BENCH_OUTAGE_SECS=60.
# Needs mosquitto in PATH or /usr/sbin. Timings are never asserted; the tests only fail on loss.
set -eu
cd "$(dirname "$0")/.."
flags=${CARGO_FLAGS---release}
export FLEETGW_BENCH_DEVICES="${FLEETGW_BENCH_DEVICES:-50}"
per_device="${FLEETGW_BENCH_PER_DEVICE:-2000}"
outage_secs="${FLEETGW_BENCH_OUTAGE_SECS:-10}"

run() {
    # shellcheck disable=SC2086
    cargo test $flags --test "$1" "$2" -- --include-ignored --nocapture --test-threads 1 2>&1 |
        grep -oE '(BRIDGE|FLEETGW|DAEMON) .*|panicked.*|FAILED.*' || true
}

# The value of `key=` in a result line (empty when the run failed).
field() {
    printf '%s\n' "$1" | sed -n "s/^\(BRIDGE\|FLEETGW\) .* $2=\([^ ]*\).*/\2/p" | head -n 1
}

row() {
    printf '%-2s %-30s %9s %9s %10s %7s %8s %8s %9s  %s\n' "$1" "$2" \
        "$(field "$3" offered_per_s)" "$(field "$3" acked_per_s)" \
        "$(field "$3" delivered_per_s)" "$(field "$3" lost_pct)" "$(field "$3" p50_ms)" \
        "$(field "$3" p99_ms)" "$(field "$3" publisher_late_ms)" \
        "$(field "$3" load_before)/$(field "$3" load_after)"
}

# Build once; every run below reuses it.
targets="--test telemetry"
if [ "$outage_secs" -gt 0 ]; then
    targets="$targets --test telemetry_daemon"
fi
# shellcheck disable=SC2086
cargo test $flags $targets --no-run 2>&1 | tail -n 1
echo "uptime: $(uptime)"

export FLEETGW_BENCH_PER_DEVICE="$per_device"
a=$(FLEETGW_BENCH_BRIDGE=default run telemetry bench_mosquitto_bridge_baseline)
echo "a: $a"
b=$(FLEETGW_BENCH_BRIDGE=unlimited run telemetry bench_mosquitto_bridge_baseline)
echo "b: $b"
rate_b=$(field "$b" delivered_per_s)
if [ -z "$rate_b" ]; then
    echo "run b failed; no rate to pace c and e at" >&2
    exit 1
fi
half_b=$((rate_b / 2))
rate_c=$((half_b < 20000 ? half_b : 20000))
c=$(FLEETGW_BENCH_BRIDGE=inflight100 FLEETGW_BENCH_RATE=$rate_c run telemetry bench_mosquitto_bridge_baseline)
echo "c: $c"
d=$(run telemetry bench_devices_through_an_outage)
echo "d: $d"
e=$(FLEETGW_BENCH_RATE=$half_b run telemetry bench_devices_through_an_outage)
echo "e: $e"
export FLEETGW_BENCH_IDENTITY=gateway
f=$(run telemetry bench_devices_through_an_outage)
echo "f: $f"
g=$(FLEETGW_BENCH_RATE=$half_b run telemetry bench_devices_through_an_outage)
echo "g: $g"
unset FLEETGW_BENCH_IDENTITY

echo
echo "Telemetry benchmark: $FLEETGW_BENCH_DEVICES publishers x $per_device, QoS 1, 200 B, window 10"
printf '%-2s %-30s %9s %9s %10s %7s %8s %8s %9s  %s\n' "" "setup" "offered/s" "acked/s" \
    "delivered/s" "lost%" "p50 ms" "p99 ms" "late ms" "load 1m before/after"
row a "bridge, default limits" "$a"
row b "bridge, unlimited queue" "$b"
row c "bridge, unl. queue, inflight 100" "$c"
row d "fleetgw, fsynced outbox" "$d"
row e "fleetgw at half of b" "$e"
row f "fleetgw, gateway identity" "$f"
row g "fleetgw, gateway id., half b" "$g"
echo "bridge highest no-loss rate (b): $rate_b msg/s; fleetgw 0-loss rate (d): $(field "$d" delivered_per_s) msg/s"
echo "fleetgw p99 at $half_b msg/s (e): $(field "$e" p99_ms) ms (target <= 5 ms)"

if [ "$outage_secs" -gt 0 ]; then
    export FLEETGW_BENCH_PER_DEVICE="${FLEETGW_BENCH_OUTAGE_PER_DEVICE:-400}"
    export FLEETGW_BENCH_OUTAGE_SECS="$outage_secs"
    echo
    run telemetry bench_devices_through_an_outage
    run telemetry_daemon daemon_sigkill_during_an_outage_loses_nothing
fi
