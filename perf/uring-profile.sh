#!/usr/bin/env bash
# Where the completion engine's CPU goes (issue 9): one worker pinned to CPU 0, `bench backend`
# and the load on CPU 1; `perf record -e cpu-clock -g` of the gateway for 3 s under
#   bench rr --connections 64 --request 64, then bench connrate --concurrency 64 --close fin,
# and the top of each profile by DSO (kernel / gateway / libc) and by symbol.
#
#   GATEWAY_BIN=target/release/gateway BENCH=target/release/bench perf/uring-profile.sh
# Any gateway env var passes through (GATEWAY_ENGINE defaults to uring here). KEEP=1 keeps the
# perf data (its directory is printed).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. "$ROOT/perf/lib.sh"
GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target/release/gateway}
BENCH=${BENCH:-$ROOT/target/release/bench}
export GATEWAY_ENGINE=${GATEWAY_ENGINE:-uring}
HELLO=$ROOT/bench/hellos/classic-curl.bin
D=$(mktemp -d /tmp/uring-profile.XXXXXX)
GPID=""
cleanup() {
    [ -n "$GPID" ] && kill "$GPID" 2>/dev/null && sleep 0.3 && kill "$GPID" 2>/dev/null
    [ -n "$BACKEND_PID" ] && kill "$BACKEND_PID" 2>/dev/null
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "uring-profile: kept $D" >&2; else rm -rf "$D"; fi
}
trap cleanup EXIT
start_backend "$BENCH" "$D/backend.log"
SNI=$("$BENCH" hello --info "$HELLO" | cut -f1)
printf '[[listener]]\nname = "p"\naddress = "127.0.0.1:0"\n[workers]\ncount = 1\npin = false\n[[route]]\nsni = "%s"\nendpoints = ["%s"]\n' \
    "$SNI" "$BACKEND" > "$D/gateway.toml"
taskset -c 0 "$GATEWAY_BIN" run --config "$D/gateway.toml" > "$D/gateway.out" 2> "$D/gateway.log" &
GPID=$!
for _ in $(seq 1 100); do grep -q "gateway bound: done" "$D/gateway.out" && break; sleep 0.05; done
ADDR=$(grep -m1 'gateway bound: listener' "$D/gateway.out" | awk '{print $NF}')
[ -n "$ADDR" ] || { echo "uring-profile: the gateway did not start" >&2; cat "$D/gateway.log" >&2; exit 1; }
profile() {
    local name=$1; shift
    perf record -q -e cpu-clock -g -p "$GPID" -o "$D/$name.data" -- sleep 3 2>/dev/null &
    local perf_pid=$!
    taskset -c 1 "$BENCH" "$@" --target "$ADDR" --hello "$HELLO" --duration 3 --warmup 0.2 --json > "$D/$name.json"
    wait "$perf_pid"
    echo "== $name"
    perf report -i "$D/$name.data" --no-children --sort dso -q -g none 2>/dev/null | head -4 || true
    perf report -i "$D/$name.data" --no-children --sort sym -q -g none 2>/dev/null | head -16 || true
}
profile rr64 rr --connections 64 --request 64
profile connrate connrate --concurrency 64 --close fin
