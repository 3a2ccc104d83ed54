"""Report of bench/lb.sh: medians over rounds, ratios drover / HAProxy, and the
"Load balancer" section of docs/benchmarks.md (python3 standard library only)."""

import argparse
import base64
import os
import platform
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- lb:begin -->", "<!-- lb:end -->"
UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}
LABEL = {"drover": "`drover lb`", "haproxy": "HAProxy", "direct": "direct to one backend"}
POLICY = {"rr": "round robin", "lc": "least connections"}
MODE = {"keepalive": "keep-alive", "close": "`Connection: close`"}


def ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * UNIT[m.group(2)]


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return {"rps": rps, "p50": p50, "p99": p99, "requests": requests, "errors": errors}


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
    run = lambda *c: subprocess.run(c, capture_output=True, text=True).stdout.strip()
    return (f"Machine: `nproc` {run('nproc')}, CPU \"{cpu}\", RAM {mem_kb / 1024 / 1024:.1f} GiB, "
            f"kernel `{platform.release()}`. Date: `{run('date', '-u')}`.")


def git_head():
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


def fmt_ratio(x):
    return f"{x:.2f}x"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    for a in ("write", "clk-tck", "rounds", "duration", "conns", "wrk-threads", "lb-threads",
              "backends", "pin", "nice", "uptime-start", "uptime-end", "haproxy", "wrk"):
        ap.add_argument("--" + a, default="")
    o = ap.parse_args()
    tick_us = 1e6 / int(o.clk_tck)

    runs = {}  # (mode, path) -> list of dicts
    by_round = {}  # (mode, round) -> {path: dict}
    with open(o.results) as f:
        for line in f:
            rnd, mode, path, ticks, out = line.rstrip("\n").split("\t")
            r = parse_wrk(base64.b64decode(out).decode())
            r["cpu_us_per_req"] = int(ticks) * tick_us / r["requests"] if path != "direct" else None
            runs.setdefault((mode, path), []).append(r)
            by_round.setdefault((mode, rnd), {})[path] = r

    def paired(mode, policy, key):
        """Median over rounds of drover / HAProxy measured in the same round (minutes
        apart at most), which cancels slow drifts of the machine's load."""
        d, h = f"drover-{policy}", f"haproxy-{policy}"
        xs = [rs[d][key] / rs[h][key]
              for (m, _), rs in sorted(by_round.items())
              if m == mode and d in rs and h in rs and rs[d][key] and rs[h][key]]
        return (statistics.median(xs), xs) if xs else (float("nan"), [])

    med = {}
    for key, rs in runs.items():
        med[key] = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
        cpu = [r["cpu_us_per_req"] for r in rs if r["cpu_us_per_req"] is not None]
        med[key]["cpu"] = statistics.median(cpu) if cpu else None
        med[key]["errors"] = sum(r["errors"] for r in rs)
        med[key]["all_rps"] = [round(r["rps"]) for r in rs]

    lines = []
    lines.append("## Load balancer")
    lines.append("")
    lines.append(machine())
    lines.append(f"`uptime` at start: `{o.uptime_start.strip()}`; at the end: "
                 f"`{o.uptime_end.strip()}`.")
    lines.append("")
    pin = ("the balancer pinned to CPU 1, the rest to CPU 0 (`taskset`)" if o.pin
           else "no CPU pinning")
    nice = f"all at `nice -n {o.nice}`" if o.nice else "default priority"
    lines.append(f"Command: `bench/lb.sh` (HEAD {git_head()}; ROUNDS={o.rounds} "
                 f"DURATION={o.duration} CONNS={o.conns} WRK_THREADS={o.wrk_threads} "
                 f"LB_THREADS={o.lb_threads} BACKENDS={o.backends} PIN={o.pin or '(none)'}).")
    lines.append(f"- drover: the `drover lb` process that `drover server` starts, following the "
                 f"server's targets; two ingresses, `balance = \"round_robin\"` and "
                 f"`\"least_connections\"`, each over {o.backends} instances of the demo server "
                 f"(`drover demo-server` under its agent), with its http health check every 500 ms.")
    lines.append(f"- HAProxy: `{o.haproxy}`, `mode tcp`, `nbthread {o.lb_threads}`, `balance "
                 f"roundrobin` and `leastconn` over the same instances, `option httpchk` every 500 ms.")
    lines.append(f"- Load: `wrk -t{o.wrk_threads} -c{o.conns} -d{o.duration}s --latency` (wrk "
                 f"{o.wrk}), keep-alive and `Connection: close`; {pin}; {nice}.")
    lines.append("- Medians over the rounds; each ratio is the median of the per-round ratios "
                 "(listed). CPU/req: the balancer's user+system time over the requests wrk completed.")
    lines.append("")
    lines.append("| load | policy | path | req/s | p50 (ms) | p99 (ms) | CPU (us/req) | errors | per round |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---|")
    verdicts = []
    for mode in ("keepalive", "close"):
        for policy in ("rr", "lc"):
            for path in ("drover", "haproxy"):
                m = med.get((mode, f"{path}-{policy}"))
                if not m:
                    continue
                cpu = f"{m['cpu']:.1f}" if m["cpu"] is not None else "-"
                lines.append(f"| {MODE[mode]} | {POLICY[policy]} | {LABEL[path]} | {m['rps']:.0f} | "
                             f"{m['p50']:.2f} | {m['p99']:.2f} | {cpu} | {m['errors']} | "
                             f"{', '.join(str(x) for x in m['all_rps'])} |")
            if med.get((mode, f"drover-{policy}")) and med.get((mode, f"haproxy-{policy}")):
                rps_ratio, rps_all = paired(mode, policy, "rps")
                p50_ratio, _ = paired(mode, policy, "p50")
                p99_ratio, p99_all = paired(mode, policy, "p99")
                cpu_ratio, _ = paired(mode, policy, "cpu_us_per_req")
                lines.append(f"| {MODE[mode]} | {POLICY[policy]} | **drover / HAProxy** | "
                             f"**{fmt_ratio(rps_ratio)}** | {fmt_ratio(p50_ratio)} | "
                             f"**{fmt_ratio(p99_ratio)}** | {fmt_ratio(cpu_ratio)} | | "
                             f"req/s {', '.join(f'{x:.2f}' for x in rps_all)}; "
                             f"p99 {', '.join(f'{x:.2f}' for x in p99_all)} |")
                ok_rps, ok_p99 = rps_ratio >= 1.0, p99_ratio <= 1.1
                verdicts.append(f"{MODE[mode]} {POLICY[policy]}: req/s {fmt_ratio(rps_ratio)} "
                                f"({'met' if ok_rps else 'NOT met'}), p99 {fmt_ratio(p99_ratio)} "
                                f"({'met' if ok_p99 else 'NOT met'})")
        m = med.get((mode, "direct"))
        if m:
            lines.append(f"| {MODE[mode]} | - | {LABEL['direct']} | {m['rps']:.0f} | {m['p50']:.2f} | "
                         f"{m['p99']:.2f} | - | {m['errors']} | {', '.join(str(x) for x in m['all_rps'])} |")
    lines.append("")
    lines.append("Goal (drover >= 1.0x HAProxy's req/s, p99 <= 1.1x): " + "; ".join(verdicts) + ".")
    body = "\n".join(lines)
    print(body)

    if o.write == "1":
        # Other benchmarks rewrite their own sections of the file: read it just before
        # writing and replace only ours.
        text = open(DOC).read()
        block = f"{BEGIN}\n{body}\n{END}"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            text = head + block + tail
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        tmp = DOC + ".lb.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, DOC)
        print(f"lb_report: wrote the Load balancer section of {os.path.relpath(DOC, ROOT)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
