#!/usr/bin/env python3
"""Capture real TLS ClientHellos for the gateway's parser tests, and check them.

    capture.py listen OUT.bin          accept one connection on 127.0.0.1, save its ClientHello
    capture.py verify [MANIFEST.tsv]   re-parse every capture and compare with the manifest
    capture.py alpn-list COUNT LENGTH  print a deterministic comma-joined ALPN list

Standard library only, and deliberately independent of the Rust parser, so the
two can check each other.
"""

import socket
import struct
import sys
from pathlib import Path

# RFC 8446 section 5.1: "The record layer fragments information blocks into
# TLSPlaintext records carrying data in chunks of 2^14 bytes or less."
MAX_PLAINTEXT = 1 << 14
RECORD_HEADER = 5
HANDSHAKE_HEADER = 4
CONTENT_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
EXTENSION_ALPN = 16
# A ClientHello is bounded by its 24-bit length; anything near this is a bug.
MAX_CAPTURE = 1 << 20
# Clients are started right after the port is printed (capture.sh builds the
# rustls tool beforehand), so a minute is generous.
ACCEPT_TIMEOUT_SECONDS = 60
READ_TIMEOUT_SECONDS = 10

MANIFEST_COLUMNS = [
    "file", "client", "command", "expected_sni", "expected_alpn",
    "total_bytes", "tls_records", "notes",
]


class Malformed(Exception):
    pass


def hello_end(data):
    """Return the offset just past the record that completes the ClientHello,
    or None if more bytes are needed. Raises Malformed on anything else."""
    offset = 0
    handshake = bytearray()
    while len(data) - offset >= RECORD_HEADER:
        content_type, _version, length = struct.unpack_from(">BHH", data, offset)
        if content_type != CONTENT_HANDSHAKE:
            raise Malformed(f"record at {offset} has content type {content_type:#x}")
        if length == 0 or length > MAX_PLAINTEXT:
            raise Malformed(f"record at {offset} has length {length}")
        if len(data) - offset - RECORD_HEADER < length:
            return None
        handshake += data[offset + RECORD_HEADER:offset + RECORD_HEADER + length]
        offset += RECORD_HEADER + length
        if len(handshake) >= HANDSHAKE_HEADER:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise Malformed(f"handshake type {handshake[0]} is not ClientHello")
            body_length = int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= HANDSHAKE_HEADER + body_length:
                return offset
    return None


def listen(out_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        # The port goes to stdout so capture.sh can start the client.
        print(server.getsockname()[1], flush=True)
        server.settimeout(ACCEPT_TIMEOUT_SECONDS)
        connection, _peer = server.accept()
    with connection:
        connection.settimeout(READ_TIMEOUT_SECONDS)
        data = bytearray()
        while (end := hello_end(data)) is None:
            chunk = connection.recv(65536)
            if not chunk:
                raise Malformed(f"peer closed after {len(data)} bytes, hello incomplete")
            data += chunk
            if len(data) > MAX_CAPTURE:
                raise Malformed("more than 1 MiB without a complete ClientHello")
    # A client sends nothing more until it sees a ServerHello, so `end` is
    # normally len(data); cutting there keeps the file to exactly the hello.
    Path(out_path).write_bytes(bytes(data[:end]))
    print(f"{out_path}: {end} bytes", file=sys.stderr)


class Reader:
    def __init__(self, data):
        self.data, self.offset = data, 0

    def take(self, n):
        if self.offset + n > len(self.data):
            raise Malformed(f"wanted {n} bytes at {self.offset}, have {len(self.data) - self.offset}")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def number(self, width):
        return int.from_bytes(self.take(width), "big")

    def vector(self, length_width):
        return Reader(self.take(self.number(length_width)))

    def done(self):
        return self.offset == len(self.data)


def parse(data):
    """Parse a capture into (record count, SNI or None, ALPN list or None)."""
    records, offset, handshake = 0, 0, bytearray()
    while offset < len(data):
        if hello_end(data[:offset]) is not None:
            raise Malformed(f"{len(data) - offset} bytes after the completed hello")
        _type, _version, length = struct.unpack_from(">BHH", data, offset)
        handshake += data[offset + RECORD_HEADER:offset + RECORD_HEADER + length]
        offset += RECORD_HEADER + length
        records += 1
    if hello_end(data) != len(data):
        raise Malformed("capture does not end with a completed ClientHello")

    message = Reader(bytes(handshake))
    message.take(1)
    body = message.vector(3)
    if not message.done():
        raise Malformed("bytes after the ClientHello message")
    body.take(2 + 32)  # legacy_version, random
    body.vector(1)  # legacy_session_id
    body.vector(2)  # cipher_suites
    body.vector(1)  # legacy_compression_methods
    sni = alpn = None
    seen = set()
    extensions = body.vector(2)
    if not body.done():
        raise Malformed("bytes after the extensions")
    while not extensions.done():
        extension_type = extensions.number(2)
        content = extensions.vector(2)
        if extension_type in seen:
            raise Malformed(f"extension {extension_type} repeated")
        seen.add(extension_type)
        if extension_type == EXTENSION_SERVER_NAME:
            names = content.vector(2)
            # RFC 6066 section 3: host_name is name_type 0; we expect only that.
            if names.number(1) != 0:
                raise Malformed("server name is not a host_name")
            sni = names.vector(2).data.decode("ascii")
            if not names.done():
                raise Malformed("more than one server name")
        elif extension_type == EXTENSION_ALPN:
            protocols = content.vector(2)
            alpn = []
            while not protocols.done():
                alpn.append(protocols.vector(1).data.decode("ascii"))
        if extension_type in (EXTENSION_SERVER_NAME, EXTENSION_ALPN) and not content.done():
            raise Malformed(f"extension {extension_type} has trailing bytes")
    return records, sni, alpn


def verify(manifest_path):
    manifest_path = Path(manifest_path)
    lines = manifest_path.read_text().splitlines()
    if lines[0].split("\t") != MANIFEST_COLUMNS:
        sys.exit(f"{manifest_path}: header is not {MANIFEST_COLUMNS}")
    rows = lines[1:]
    failures = 0
    # An empty manifest, or a capture nobody described, would let this check
    # pass without checking anything.
    if not rows:
        sys.exit(f"{manifest_path}: no captures listed")
    listed = {line.split("\t")[0] for line in rows}
    for unlisted in sorted(p.name for p in manifest_path.parent.glob("*.bin")
                           if p.name not in listed):
        print(f"FAIL {unlisted}: not in {manifest_path.name}")
        failures += 1
    for line in rows:
        row = dict(zip(MANIFEST_COLUMNS, line.split("\t")))
        data = (manifest_path.parent / row["file"]).read_bytes()
        try:
            records, sni, alpn = parse(data)
        except Malformed as error:
            print(f"FAIL {row['file']}: {error}")
            failures += 1
            continue
        found = {
            "expected_sni": sni or "-",
            "expected_alpn": ",".join(alpn) if alpn else "-",
            "total_bytes": str(len(data)),
            "tls_records": str(records),
        }
        problems = [f"{key}: manifest {row[key][:60]!r} != file {value[:60]!r}"
                    for key, value in found.items() if row[key] != value]
        shown_alpn = found["expected_alpn"] if len(found["expected_alpn"]) < 40 \
            else f"<{len(alpn)} protocols>"
        print(f"{'FAIL' if problems else 'ok  '} {row['file']:32} {len(data):6} bytes "
              f"{records} records sni={found['expected_sni']} alpn={shown_alpn}")
        for problem in problems:
            print(f"     {problem}")
        failures += bool(problems)
    if failures:
        sys.exit(f"{failures} capture(s) do not match {manifest_path}")


def alpn_list(count, length):
    # Distinct, readable names of a fixed length (RFC 7301 caps each at 255 bytes).
    return ",".join(f"proto-{i:04d}-".ljust(length, "x") for i in range(count))


def main(argv):
    if len(argv) == 2 and argv[0] == "listen":
        listen(argv[1])
    elif len(argv) <= 2 and argv[:1] == ["verify"]:
        verify(argv[1] if len(argv) == 2 else Path(__file__).parent / "clienthello/MANIFEST.tsv")
    elif len(argv) == 3 and argv[0] == "alpn-list":
        print(alpn_list(int(argv[1]), int(argv[2])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
