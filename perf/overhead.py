#!/usr/bin/env python3
"""Splits a proxy's profile into the socket work every proxy has to ask the kernel for and the
proxy's own overhead, in CPU microseconds per operation (issue 9's floor argument).

    perf script -i rr64.data -F period,ip,sym | perf/overhead.py --operations 34425

A sample is *socket work* when any frame of its stack is one of the kernel's socket-layer
entry points below: sending and receiving (`sock_sendmsg`, `sock_recvmsg`), connecting,
accepting, creating and closing sockets, socket options, shutdown, splice, and the softirq
that delivers packets (on loopback the sender's CPU runs the receiver's TCP input). Every
other sample is the proxy's own overhead: user space, the event loop's system calls (epoll or
io_uring bookkeeping, polls, task work, waits) and scheduling. Two proxies doing the same
requests ask for the same socket work, so the socket row of the cheaper one is the floor any
proxy's CPU per operation can reach on this path.
"""

import argparse
import re
import sys

SOCKET_WORK = {
    # send and receive (syscall or io_uring)
    "sock_sendmsg", "sock_recvmsg", "tcp_sendmsg", "tcp_recvmsg", "sock_read_iter",
    "sock_write_iter",
    # connect, accept, socket creation
    "__sys_connect", "inet_stream_connect", "tcp_v4_connect", "do_accept", "inet_accept",
    "__sys_socket", "__sock_create", "sock_alloc_file",
    # close and shutdown
    "sock_close", "inet_release", "tcp_close", "inet_shutdown", "tcp_shutdown", "__fput",
    # options
    "__sys_setsockopt", "do_sock_setsockopt", "sock_setsockopt", "do_tcp_setsockopt",
    "__sys_getsockopt", "__sys_getsockname", "__sys_getpeername",
    # splice between sockets and pipes
    "do_splice", "splice_to_socket", "splice_file_to_pipe", "tcp_splice_read",
    # packet delivery (loopback transmit runs the receiver's input here)
    "handle_softirqs", "__do_softirq", "net_rx_action",
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--operations", type=float, required=True,
                        help="operations done while perf recorded (from the bench's JSON)")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    totals = {"socket": 0, "proxy": 0}
    period, socket = None, False
    header = re.compile(r"^\s*(\d+)\s*$")

    def close_sample():
        if period is not None:
            totals["socket" if socket else "proxy"] += period

    for line in sys.stdin:
        stripped = line.strip()
        if not stripped:
            close_sample()
            period, socket = None, False
            continue
        # A sample starts with its period; its frames ("<address> <symbol>") are indented by
        # a tab.
        match = None if line.startswith("\t") else header.match(line)
        if match:
            close_sample()
            period, socket = int(match.group(1)), False
            continue
        fields = stripped.split()
        if len(fields) >= 2 and fields[1].split("+")[0] in SOCKET_WORK:
            socket = True
    close_sample()
    ops = args.operations
    total = totals["socket"] + totals["proxy"]
    if ops <= 0 or total == 0:
        sys.exit("overhead: no samples or no operations")
    per = {k: v / 1000.0 / ops for k, v in totals.items()}
    print(f"{args.label}total {total / 1000.0 / ops:.2f} µs/op, socket work {per['socket']:.2f} "
          f"({100.0 * totals['socket'] / total:.1f} %), proxy overhead {per['proxy']:.2f} "
          f"({100.0 * totals['proxy'] / total:.1f} %)")


if __name__ == "__main__":
    main()
