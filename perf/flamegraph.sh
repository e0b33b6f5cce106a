#!/usr/bin/env bash
# CPU flame graphs of the gateway (1 worker) under `bench connrate` and then `bench bulk`.
# This VM has no hardware counters, so samples come from the software clock:
#   perf record -e cpu-clock -F 999 -g --pid GATEWAY
# Kernel frames are included (they are most of the cost of a proxy on loopback).
#
#   perf/flamegraph.sh                      # ~30 s of load
#   DURATION=10 GATEWAY_RELAY_MODE=copy perf/flamegraph.sh
#
# Writes perf/out/flamegraph-<time>/{connrate,bulk}.{perf.data,folded,svg}, the bench JSON of
# each run, and summary.txt: the share of samples in user vs kernel frames, the top leaf
# functions, and syscalls per proxied connection (counted with `perf stat -e raw_syscalls:*`
# during a separate connrate run, divided by its connections).
#
# Environment: DURATION [8] s per mode, CONCURRENCY [64], HELLO [bench/hellos/classic-curl.bin],
# GATEWAY_RELAY_MODE (passed through), OUT, CARGO_TARGET_DIR [target-perf], GATEWAY_BIN, BENCH
# (default: built from this tree), CPU [unset]: pin the gateway (taskset -c CPU).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-8}
CONCURRENCY=${CONCURRENCY:-64}
HELLO=${HELLO:-$ROOT/bench/hellos/classic-curl.bin}
OUT=${OUT:-$ROOT/perf/out/flamegraph-$(date +%Y%m%d-%H%M%S)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-perf}
BACKEND_PORT=${BACKEND_PORT:-19700}
PROXY_PORT=${PROXY_PORT:-19701}
ADMIN_PORT=${ADMIN_PORT:-19702}
PATH=$PATH:$HOME/.cargo/bin

command -v perf >/dev/null || { echo "flamegraph.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
if ! command -v inferno-flamegraph >/dev/null; then
    echo "flamegraph.sh: installing inferno (cargo install inferno)" >&2
    nice -n 10 cargo install -q inferno
fi
if [ -z "${GATEWAY_BIN:-}" ]; then
    nice -n 10 cargo build --release -q -p gateway-cli
    GATEWAY_BIN=$CARGO_TARGET_DIR/release/gateway
fi
if [ -z "${BENCH:-}" ]; then
    nice -n 10 cargo build --release -q -p bench
    BENCH=$CARGO_TARGET_DIR/release/bench
fi
mkdir -p "$OUT"

. "$ROOT/perf/lib.sh"
trap stop_backend_and_gateway EXIT

"$BENCH" backend --listen "127.0.0.1:$BACKEND_PORT" > "$OUT/backend.log" 2>&1 &
BACKEND_PID=$!
SNI=$("$BENCH" hello --info "$HELLO" | cut -f1)
write_gateway_config "$OUT/gateway.toml" bench "$PROXY_PORT" "$ADMIN_PORT" "$SNI" "$BACKEND_PORT"
pin=()
[ -n "${CPU:-}" ] && pin=(taskset -c "$CPU")
"${pin[@]}" "$GATEWAY_BIN" run --config "$OUT/gateway.toml" > "$OUT/gateway.log" 2>&1 &
GATEWAY_PID=$!
wait_listening "$PROXY_PORT" || { cat "$OUT/gateway.log" >&2; exit 1; }
wait_listening "$BACKEND_PORT"
TARGET=127.0.0.1:$PROXY_PORT

run_bench() {
    local mode=$1; shift
    case $mode in
        connrate) "$BENCH" connrate --target "$TARGET" --hello "$HELLO" --concurrency "$CONCURRENCY" --pid "$GATEWAY_PID" --json "$@" ;;
        bulk) "$BENCH" bulk --target "$TARGET" --hello "$HELLO" --connections 1 --write-size 262144 --pid "$GATEWAY_PID" --json "$@" ;;
    esac
}

# Profile the whole gateway process (all threads) while one mode runs.
profile() {
    local mode=$1
    perf record -e cpu-clock -F 999 -g --pid "$GATEWAY_PID" -o "$OUT/$mode.perf.data" \
        -- sleep "$((DURATION + 1))" > "$OUT/$mode.perf.log" 2>&1 &
    local perf_pid=$!
    sleep 0.5
    run_bench "$mode" --duration "$DURATION" > "$OUT/$mode.json"
    wait "$perf_pid" || true
    perf script -i "$OUT/$mode.perf.data" 2> /dev/null > "$OUT/$mode.perf.txt"
    inferno-collapse-perf --all < "$OUT/$mode.perf.txt" > "$OUT/$mode.folded"
    inferno-flamegraph --title "gateway under bench $mode ($(uname -r), cpu-clock 999 Hz)" \
        < "$OUT/$mode.folded" > "$OUT/$mode.svg"
    rm -f "$OUT/$mode.perf.txt"
}

echo "== profiling connrate ($DURATION s)" >&2
profile connrate
echo "== profiling bulk ($DURATION s)" >&2
profile bulk

# Syscalls per proxied connection: every syscall the gateway enters during a counted run.
echo "== syscalls per connection" >&2
events=(-e raw_syscalls:sys_enter)
available=$(perf list tracepoint 2>/dev/null | grep -o 'syscalls:sys_enter_[a-z0-9_]*' || true)
for call in io_uring_enter accept4 socket connect setsockopt getsockopt getsockname getpeername \
    recvfrom sendto recvmsg sendmsg splice pipe2 shutdown close read write epoll_wait; do
    grep -qx "syscalls:sys_enter_$call" <<< "$available" && events+=(-e "syscalls:sys_enter_$call")
done
# perf counts the gateway's threads for as long as the bench command runs.
perf stat "${events[@]}" --pid "$GATEWAY_PID" -o "$OUT/syscalls.perf-stat" -- \
    "$BENCH" connrate --target "$TARGET" --hello "$HELLO" --concurrency "$CONCURRENCY" \
    --count 20000 --json > "$OUT/syscalls-connrate.json"

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import collections, json, os, re, sys
out = sys.argv[1]

def kernel_frame(frame):
    return frame.endswith("_[k]")

for mode in ("connrate", "bulk"):
    path = os.path.join(out, mode + ".folded")
    leaves = collections.Counter()
    user = kernel = 0
    syscalls = collections.Counter()
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        count = int(count)
        frames = stack.split(";")
        leaf = frames[-1]
        leaves[leaf] += count
        if kernel_frame(leaf):
            kernel += count
            # The syscall entry point: the first kernel frame named __x64_sys_* / __do_sys_*.
            for frame in frames:
                m = re.match(r"(?:__x64_sys_|__do_sys_|__se_sys_)(\w+)_\[k\]$", frame)
                if m:
                    syscalls[m.group(1)] += count
                    break
            else:
                if any("softirq" in f or "net_rx_action" in f for f in frames):
                    syscalls["(softirq, no syscall frame)"] += count
        else:
            user += count
    total = user + kernel
    bench = json.load(open(os.path.join(out, mode + ".json")))
    log = open(os.path.join(out, mode + ".perf.log")).read()
    m = re.search(r"\((\d+) samples\)", log)
    print("== %s: %s cpu-clock samples of the gateway; user %.1f%%, kernel %.1f%%" % (mode, m.group(1) if m else "?", 100 * user / total, 100 * kernel / total))
    if mode == "connrate":
        print("   bench: %.0f conn/s, gateway CPU %.1f µs/conn" % (bench["operations_per_second"], bench["cpu"]["proxy_us_per_operation"]))
    else:
        print("   bench: %.2f Gbit/s, gateway CPU %.3f s/GB" % (bench["gbit_per_second"], bench["cpu"]["proxy_seconds_per_gb"]))
    print("   kernel samples by syscall entry (share of all samples):")
    for name, count in syscalls.most_common(10):
        print("     %6.1f%%  %s" % (100 * count / total, name))
    if mode == "connrate":
        # Where the connect cost goes: the ephemeral-port search grows with TIME_WAIT sockets.
        split = collections.Counter()
        for line in open(path):
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if "io_connect_[k]" in frames or "__x64_sys_connect_[k]" in frames:
                split["connect, total"] += int(count)
                if "__inet_hash_connect_[k]" in frames:
                    split["connect: __inet_hash_connect (ephemeral port search)"] += int(count)
        for name, count in sorted(split.items()):
            print("     %6.1f%%  %s" % (100 * count / total, name))
    print("   top leaf functions (share of all samples):")
    for name, count in leaves.most_common(20):
        print("     %6.1f%%  %s" % (100 * count / total, name))

text = open(os.path.join(out, "syscalls.perf-stat")).read()
counts = {}
for m in re.finditer(r"^\s*([\d,]+)\s+(\S+)", text, re.M):
    counts[m.group(2)] = int(m.group(1).replace(",", ""))
bench = json.load(open(os.path.join(out, "syscalls-connrate.json")))
conns = bench["operations"]
print("== syscalls per proxied connection (%d connections, perf stat on the gateway)" % conns)
for name, count in counts.items():
    if count:
        print("   %-40s %10d  %.2f per connection" % (name, count, count / conns))
PY
echo "TIME_WAIT sockets now: $(ss -Htan state time-wait | wc -l) (to the backend: $(ss -Htan state time-wait "dport = :$BACKEND_PORT" | wc -l))" | tee -a "$OUT/summary.txt"
echo "flamegraph.sh: results in $OUT (connrate.svg, bulk.svg, *.folded, summary.txt)" >&2
