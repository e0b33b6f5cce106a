#!/usr/bin/env bash
# The floor under issue 9's CPU targets: for each peer, in one run and alternating, the CPU per
# operation split into socket work (what every proxy must ask the kernel for) and the proxy's
# own overhead (perf/overhead.py). One worker per peer pinned to CPU 0; `bench backend` and the
# load on CPU 1; `perf record -e cpu-clock -g` of the peer's processes for DURATION seconds of
#   rr64:     bench rr --connections 64 --request 64
#   connrate: bench connrate --concurrency 64 --close fin
#
#   GATEWAY_BIN=target/release/gateway BENCH=target/release/bench nice -n -10 perf/overhead-compare.sh
#
# PEERS (default "gateway-uring haproxy nginx sniproxy", names of scripts/peers), REPS (3),
# DURATION (3), PROXY_PORT (19621: a benchmark, not a test; pick a free one). Prints one line per
# peer, mode and repetition (with the TCP segments per operation, from nstat: the same for every
# peer means the same protocol work was asked of the kernel), then the medians; KEEP=1 keeps
# the perf data.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. "$ROOT/perf/lib.sh"
export GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target/release/gateway}
BENCH=${BENCH:-$ROOT/target/release/bench}
PEERS=${PEERS:-gateway-uring haproxy nginx sniproxy}
REPS=${REPS:-3}
DURATION=${DURATION:-3}
PROXY_PORT=${PROXY_PORT:-19621}
HELLO=$ROOT/bench/hellos/classic-curl.bin
D=$(mktemp -d /tmp/overhead-compare.XXXXXX)
export PEERS_DIR=$D/peers
RUNNING=""
cleanup() {
    [ -n "$RUNNING" ] && "$ROOT/scripts/peers" stop "$RUNNING" >/dev/null 2>&1
    [ -n "$BACKEND_PID" ] && kill "$BACKEND_PID" 2>/dev/null
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "overhead-compare: kept $D" >&2; else rm -rf "$D"; fi
}
trap cleanup EXIT
"$ROOT/scripts/peers" install
start_backend "$BENCH" "$D/backend.log"
[ -n "$BACKEND" ] || { echo "overhead-compare: the backend did not start" >&2; exit 1; }
SNI=$("$BENCH" hello --info "$HELLO" | cut -f1)
echo "overhead-compare: $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg), peers: $PEERS"
for rep in $(seq 1 "$REPS"); do
    for peer in $PEERS; do
        pids=$("$ROOT/scripts/peers" start "$peer" --listen "127.0.0.1:$PROXY_PORT" --sni "$SNI" \
            --backend "$BACKEND" --cpu 0)
        RUNNING=$peer
        for mode in rr64 connrate; do
            case $mode in
                rr64) args=(rr --connections 64 --request 64) ;;
                connrate) args=(connrate --concurrency 64 --close fin) ;;
            esac
            data=$D/$peer-$mode-$rep
            # perf records the peer for exactly the bench's run; no warm-up, so the bench's
            # operations and nstat's segments cover the same window.
            nstat -n >/dev/null
            perf record -q -e cpu-clock -g -p "$pids" -o "$data.data" -- \
                taskset -c 1 "$BENCH" "${args[@]}" --target "127.0.0.1:$PROXY_PORT" --hello "$HELLO" \
                --duration "$DURATION" --warmup 0 --json > "$data.json" 2>/dev/null
            ops=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['operations'])" "$data.json")
            # TCP segments per operation, counted machine-wide (loopback: every segment sent is
            # received once), to show the peers ask the kernel for the same protocol work.
            segments=$(nstat -z TcpOutSegs | awk -v ops="$ops" '$1 == "TcpOutSegs" { printf "%.2f", $2 / ops }')
            perf script -i "$data.data" -F period,ip,sym 2>/dev/null |
                "$ROOT/perf/overhead.py" --operations "$ops" \
                    --label "$peer $mode rep $rep: $segments segments/op, " | tee -a "$D/lines"
        done
        "$ROOT/scripts/peers" stop "$peer" >/dev/null
        RUNNING=""
    done
done
echo "== medians (µs per operation): total, socket work, proxy overhead"
python3 - "$D/lines" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+) (\S+) rep \d+: .*total ([\d.]+) µs/op, socket work ([\d.]+) .*proxy overhead ([\d.]+)", line)
    if m:
        rows.setdefault((m[2], m[1]), []).append(tuple(float(m[i]) for i in (3, 4, 5)))
for (mode, peer), vals in sorted(rows.items()):
    med = [statistics.median(v[i] for v in vals) for i in range(3)]
    print(f"{mode:9} {peer:15} total {med[0]:7.2f}  socket {med[1]:7.2f}  overhead {med[2]:6.2f}")
PY
