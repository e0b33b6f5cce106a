#!/usr/bin/env bash
# Regenerates testdata/clienthello/*.bin from real TLS clients, then checks them
# against clienthello/MANIFEST.tsv. Installs nothing: it needs openssl,
# gnutls-cli, curl, python3 and cargo (for the rustls tool) already present.
#
# Each capture starts `capture.py listen`, which binds a random free port on
# 127.0.0.1, prints it, saves the first ClientHello it receives and closes; the
# client then fails its handshake, which is expected, so client exit codes and
# output (kept in $LOG) are ignored. Sizes stay the same as long as the client
# versions in MANIFEST.tsv do; a new version shows up as a verify failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out="$here/clienthello"
LOG=${LOG:-/tmp/clienthello-capture.log}
: >"$LOG"

# The rustls tool is built outside the tree so no target/ or Cargo.lock lands in
# testdata; it is its own workspace, so building it never touches the gateway's.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/pq-target}
PQ_HELLO_SRC=/tmp/rustls-pq-hello-src
rm -rf "$PQ_HELLO_SRC"
cp -r "$here/tools/rustls-pq-hello" "$PQ_HELLO_SRC"
nice -n 10 cargo build --quiet --release --manifest-path "$PQ_HELLO_SRC/Cargo.toml"
PATH="$CARGO_TARGET_DIR/release:$PATH"

# capture FILE COMMAND: runs COMMAND (a string, as written in MANIFEST.tsv)
# with $PORT set to the listener's port.
capture() {
    local file=$1 command=$2 PORT
    coproc LISTENER { python3 "$here/capture.py" listen "$out/$file"; }
    local listener_pid=$LISTENER_PID
    read -r PORT <&"${LISTENER[0]}"
    echo "== $file: $command" >>"$LOG"
    (cd "$here" && eval "timeout 20 $command") >>"$LOG" 2>&1 || true
    wait "$listener_pid"
}

consul_name=dc1.internal.11111111-2222-3333-4444-555555555555.consul

capture openssl-default.bin \
    'openssl s_client -connect 127.0.0.1:$PORT -servername openssl-default.example.test </dev/null'
capture openssl-tls12.bin \
    "openssl s_client -connect 127.0.0.1:\$PORT -tls1_2 -servername api.default.$consul_name </dev/null"
capture openssl-alpn-h2.bin \
    'openssl s_client -connect 127.0.0.1:$PORT -servername openssl-alpn.example.test -alpn h2,http/1.1 </dev/null'
capture openssl-no-sni.bin \
    'openssl s_client -connect 127.0.0.1:$PORT -noservername </dev/null'
# 8 protocols of 100 bytes make a hello of about 1.1 KB, so with 512-byte
# records the handshake message spans three records.
capture openssl-fragmented-512.bin \
    "openssl s_client -connect 127.0.0.1:\$PORT -servername socat.default.$consul_name -max_send_frag 512 -alpn \"\$(python3 capture.py alpn-list 8 100)\" </dev/null"
# 80 protocols of 250 bytes make a hello of about 20 KB: one full 16384-byte
# record plus the rest, the largest shape a single-message hello takes.
capture openssl-large-20k.bin \
    'openssl s_client -connect 127.0.0.1:$PORT -servername openssl-large.example.test -alpn "$(python3 capture.py alpn-list 80 250)" </dev/null'
capture gnutls-cli.bin \
    "gnutls-cli --insecure --port \$PORT --sni-hostname db.billing.$consul_name --alpn h2 --alpn http/1.1 127.0.0.1 </dev/null"
capture curl.bin \
    'curl --silent --insecure --resolve curl.example.test:$PORT:127.0.0.1 https://curl.example.test:$PORT/'
capture python-ssl.bin \
    'python3 -c "import socket, ssl, sys; ssl.create_default_context().wrap_socket(socket.create_connection((\"127.0.0.1\", int(sys.argv[1]))), server_hostname=\"python-ssl.example.test\")" $PORT'
capture rustls-pq-x25519mlkem768.bin \
    "rustls-pq-hello 127.0.0.1:\$PORT web.default.$consul_name h2,http/1.1"

python3 "$here/capture.py" verify "$out/MANIFEST.tsv"
