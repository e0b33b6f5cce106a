# Shared by perf/callgrind.sh, perf/flamegraph.sh, perf/busy-poll.sh, perf/uring-profile.sh,
# perf/overhead-compare.sh and scripts/bench-smoke: start a fake-TLS backend and one gateway in
# front of it, and stop both on exit. Source it; it defines functions and
# BACKEND_PID/BACKEND/GATEWAY_PID only.

BACKEND_PID="" BACKEND="" GATEWAY_PID=""

# start_backend BENCH LOG: `bench backend` on CPU 1, bound to port 0; sets BACKEND_PID, and
# BACKEND to the address it reports (empty if it reported none within 5 s).
start_backend() {
    (exec taskset -c 1 "$1" backend --listen 127.0.0.1:0) > "$2" 2>&1 &
    BACKEND_PID=$!
    for _ in $(seq 1 100); do grep -q "^listening on " "$2" && break; sleep 0.05; done
    BACKEND=$(sed -n 's/^listening on //p' "$2" | head -1)
}

# Stop a process: SIGTERM, up to 5 s to exit (the gateway drains), then SIGKILL.
stop_pid() {
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_backend_and_gateway() {
    [ -n "$GATEWAY_PID" ] && stop_pid "$GATEWAY_PID"
    [ -n "$BACKEND_PID" ] && stop_pid "$BACKEND_PID"
    return 0
}

# wait_listening PORT [TRIES] [INTERVAL]: until something listens on 127.0.0.1:PORT.
wait_listening() {
    local tries=${2:-200} interval=${3:-0.05}
    for _ in $(seq 1 "$tries"); do
        ss -Hltn "sport = :$1" | grep -q . && return 0
        sleep "$interval"
    done
    return 1
}

# write_gateway_config FILE LISTENER_NAME PROXY_PORT ADMIN_PORT SNI BACKEND_PORT [WORKERS]
write_gateway_config() {
    cat > "$1" <<CFG
[[listener]]
name = "$2"
address = "127.0.0.1:$3"

[admin]
address = "127.0.0.1:$4"

[workers]
count = ${7:-1}
pin = false

[[route]]
sni = "$5"
endpoints = ["127.0.0.1:$6"]
CFG
}
