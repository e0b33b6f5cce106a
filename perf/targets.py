#!/usr/bin/env python3
"""Where the gateway stands against issue 9's Targets table, from one bench-compare run.

    perf/targets.py perf/out/compare-<time>/results.jsonl [--placement P4] [--gateway gateway]

Every ratio is the gateway's median over the best reference peer's median (HAProxy with and
without splice-auto, nginx, sniproxy), all from the same run. Medians over repetitions; the
min-max spread of each is printed so a noisy cell is visible.
"""
import argparse
import collections
import json
import statistics

REFERENCES = ["haproxy", "haproxy-splice", "nginx", "sniproxy"]


def load(path, placement):
    runs = collections.defaultdict(list)  # (peer, case) -> [record]
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        labels = record.get("labels", {})
        if labels.get("placement") != placement:
            continue
        case = record["mode"] + (":" + labels["case"] if "case" in labels else "")
        runs[(labels.get("peer"), case)].append(record)
    return runs


def get(record, *path):
    for key in path:
        if not isinstance(record, dict) or key not in record or record[key] is None:
            return None
        record = record[key]
    return record


def stat(runs, peer, case, *path):
    """(median, min, max) of a metric over repetitions, or None."""
    values = [v for v in (get(r, *path) for r in runs.get((peer, case), [])) if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def fmt(s):
    if s is None:
        return "-"
    return "%.3g (%.3g–%.3g)" % s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--placement", default="P4")
    ap.add_argument("--gateway", default="gateway")
    args = ap.parse_args()
    runs = load(args.results, args.placement)
    gw = args.gateway

    def best(case, path, lower=True):
        candidates = [(stat(runs, p, case, *path), p) for p in REFERENCES]
        candidates = [(s, p) for s, p in candidates if s is not None]
        if not candidates:
            return None, None
        chosen = (min if lower else max)(candidates, key=lambda c: c[0][0])
        return chosen

    rows = []

    def ratio_row(name, target, case, path, lower=True):
        mine = stat(runs, gw, case, *path)
        peer_stat, peer = best(case, path, lower)
        ratio = mine[0] / peer_stat[0] if mine and peer_stat and peer_stat[0] else None
        rows.append((name, target, fmt(mine), "%s %s" % (peer or "-", fmt(peer_stat)),
                     "%.2f×" % ratio if ratio is not None else "-"))

    ratio_row("CPU µs per proxied connection (FIN close)", "≤ 0.7×", "connrate",
              ("cpu", "proxy_us_per_operation"))
    ratio_row("CPU µs per request/response, 64 connections", "≤ 0.6×", "rr:c64",
              ("cpu", "proxy_us_per_operation"))
    ratio_row("CPU s per GB, bulk", "≤ 0.5×", "bulk", ("cpu", "proxy_seconds_per_gb"))
    ratio_row("bulk goodput Gbit/s", "≥ 1×", "bulk", ("gbit_per_second",), lower=False)
    # Memory: against HAProxy only, as the target says.
    mine = stat(runs, gw, "idle", "memory", "proxy_pss_per_connection")
    hap = stat(runs, "haproxy", "idle", "memory", "proxy_pss_per_connection")
    rows.append(("userspace bytes per idle connection", "≤ 0.25× HAProxy", fmt(mine),
                 "haproxy %s" % fmt(hap),
                 "%.2f×" % (mine[0] / hap[0]) if mine and hap and hap[0] else "-"))
    # Added median latency over direct at 1 connection (closed loop).
    direct = stat(runs, "direct", "rr:c1", "latency_us", "p50")
    if direct:
        def added(peer):
            s = stat(runs, peer, "rr:c1", "latency_us", "p50")
            return None if s is None else (s[0] - direct[0], s[1] - direct[0], s[2] - direct[0])
        mine = added(gw)
        refs = [(added(p), p) for p in REFERENCES]
        refs = [(s, p) for s, p in refs if s is not None]
        if refs:
            peer_stat, peer = min(refs, key=lambda c: c[0][0])
            ratio = mine[0] / peer_stat[0] if mine and peer_stat[0] > 0 else None
            rows.append(("added p50 µs over direct, 1-connection rr", "≤ 0.6×", fmt(mine),
                         "%s %s" % (peer, fmt(peer_stat)),
                         "%.2f×" % ratio if ratio is not None else "-"))
    print("| measure | target | %s median (min–max) | best peer median (min–max) | ratio |" % gw)
    print("|---|---|---|---|---|")
    for row in rows:
        print("| %s |" % " | ".join(row))


if __name__ == "__main__":
    main()
