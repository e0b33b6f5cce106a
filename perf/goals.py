#!/usr/bin/env python3
"""Comparison table and issue-6 goal ratios from one `scripts/bench-compare` run.

    perf/goals.py perf/out/compare-<time>/results.jsonl [--placement P3]

Prints Markdown: per metric the median (min-max) over repetitions for every peer, the ratio of
the median to direct and to the best reference peer (haproxy, haproxy-splice, nginx, sniproxy),
then the goals of issue 6 for each gateway variant (gateway = auto relay, gateway-copy,
gateway-splice) with met / not met.
"""
import argparse
import collections
import json
import statistics

REFERENCES = ["haproxy", "haproxy-splice", "nginx", "sniproxy"]
ORDER = ["direct"] + REFERENCES + ["gateway", "gateway-copy", "gateway-splice"]

# (mode, label, getter, lower_is_better, format)
METRICS = [
    ("connrate", "conn/s", lambda r: r["operations_per_second"], False, "%.0f"),
    ("connrate", "proxy CPU µs/conn", lambda r: r["cpu"].get("proxy_us_per_operation"), True, "%.1f"),
    ("connrate", "system CPU µs/conn", lambda r: r["cpu"].get("system_us_per_operation"), True, "%.1f"),
    ("rr", "rr p50 µs", lambda r: r["latency_us"]["p50"], True, "%.1f"),
    ("rr", "rr p99 µs", lambda r: r["latency_us"]["p99"], True, "%.1f"),
    ("rr", "rr req/s", lambda r: r["operations_per_second"], False, "%.0f"),
    ("rr", "proxy CPU µs/req", lambda r: r["cpu"].get("proxy_us_per_operation"), True, "%.2f"),
    ("rr", "system CPU µs/req", lambda r: r["cpu"].get("system_us_per_operation"), True, "%.2f"),
    ("bulk", "bulk Gbit/s", lambda r: r["gbit_per_second"], False, "%.2f"),
    ("bulk", "proxy CPU s/GB", lambda r: r["cpu"].get("proxy_seconds_per_gb"), True, "%.3f"),
    ("bulk", "system CPU s/GB", lambda r: r["cpu"].get("system_seconds_per_gb"), True, "%.3f"),
    ("idle", "idle PSS B/conn", lambda r: r["memory"]["proxy_pss_per_connection"], True, "%.0f"),
    ("idle", "idle kernel B/conn", lambda r: r["memory"]["kernel_per_connection"], True, "%.0f"),
]


INVALID = []


def load(path, placement):
    runs = collections.defaultdict(list)  # (peer, mode) -> [record]
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        if r["labels"].get("placement") != placement:
            continue
        # A run whose measurement window collapsed (bench bulk can stay inside one stream's
        # write/read loop past the end of the window when the proxy keeps up) measured nothing.
        duration = (r.get("parameters") or {}).get("duration_s")
        if duration and r.get("window_seconds", duration) < 0.5 * duration:
            INVALID.append("%s/%s rep %s (window %.2f s of %.1f s, %d bytes back)" % (
                r["labels"]["peer"], r["mode"], r["labels"].get("rep"), r["window_seconds"], duration,
                r.get("bytes_received", 0)))
            continue
        runs[(r["labels"]["peer"], r["mode"])].append(r)
    return runs


def values(runs, peer, mode, getter):
    out = []
    for r in runs.get((peer, mode), []):
        try:
            v = getter(r)
        except (KeyError, TypeError):
            v = None
        if v is not None:
            out.append(float(v))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--placement", default="P3")
    args = ap.parse_args()
    runs = load(args.results, args.placement)
    peers = [p for p in ORDER if any(k[0] == p for k in runs)]
    errors = collections.Counter()
    for (peer, mode), rs in runs.items():
        errors[(peer, mode)] = sum(r.get("errors_total", 0) for r in rs)

    med = {}
    print("### Placement %s: median (min–max) over repetitions; ×direct and ×best reference peer\n" % args.placement)
    print("| metric | " + " | ".join(peers) + " | best reference |")
    print("|---|" + "---|" * (len(peers) + 1))
    for mode, label, getter, lower, fmt in METRICS:
        cells = []
        for peer in peers:
            vs = values(runs, peer, mode, getter)
            if not vs or (peer == "direct" and label.startswith("proxy")) or (peer == "direct" and label.startswith("idle PSS")):
                cells.append("–")
                continue
            m = statistics.median(vs)
            med[(peer, label)] = m
            cells.append((fmt % m) + " (" + (fmt % min(vs)) + "–" + (fmt % max(vs)) + ")")
        refs = [(med[(p, label)], p) for p in REFERENCES if (p, label) in med]
        best = (min(refs) if lower else max(refs)) if refs else None
        if best:
            med[("best", label)] = best[0]
        print("| %s | %s | %s |" % (label, " | ".join(cells), ("%s (%s)" % (fmt % best[0], best[1])) if best else "–"))
    print()
    # Ratio tables.
    print("| metric | " + " | ".join(p for p in peers if p != "direct") + " |")
    print("|---|" + "---|" * (len(peers) - 1))
    for mode, label, getter, lower, fmt in METRICS:
        row = []
        for peer in peers:
            if peer == "direct":
                continue
            m = med.get((peer, label))
            d = med.get(("direct", label))
            b = med.get(("best", label))
            parts = []
            if m is not None and d:
                parts.append("%.2f×d" % (m / d))
            if m is not None and b:
                parts.append("%.2f×best" % (m / b))
            row.append(", ".join(parts) or "–")
        print("| %s | %s |" % (label, " | ".join(row)))
    print()
    bad = {k: v for k, v in errors.items() if v}
    if INVALID:
        print("Excluded as invalid: " + "; ".join(INVALID) + "\n")
    print("Errors: " + (", ".join("%s/%s: %d" % (k[0], k[1], v) for k, v in sorted(bad.items())) if bad else "none") + "\n")

    # Goals (issue 6).
    def best_ref(label, lower=True):
        refs = [(med[(p, label)], p) for p in REFERENCES if (p, label) in med]
        return (min(refs) if lower else max(refs)) if refs else (None, None)

    print("### Goals of issue 6 (placement %s, medians)\n" % args.placement)
    print("| goal | target | " + " | ".join(p for p in ("gateway", "gateway-copy", "gateway-splice") if p in peers) + " |")
    print("|---|---|" + "---|" * len([p for p in ("gateway", "gateway-copy", "gateway-splice") if p in peers]))
    gws = [p for p in ("gateway", "gateway-copy", "gateway-splice") if p in peers]

    def goal(name, target, fn, limit, higher_is_ok=False):
        cells = []
        for gw in gws:
            try:
                value, note = fn(gw)
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("n/a")
                continue
            ok = value >= limit if higher_is_ok else value <= limit
            cells.append("%.2f %s%s" % (value, "**met**" if ok else "not met", (" " + note) if note else ""))
        print("| %s | %s | %s |" % (name, target, " | ".join(cells)))

    b, bp = best_ref("proxy CPU µs/conn")
    goal("proxy CPU per connection ÷ best peer", "≤ 0.7", lambda g: (med[(g, "proxy CPU µs/conn")] / b, "(best: %s)" % bp), 0.7)
    d = med.get(("direct", "system CPU µs/conn"))
    bs, bsp = best_ref("system CPU µs/conn")
    goal("system-wide CPU per connection above direct ÷ best peer's", "≤ 0.7 (secondary view)",
         lambda g: ((med[(g, "system CPU µs/conn")] - d) / (bs - d), "(best: %s)" % bsp), 0.7)
    b, bp = best_ref("proxy CPU µs/req")
    goal("proxy CPU per 64 B request/response ÷ best peer", "≤ 0.6", lambda g: (med[(g, "proxy CPU µs/req")] / b, "(best: %s)" % bp), 0.6)
    b, bp = best_ref("proxy CPU s/GB")
    goal("proxy CPU per GB ÷ best peer (splice included)", "≤ 0.5", lambda g: (med[(g, "proxy CPU s/GB")] / b, "(best: %s)" % bp), 0.5)
    goal("bulk goodput ÷ direct", "≥ 0.8", lambda g: (med[(g, "bulk Gbit/s")] / med[("direct", "bulk Gbit/s")], ""), 0.8, True)
    goal("idle userspace memory per connection ÷ HAProxy", "≤ 0.25",
         lambda g: (med[(g, "idle PSS B/conn")] / med[("haproxy", "idle PSS B/conn")], ""), 0.25)
    dp = med.get(("direct", "rr p50 µs"))
    added = [(med[(p, "rr p50 µs")] - dp, p) for p in REFERENCES if (p, "rr p50 µs") in med]
    ba, bap = min(added)
    goal("added median rr latency ÷ best peer's", "≤ 0.6",
         lambda g: ((med[(g, "rr p50 µs")] - dp) / ba, "(+%.1f µs vs +%.1f µs %s)" % (med[(g, "rr p50 µs")] - dp, ba, bap)), 0.6)


if __name__ == "__main__":
    main()
