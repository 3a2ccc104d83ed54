#!/usr/bin/env python3
"""bench/ha.sh's report: the control plane on etcd against SQLite, side by side, and the
failover, as the "Control plane on etcd" section of docs/benchmarks.md (between the
`<!-- ha:begin -->` and `<!-- ha:end -->` markers, added before the chaos section if
missing).

    ha_report.py RESULTS_DIR N DROVER_BIN [--no-write]
"""

import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")


def metrics(path):
    out = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def window(res, tag, a, b, secs):
    """The leader's store writer between scrapes `a` and `b`, `secs` apart: rates, and the
    commit latency quantiles (upper bound of the bucket holding them) and mean."""
    m0, m1 = metrics(f"{res}/{tag}.{a}"), metrics(f"{res}/{tag}.{b}")
    d = lambda k: m1.get(k, 0) - m0.get(k, 0)
    buckets = []
    for k in m1:
        b = re.match(r'drover_store_commit_seconds_bucket\{le="([^"]+)"\}', k)
        if b:
            le = float("inf") if b.group(1) == "+Inf" else float(b.group(1))
            buckets.append((le, d(k)))
    buckets.sort()
    count = d("drover_store_commit_seconds_count")

    def q(p):
        for le, c in buckets:
            if count and c >= p * count:
                return le * 1000
        return float("nan")

    return {
        "groups_s": d("drover_store_groups_total") / secs,
        "commits_s": d("drover_store_commits_total") / secs,
        "writes_s": d("drover_store_writes_total") / secs,
        "mean_ms": d("drover_store_commit_seconds_sum") / count * 1000 if count else float("nan"),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "groups": count,
    }


def fmt(x, digits=1):
    if x != x:  # nan
        return "-"
    if x == float("inf"):
        return "> 5000"
    return f"{x:,.{digits}f}"


def ratio(a, b):
    return f"{a / b:.2f}x" if b and a == a and b == b else "-"


def main():
    res, n, drover_bin = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    write = "--no-write" not in sys.argv
    run = {t: json.load(open(f"{res}/{t}.json")) for t in ("sqlite", "etcd")}
    healthy_s = {}
    for t in ("sqlite", "etcd"):
        try:
            healthy_s[t] = float(open(f"{res}/{t}.healthy_s").read().strip())
        except (OSError, ValueError):
            healthy_s[t] = float("nan")
    w = {t: window(res, t, "m0", "m1", healthy_s[t]) for t in ("sqlite", "etcd")}
    idle = {t: window(res, t, "m1", "m2", 20.0) for t in ("sqlite", "etcd")}
    fo = json.load(open(f"{res}/failover-extra.json"))
    try:
        healthy = json.load(open(f"{res}/failover.json"))
    except (OSError, ValueError):
        healthy = {}
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = open(f"{res}/uptime-end.txt").read().strip().split("load average:")[-1].strip()
    etcd_v = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    hb = {t: run[t]["heartbeat_latency"] for t in run}
    rows = [
        ("heartbeat p50 (ms)", hb["sqlite"]["p50_ms"], hb["etcd"]["p50_ms"], 2),
        ("heartbeat p99 (ms)", hb["sqlite"]["p99_ms"], hb["etcd"]["p99_ms"], 2),
        ("heartbeat max (ms)", hb["sqlite"]["max_ms"], hb["etcd"]["max_ms"], 1),
        ("heartbeats answered 2xx / sent", run["sqlite"]["heartbeats_ok"] / max(run["sqlite"]["heartbeats_sent"], 1),
         run["etcd"]["heartbeats_ok"] / max(run["etcd"]["heartbeats_sent"], 1), 4),
        ("launch: apply to every instance healthy (s)", healthy_s["sqlite"], healthy_s["etcd"], 1),
        ("launch: store transactions (group commits)", w["sqlite"]["groups"], w["etcd"]["groups"], 0),
        ("launch: commits per s", w["sqlite"]["commits_s"], w["etcd"]["commits_s"], 1),
        ("launch: records written per s", w["sqlite"]["writes_s"], w["etcd"]["writes_s"], 1),
        ("launch: group commit mean (ms)", w["sqlite"]["mean_ms"], w["etcd"]["mean_ms"], 2),
        ("launch: group commit p50 (ms, bucket bound)", w["sqlite"]["p50_ms"], w["etcd"]["p50_ms"], 0),
        ("launch: group commit p99 (ms, bucket bound)", w["sqlite"]["p99_ms"], w["etcd"]["p99_ms"], 0),
        ("steady state: records written per s", idle["sqlite"]["writes_s"], idle["etcd"]["writes_s"], 2),
    ]
    lines = [
        "<!-- ha:begin -->",
        "## Control plane on etcd",
        "",
        f"{now}, {os.cpu_count()} cores ({platform.machine()}, load {load} at the end), `bench/ha.sh` "
        f"(N={n:,}), `{os.path.relpath(drover_bin, ROOT)}` at {commit}, {etcd_v}, one run.",
        "",
        f"{n:,} instances in 10 groups of the `sim` provider; drover-fleetsim runs their agents "
        "(a heartbeat per 5 s each) through HAProxy (TCP, connecting from 16 loopback addresses per server; the first server, the second as its backup) "
        "in front of one `drover server` on SQLite, then of 3 servers on a 3-member etcd cluster on "
        "loopback (fsync on, as SQLite's `synchronous = FULL`). Heartbeat latency over the load "
        "tool's window once every instance is healthy. The leader's store writer (`/metrics`): "
        "over the launch (from the apply until every instance is healthy: a launch record and "
        "events per instance), and over 20 s of steady state after it (heartbeats are soft "
        "state: nothing is written while nothing changes).",
        "",
        "| measure | SQLite | etcd | etcd / SQLite |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, a, b, digits in rows:
        lines.append(f"| {name} | {fmt(a, digits)} | {fmt(b, digits)} | {ratio(b, a)} |")
    replaced = fo["terminating"] + fo["launched"]
    lines += [
        "",
        "Failover on etcd: SIGKILL of the leader with every instance healthy, the agents going on "
        "through the proxy.",
        "",
        "| from the SIGKILL to | ms |",
        "| --- | ---: |",
        f"| another server leads (`GET /v1/health`) | {fo['kill_to_leader_ms']:,} |",
        f"| its first controller pass (`drover_controller_passes_total` >= 1) | {fo['kill_to_first_pass_ms']:,} |",
        f"| every instance reporting in its view | {fmt(healthy.get('all_reporting_ms') or float('nan'), 0)} |",
        f"| every instance healthy in its view | {fmt(healthy.get('all_healthy_ms') or float('nan'), 0)} |",
        "",
        f"Instances replaced: {replaced} (events after the kill: {fo['silent']} silent, {fo['lost']} lost, "
        f"{fo['terminating']} terminating, {fo['launched']} launched).",
        "<!-- ha:end -->",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not write:
        return
    doc = open(DOC).read()
    if "<!-- ha:begin -->" in doc:
        doc = re.sub(r"<!-- ha:begin -->.*?<!-- ha:end -->\n", lambda _: text, doc, flags=re.S)
    else:
        doc = doc.replace("<!-- chaos:begin -->", text + "\n<!-- chaos:begin -->", 1)
    open(DOC, "w").write(doc)


if __name__ == "__main__":
    main()
