#!/usr/bin/env bash
# What busy polling could buy (issue 9, item 6), measured without a busy-poll key in the gateway:
#   haproxy        vs haproxy-busy (HAProxy's own `busy-polling`: its poller never sleeps);
#   gateway        vs gateway-awake: the same gateway with a SCHED_IDLE spinner on its CPU, which
#                  keeps the vCPU out of its idle state (no HLT exit on wake-up) but yields the
#                  instant the gateway is runnable: the wake-up cost a spinning worker would save,
#                  minus the scheduler's own wake-up.
# Cases: rr on 1 connection, closed loop (rr:c1) and open loop at RATES (rr:rateN). Proxy pinned
# to CPU0, client and backend on CPU1. Interleaved, REPS repetitions.
#
#   OUT=perf/out/busy-poll GATEWAY_BIN=target-bench/release/gateway BENCH=target-bench/release/bench \
#     nice -n -10 perf/busy-poll.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. "$ROOT/perf/lib.sh"
REPS=${REPS:-3}
DURATION=${DURATION:-2}
RATES=${RATES:-500 2000}
BENCH=${BENCH:-$ROOT/target-bench/release/bench}
export GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target-bench/release/gateway}
export PEERS_DIR=${PEERS_DIR:-$(mktemp -d /tmp/busy-poll-peers.XXXXXX)}
OUT=${OUT:-$ROOT/perf/out/busy-poll-$(date +%Y%m%d-%H%M%S)}
HELLO=$ROOT/bench/hellos/classic-curl.bin
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

RUNNING="" SPINNER_PID=""
cleanup() {
    [ -n "$SPINNER_PID" ] && kill "$SPINNER_PID" 2>/dev/null
    [ -n "$RUNNING" ] && scripts/peers stop "$RUNNING"
    [ -n "$BACKEND_PID" ] && kill "$BACKEND_PID" 2>/dev/null
    wait 2>/dev/null || true
}
trap cleanup EXIT

start_backend "$BENCH" "$OUT/backend.log"
SNI=$("$BENCH" hello --info "$HELLO" | cut -f1)
# The proxies listen on a fixed loopback port (their configs need one), as in bench-compare.
PORT=${PORT:-19511}
ss -Hltn "sport = :$PORT" | grep -q . && { echo "busy-poll: port $PORT is in use" >&2; exit 1; }

for rep in $(seq 1 "$REPS"); do
    for peer in haproxy haproxy-busy gateway gateway-awake; do
        name=${peer%-awake}
        pids=$(scripts/peers start "$name" --listen "127.0.0.1:$PORT" --sni "$SNI" --backend "$BACKEND" --cpu 0)
        RUNNING=$name
        if [ "$peer" = gateway-awake ]; then
            # Bounded: the spinner exits on its own after a minute if anything goes wrong.
            taskset -c 0 chrt -i 0 timeout 60 sh -c 'while :; do :; done' &
            SPINNER_PID=$!
        fi
        for case in c1 $(for r in $RATES; do echo "rate$r"; done); do
            args=(rr --target "127.0.0.1:$PORT" --hello "$HELLO" --json --pid "$pids" --request 64
                --duration "$DURATION" --warmup 0.5 --label "peer=$peer" --label placement=P4
                --label "rep=$rep" --label "case=$case")
            case $case in c1) args+=(--connections 1) ;; rate*) args+=(--connections 1 --rate "${case#rate}") ;; esac
            taskset -c 1 "$BENCH" "${args[@]}" >> "$RESULTS" || echo "busy-poll: $peer $case failed" >&2
        done
        if [ -n "$SPINNER_PID" ]; then kill "$SPINNER_PID" 2>/dev/null; wait "$SPINNER_PID" 2>/dev/null || true; SPINNER_PID=""; fi
        scripts/peers stop "$name"
        RUNNING=""
    done
done
"$BENCH" report --input "$RESULTS" --out-dir "$OUT"
