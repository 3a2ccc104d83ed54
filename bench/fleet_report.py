#!/usr/bin/env python3
"""bench/fleet.sh's helper: records the machine (`meta`) and turns the run's JSON results into
the "Control plane at fleet scale" section of docs/benchmarks.md (`report`)."""

import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SECTION = "fleet"


def meta(out, drover, sim, sizes, duration, warmup, nice, nofile, note=""):
    m = common.machine()
    m["uptime_start"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    busy = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"],
                          capture_output=True, text=True).stdout.splitlines()[1:4]
    json.dump({
        "machine": m,
        "drover": common.binary_label(drover),
        "fleetsim": common.binary_label(sim),
        "sizes": sizes.split(),
        "duration": int(duration),
        "warmup": int(warmup),
        "nice": nice,
        "nofile": int(nofile),
        "note": note,
        "busiest": [" ".join(l.split()[:2] + [" ".join(l.split()[2:])[:70]]) for l in busy],
    }, open(out, "w"), indent=1)


def healthy_after(log, n, since_ms):
    """Seconds from `since_ms` to the n-th `healthy` event in a server log (None if fewer)."""
    import datetime
    seen = 0
    with open(log, errors="replace") as f:
        for line in f:
            if 'kind="healthy"' not in line:
                continue
            seen += 1
            if seen == n:
                t = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
                return round(t.timestamp() - since_ms / 1000, 1)
    return None


def load(res, name):
    p = os.path.join(res, name + ".json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def f(x, nd=1, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{nd}f}{unit}"


def met(ok):
    return "**met**" if ok else "**not met**"


def report(res, write):
    m = load(res, "meta")
    sizes = m["sizes"]
    end = open(os.path.join(res, "uptime-end.txt")).read().strip() if os.path.exists(
        os.path.join(res, "uptime-end.txt")) else "?"
    L = []
    L.append("## Control plane at fleet scale")
    L.append("")
    L.append(common.machine_md(m["machine"]))
    L.append(f"`uptime` at start: `{m['machine']['uptime_start']}`; at the end: `{end}`. "
             f"Busiest processes at the start (`ps`, %CPU over their lifetime): "
             + "; ".join(f"`{b}`" for b in m["busiest"]) + ".")
    L.append("")
    L.append(f"Binaries: server {m['drover']}; load tool {m['fleetsim']}; both copied once. "
             f"Command: `bench/fleet.sh` (sizes {', '.join(sizes)}; {m['warmup']} s warm-up, "
             f"{m['duration']} s measured per run; server, load tool and `drover status` at niceness {m['nice']}; "
             f"open-file limit {m['nofile']})."
             + (f" {m['note']}" if m.get("note") else ""))
    L.append("")
    L.append(
        "One `drover server` (2 worker threads, SQLite store) and one `drover-fleetsim` process "
        "(the load tool, 2 threads) share the machine's 2 cores. The fleet: 10 regions, one "
        "service per region (`sK` in `rK`, 1 to 3 components), N/10 instances per group. "
        "Latency is the load tool's: from just before the request to the end of the answer's "
        "body.")
    L.append("")
    L.append(
        "- **unknown ids**: N agents heartbeat (1 per 5 s) for ids the server does not know: "
        "token, body, one map lookup, `{\"known\":false}`. The HTTP + JSON floor.\n"
        "- **known instances**: `drover apply` of N instances in regions with "
        "`provider = \"sim\"`: the server records each launch, starts no process, and the "
        "load tool runs an agent per `launched` event (heartbeat every 5 s, 1-3 components; "
        "a permit long-poll only while told `leave_soon`; on a permit it drains, stops and "
        "ends its instance with `POST /v1/agent/exit`). Nothing writes the server's "
        "database but the server. `--heartbeat-interval 5s` (`silent_after` 15 s). "
        "Measured once all N are healthy.\n"
        "- **status**: `GET /v1/status?instances=none` (the groups' summaries) from the load "
        "tool every 5 s, while heartbeats are measured; then `GET /v1/status` (every "
        "instance) 3 times; `drover status` (group summaries) and `drover status s0/r0 "
        "--page 2` (100 instances), end to end.\n"
        "- **deploy**: `POST /v1/deploy` of `s0` (N/10 instances, `max_surge = 1`, "
        "`max_unavailable = 10`); time to its first `permit` event.\n"
        "- **restart**: SIGKILL under load, start on the same data directory; recovery = "
        "all N healthy (`GET /v1/status?instances=none`), timed from the start command.")
    L.append("")

    # Heartbeats.
    L.append("| N | ids | heartbeats/s | p50 (ms) | p99 (ms) | p99.9 (ms) | max (ms) | errors "
             "| long-polls open | server CPU mean / max (% of a core) | server RSS end / max "
             "(MiB) | load tool CPU (%) |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        x = load(res, f"extra-{n}") or {}
        polls = {"off": "long-polls off", "always": "a long-poll per agent"}.get(
            x.get("permits"), "long-polls as hinted")
        for kind, name in (("unknown", "unknown"), ("known", f"known, {polls}"),
                           ("known-always", "known, a long-poll per agent (before the hint)"),
                           ("known-nopoll", "known, long-polls off")):
            r = load(res, f"{kind}-{n}")
            if not r and kind in ("known-nopoll", "known-always", "unknown"):
                continue
            if not r:
                L.append(f"| {int(n):,} | {name} | - | - | - | - | - | - | - | - | - | no "
                         "result: the fleet never became healthy |")
                continue
            h = r["heartbeat_latency"]
            L.append(
                f"| {int(n):,} | {name} | {r['heartbeats_per_s']:,.0f} | {h['p50_ms']:.2f} | "
                f"{h['p99_ms']:.2f} | {h['p999_ms']:.2f} | {h['max_ms']:.1f} | "
                f"{r['errors'] + r['non2xx']} | "
                f"{format(r['permit_polls_open'], ',') if kind != 'unknown' else '-'} | "
                f"{f(r['server_cpu_pct_mean'])} / "
                f"{f(r['server_cpu_pct_max'])} | {f(r['server_rss_mib_end'])} / "
                f"{f(r['server_rss_mib_max'])} | {r['sim_cpu_pct_mean']:.1f} |")
    L.append("")

    # Status, deploy, restart.
    L.append("| N | summary body | summary poll p50 / max (ms) | whole list: body, p50 / max (ms) "
             "| `drover status` (ms, 3 runs) "
             "| `drover status s0/r0 --page 2` (ms) "
             "| fleet healthy after apply | replaced while launching | deploy: first permit "
             "(ms) | permits in 5 s | agent got its permit (ms) |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        r, d, x = load(res, f"known-{n}"), load(res, f"deploy-{n}"), load(res, f"extra-{n}")
        full = load(res, f"status-full-{n}")
        s = r["status_latency"] if r else None
        fl = full["latency"] if full else None
        first_permit = d.get("first_permit_event_ms") if d else None
        agent = None
        if d and x and x.get("agent_first_permit_epoch_ms"):
            agent = x["agent_first_permit_epoch_ms"] - d["deploy_sent_epoch_ms"]
        L.append(
            f"| {int(n):,} | {f(r['status_bytes'] / 1e6 if r else None, 1, ' MB')} | "
            f"{f(s['p50_ms'] if s else None)} / {f(s['max_ms'] if s else None)} | "
            f"{f(full['bytes'] / 1e6 if full else None, 1, ' MB')}, "
            f"{f(fl['p50_ms'] if fl else None)} / {f(fl['max_ms'] if fl else None)} | "
            f"{', '.join(str(v) for v in x['status_cli_ms']) if x else '-'} | "
            f"{', '.join(str(v) for v in x.get('status_page_cli_ms', [])) if x else '-'} | "
            f"{f(x.get('healthy_after_s') if x else None, 1, ' s')} | "
            f"{x['terminated_while_launching'] if x else '-'} | {f(first_permit, 0)} | "
            f"{x['permits_in_5s'] if x else '-'} | "
            f"{f(agent, 0) if agent is not None else ('long-polls off' if x and x['permits'] == 'off' else '-')} |")
    L.append("")

    def replaced_after(x):
        if not x:
            return "-"
        return f"{x['terminated_after_restart']:,} / {x.get('lost_after_restart', 0):,}"

    L.append("| N | restart: API answers (ms) | every instance reporting (ms) | every instance "
             "healthy (ms) | replaced after the restart (silent / agent lost) | server CPU during recovery "
             "(s) | server RSS after (MiB) |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        r, x = load(res, f"restart-{n}"), load(res, f"extra-{n}")
        if not r:
            L.append(f"| {int(n):,} | - | - | - | - | - | - |")
            continue
        L.append(
            f"| {int(n):,} | {f(r.get('api_up_ms'), 0)} | {f(r.get('all_reporting_ms'), 0)} | "
            f"{f(r.get('all_healthy_ms'), 0) if r.get('all_healthy_ms') is not None else 'not within 60 s'} | "
            f"{replaced_after(x)} | "
            f"{f(r.get('server_cpu_s_since_probe_start'))} | "
            f"{f(x.get('server_rss_mib_after_restart') if x else None)} |")
    L.append("")

    # Goals.
    def col(fn):
        return " | ".join(fn(n) for n in sizes)

    def hb_goal(n):
        r = load(res, f"known-{n}")
        if not r:
            return "no steady state: **not met**"
        p = r["heartbeat_latency"]["p99_ms"]
        if int(n) == 10000:
            # Issue 15: no worse than the run of 2026-11-26 (7.23 ms).
            return f"{p:.1f} ms (before: 7.2 ms): {met(p < 50 and p <= 7.23)}"
        return f"{p:.1f} ms: {met(p < 50)}"

    # What one open permit long-poll costs in server RSS: the same N with one per agent and
    # with them as hinted (or off).
    per_poll_mib = None
    for n in sizes:
        x = load(res, f"extra-{n}") or {}
        a = load(res, f"known-always-{n}")
        b = load(res, f"known-{n}") if x.get("permits") in ("on", "off") else None
        b = b or load(res, f"known-nopoll-{n}")
        if a and b and a.get("server_rss_mib_max") and b.get("server_rss_mib_max"):
            held = a.get("permit_polls_open", int(n)) - b.get("permit_polls_open", 0)
            per_poll_mib = (a["server_rss_mib_max"] - b["server_rss_mib_max"]) / max(held, 1)
            L.append(f"Permit long-polls and memory: at {int(n):,} instances the server's RSS is "
                     f"{a['server_rss_mib_max']:.0f} MiB with a long-poll held by every agent "
                     f"({a.get('permit_polls_open', '?'):,} open) and "
                     f"{b['server_rss_mib_max']:.0f} MiB with long-polls only as hinted "
                     f"({b.get('permit_polls_open', 0):,} open; same binary, same run): "
                     f"about {per_poll_mib * 1024:.0f} KiB per open long-poll.")
            L.append("")

    def rss_goal(n):
        r, x = load(res, f"known-{n}"), load(res, f"extra-{n}")
        vals = [v for v in ((r or {}).get("server_rss_mib_max"),
                            (x or {}).get("server_hwm_mib_after_restart")) if v is not None]
        if not vals:
            return "-"
        text = (f"{f((r or {}).get('server_rss_mib_max'), 0)} MiB steady, "
                f"{f((x or {}).get('server_hwm_mib_after_restart'), 0)} MiB peak with the restart")
        if (x or {}).get("permits") == "off" and per_poll_mib is not None:
            est = (r or {}).get("server_rss_mib_max", 0) + per_poll_mib * int(n) / 10
            return (f"{text}, without long-polls; with one per instance of a group being "
                    f"replaced about {est:.0f} MiB (estimate from the long-poll cost above): "
                    f"{met(max(vals + [est]) * 1.048576 < 400)}")
        if int(n) == 10000 and (r or {}).get("server_rss_mib_max"):
            # Issue 15: no worse than the run of 2026-11-26 (57.7 MiB steady).
            return (f"{text} (before: 58 MiB steady): "
                    f"{met(r['server_rss_mib_max'] <= 57.7 and max(vals) * 1.048576 < 400)}")
        return f"{text}: {met(max(vals) * 1.048576 < 400)}"

    def status_goal(n):
        r, x = load(res, f"known-{n}"), load(res, f"extra-{n}")
        if not r or not x:
            return "-"
        worst = max(x["status_cli_ms"] + x.get("status_page_cli_ms", []))
        return (f"CLI worst {worst:.0f} ms, summary poll max "
                f"{r['status_latency']['max_ms']:.0f} ms: {met(worst < 300)}")

    def permit_goal(n):
        d = load(res, f"deploy-{n}")
        v = d.get("first_permit_event_ms") if d else None
        return "-" if v is None else f"{v} ms: {met(v < 1000)}"

    def recovery_goal(n):
        r, x = load(res, f"restart-{n}"), load(res, f"extra-{n}")
        if not r or not x:
            return "-"
        t = r.get("all_healthy_ms")
        lost = x["terminated_after_restart"] + x.get("lost_after_restart", 0)
        ok = t is not None and t < 10_000 and lost == 0
        what = f"{t / 1000:.1f} s" if t is not None else "not within 60 s"
        return f"{what}, {lost} replaced: {met(ok)}"

    L.append("| goal (2 cores) | " + " | ".join(f"{int(n):,}" for n in sizes) + " |")
    L.append("|---|" + "---|" * len(sizes))
    L.append("| heartbeat p99 < 50 ms (known instances; 10,000: no worse than before) | "
             + col(hb_goal) + " |")
    L.append("| server RSS < 400 MB (10,000: no worse than before) | " + col(rss_goal) + " |")
    L.append("| `drover status` < 300 ms (summaries, a page) | " + col(status_goal) + " |")
    L.append("| first permit < 1 s | " + col(permit_goal) + " |")
    L.append("| full recovery after a restart < 10 s (all healthy, none replaced) | "
             + col(recovery_goal) + " |")
    L.append("")
    perf = [os.path.join(res, p) for p in sorted(os.listdir(res)) if p.startswith("perf-")]
    for p in perf:
        n = p.split("-")[-1].split(".")[0]
        lines = [l.rstrip() for l in open(p) if l.strip()]
        if lines:
            L.append(f"Server profile at {int(n):,} known instances, steady state (`perf record "
                     "--call-graph dwarf`, 15 s; inclusive share of the server's samples):")
            L.append("")
            L.append("```")
            L.extend(" ".join(w for w in l.split() if w != "-") for l in lines[:12])
            L.append("```")
            L.append("")
            run_share = next((float(l.split()[0].rstrip("%")) for l in lines
                              if "Engine::run" in l), None)
            k = load(res, f"known-{n}")
            if run_share is not None and k and k.get("server_cpu_pct_mean"):
                per_tick = run_share / 100 * k["server_cpu_pct_mean"] / 100 * 1000 / 4
                L.append(
                    f"Controller cost, derived: the controller loop's {run_share:.0f}% of the "
                    f"server's {k['server_cpu_pct_mean']:.1f}% of a core is about "
                    f"{per_tick:.1f} ms of CPU per tick (4 ticks a second; a pass reconciles "
                    f"only the groups that changed or whose deadline came, not all "
                    f"{int(n):,} instances).")
                L.append("")
    findings = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fleet_findings.md")
    if os.path.exists(findings):
        L.append(open(findings).read().rstrip())
    body = "\n".join(L)
    print(body)
    if write:
        common.write_section(SECTION, body)


if __name__ == "__main__":
    if sys.argv[1] == "meta":
        meta(*sys.argv[2:])
    elif sys.argv[1] == "healthy-after":
        print(healthy_after(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])) or "")
    elif sys.argv[1] == "report":
        report(sys.argv[2], "--no-write" not in sys.argv[3:])
    else:
        sys.exit("usage: fleet_report.py meta OUT DROVER SIM SIZES DURATION WARMUP NICE NOFILE | report RESULTS [--no-write]")
