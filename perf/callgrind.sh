#!/usr/bin/env bash
# Deterministic instruction counts (valgrind --tool=callgrind) for the connection decision and
# for a whole proxied connection. User space only: callgrind counts the instructions the
# process executes, never the kernel's.
#
#   perf/callgrind.sh                       # ~2 minutes
#   N=2000 K=200 perf/callgrind.sh
#
# 1. gateway-proto/examples/hotpath.rs with N and 2N iterations, per ClientHello capture and per
#    kind of route lookup: (Ir(2N) - Ir(N)) / N is the cost of one parse (one lookup: divided
#    by the 100 names per pass too). The subtraction removes process start, file reading and
#    building the 1020-route table.
# 2. The gateway (1 worker, logging off) under callgrind, driven by `bench connrate
#    --count K` and then `--count 2K`, with `callgrind_control --zero` before and
#    `--dump` after each batch; (Ir(2K) - Ir(K)) / K is the cost of one proxied connection
#    (accept, hello, route, connect, replay, relay 64 B each way, close), and the fixed cost of
#    a batch (timers, wake-ups) cancels out.
#
# Environment: N [500], K [100], CONCURRENCY [4] for connrate, GATEWAY_RELAY_MODE (passed
# through; default auto), HELLO [bench/hellos/classic-curl.bin], OUT [perf/out/callgrind-<time>],
# CARGO_TARGET_DIR [target-perf]; BENCH, GATEWAY_BIN, HOTPATH: prebuilt binaries (default: built
# from this tree).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
N=${N:-500}
K=${K:-100}
CONCURRENCY=${CONCURRENCY:-4}
HELLO=${HELLO:-$ROOT/bench/hellos/classic-curl.bin}
OUT=${OUT:-$ROOT/perf/out/callgrind-$(date +%Y%m%d-%H%M%S)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-perf}
BACKEND_PORT=${BACKEND_PORT:-19600}
PROXY_PORT=${PROXY_PORT:-19601}
ADMIN_PORT=${ADMIN_PORT:-19602}

command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
mkdir -p "$OUT"

if [ -z "${HOTPATH:-}" ]; then
    nice -n 10 cargo build --release -q -p gateway-proto --example hotpath
    HOTPATH=$CARGO_TARGET_DIR/release/examples/hotpath
fi
if [ -z "${GATEWAY_BIN:-}" ]; then
    nice -n 10 cargo build --release -q -p gateway-cli
    GATEWAY_BIN=$CARGO_TARGET_DIR/release/gateway
fi
if [ -z "${BENCH:-}" ]; then
    nice -n 10 cargo build --release -q -p bench
    BENCH=$CARGO_TARGET_DIR/release/bench
fi

# Total instructions (Ir) recorded in one callgrind output file.
total_ir() { awk '/^(summary|totals):/ { print $2; exit }' "$1"; }

# Runs hotpath under callgrind; prints the total Ir.
hotpath_ir() {
    local only=$1 iterations=$2
    local file=$OUT/hotpath-${only//[:\/]/_}-$iterations.out
    valgrind --tool=callgrind --callgrind-out-file="$file" \
        "$HOTPATH" --iterations "$iterations" --only "$only" > "$file.log" 2>&1 \
        || { cat "$file.log" >&2; exit 1; }
    total_ir "$file"
}

# Per-iteration cost from N and 2N runs; $2 = operations per iteration.
per_op() {
    local only=$1 per_iteration=$2
    local one two
    one=$(hotpath_ir "$only" "$N")
    two=$(hotpath_ir "$only" $((2 * N)))
    python3 -c "import sys; one, two, n, k = map(int, sys.argv[1:]); print('%.1f' % ((two - one) / (n * k)))" \
        "$one" "$two" "$N" "$per_iteration"
}

SUMMARY=$OUT/summary.tsv
printf 'what\tbytes\tinstructions_per_op\n' > "$SUMMARY"
echo "== ClientHello parse (instructions per parse, N=$N vs 2N)" >&2
for capture in gateway-proto/testdata/clienthello/*.bin; do
    name=$(basename "$capture")
    ir=$(per_op "parse:$name" 1)
    bytes=$(stat -c %s "$capture")
    printf 'parse %s\t%s\t%s\n' "$name" "$bytes" "$ir" | tee -a "$SUMMARY"
done
echo "== route lookup in 1000 exact + 20 wildcard routes (instructions per lookup)" >&2
for kind in exact wildcard miss; do
    ir=$(per_op "lookup:$kind" 100)
    printf 'lookup %s\t-\t%s\n' "$kind" "$ir" | tee -a "$SUMMARY"
done

echo "== whole proxied connection: gateway under callgrind, connrate K=$K and 2K" >&2
# The gateway drains on SIGTERM, which under valgrind can take long: stop_pid gives it 5 s.
. "$ROOT/perf/lib.sh"
trap stop_backend_and_gateway EXIT

"$BENCH" backend --listen "127.0.0.1:$BACKEND_PORT" > "$OUT/backend.log" 2>&1 &
BACKEND_PID=$!
SNI=$("$BENCH" hello --info "$HELLO" | cut -f1)
write_gateway_config "$OUT/gateway.toml" bench "$PROXY_PORT" "$ADMIN_PORT" "$SNI" "$BACKEND_PORT"
valgrind --tool=callgrind --vgdb=yes --callgrind-out-file="$OUT/gateway.%p.out" \
    "$GATEWAY_BIN" run --config "$OUT/gateway.toml" > "$OUT/gateway.log" 2>&1 &
GATEWAY_PID=$!
wait_listening "$PROXY_PORT" 600 0.1 || { cat "$OUT/gateway.log" >&2; echo "callgrind.sh: gateway did not listen" >&2; exit 1; }
wait_listening "$BACKEND_PORT" 600 0.1

connrate() {
    "$BENCH" connrate --target "127.0.0.1:$PROXY_PORT" --hello "$HELLO" --count "$1" \
        --concurrency "$CONCURRENCY" --timeout 30 --json > "$OUT/connrate-$2.json"
    python3 - "$OUT/connrate-$2.json" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if r["errors_total"] or r["operations"] != int(sys.argv[2]):
    sys.exit("callgrind.sh: connrate %s: %d operations, errors %s" % (sys.argv[1], r["operations"], r["errors"]))
PY
}

# Dumps the counters since the last zeroing; prints the new dump's total Ir.
dump() {
    callgrind_control --dump="$1" "$GATEWAY_PID" > /dev/null
    local file
    for _ in $(seq 1 100); do
        file=$(grep -l "^desc: Trigger: Client Request: $1\$\|^desc: Trigger: .*$1" "$OUT"/gateway."$GATEWAY_PID".out.* 2>/dev/null | head -1 || true)
        [ -n "$file" ] && break
        sleep 0.1
    done
    [ -n "$file" ] || { echo "callgrind.sh: no dump for $1" >&2; exit 1; }
    cp "$file" "$OUT/connection-$1.out"
    total_ir "$file"
}

connrate 20 warmup                       # first-use costs: allocator growth, lazy statics
callgrind_control --zero "$GATEWAY_PID" > /dev/null
connrate "$K" k
ir_k=$(dump batch-k)
callgrind_control --zero "$GATEWAY_PID" > /dev/null
connrate $((2 * K)) 2k
ir_2k=$(dump batch-2k)
per_conn=$(python3 -c "import sys; a, b, k = map(int, sys.argv[1:]); print('%.0f' % ((b - a) / k))" "$ir_k" "$ir_2k" "$K")
printf 'proxied connection (relay %s, %s B hello, 64 B each way)\t-\t%s\n' \
    "${GATEWAY_RELAY_MODE:-auto}" "$(stat -c %s "$HELLO")" "$per_conn" | tee -a "$SUMMARY"
printf 'proxied connection, batch K=%s total / K (fixed costs included)\t-\t%s\n' "$K" \
    "$(python3 -c "import sys; print('%.0f' % (int(sys.argv[1]) / int(sys.argv[2])))" "$ir_k" "$K")" | tee -a "$SUMMARY"

# Where the 2K batch's instructions went: inclusive cost per function (the self-cost view of a
# mid-run dump attributes nearly everything to the thread's entry point in valgrind 3.19).
callgrind_annotate --inclusive=yes "$OUT/connection-batch-2k.out" 2>/dev/null | head -80 > "$OUT/connection-top.txt" || true
echo "callgrind.sh: results in $OUT (summary.tsv, connection-top.txt; open *.out with callgrind_annotate or kcachegrind)" >&2
