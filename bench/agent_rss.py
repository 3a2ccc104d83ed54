#!/usr/bin/env python3
"""Agent memory at idle: RSS of one standalone `drover agent` running 3 components.

Each run starts an agent with three demo-servers on distinct ports of one instance address
(HTTP health check every 1s each), waits until all three serve, lets it settle 10 s, and reads
VmRSS and VmHWM from /proc/PID/status of the agent process only (its children excluded).
In the same run, beside it, three idle busybox containers (image FROM scratch with a static
busybox) are started with Docker, and each container's `containerd-shim-runc-v2` (found as the
parent of the container's main process, `docker inspect -f {{.State.Pid}}`) is measured the same
way, as are the `dockerd` and `containerd` daemons. 5 runs; min/median/max.

    python3 bench/agent_rss.py [--runs 5] [--settle 10] [--no-docker] [--no-write]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402

IMAGE = "drover-bench-busybox:latest"
GOAL_KB = 10 * 1024


def busybox_static():
    b = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(b) and os.geteuid() == 0 and shutil.which("apt-get"):
        c.log("installing busybox-static (apt-get) for the FROM scratch image ...")
        subprocess.run(["apt-get", "install", "-y", "busybox-static"], check=False,
                       stdout=subprocess.DEVNULL)
        b = "/bin/busybox"
    if not os.path.exists(b):
        return None
    r = subprocess.run(["ldd", b], capture_output=True, text=True)
    if "not a dynamic executable" not in (r.stdout + r.stderr) and "statically linked" not in r.stdout:
        return None
    return b


def build_busybox_image():
    bb = busybox_static()
    if not bb:
        raise RuntimeError("no static busybox (Debian: apt-get install -y busybox-static)")
    ctx = tempfile.mkdtemp(prefix="drover-bench-bb-")
    try:
        shutil.copy(bb, os.path.join(ctx, "busybox"))
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write('FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT ["/bin/busybox"]\n')
        c.docker_build(IMAGE, ctx)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def kb(x):
    return f"{x / 1024:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--no-docker", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    binary, bin_dir, bin_label = c.snapshot_binary(c.drover_bin())
    m = c.machine()
    why_no_docker = "skipped (--no-docker)" if args.no_docker else c.docker_usable()
    containers = []
    if why_no_docker is None:
        try:
            build_busybox_image()
        except Exception as e:  # noqa: BLE001
            why_no_docker = f"could not build the busybox image: {e}"

    rows = []  # one dict per run
    try:
        for run in range(args.runs):
            addr = f"127.88.{run + 1}.1"
            ports = [c.free_port(addr) for _ in range(3)]
            while len(set(ports)) < 3:
                ports = [c.free_port(addr) for _ in range(3)]
            comps = [c.component(f"app{i + 1}", p, health_interval="1s") for i, p in enumerate(ports)]
            agent = c.Agent(binary, addr, comps, instance=f"i-rss-{run + 1}")
            names = []
            try:
                if why_no_docker is None:
                    for i in range(3):
                        name = f"drover-bench-rss-{run + 1}-{i + 1}"
                        c.docker("rm", "-f", name, check=False)
                        c.docker("run", "-d", "--name", name, "--network", "none", IMAGE, "sleep", "3600")
                        names.append(name)
                        containers.append(name)
                for p in ports:
                    if not c.wait_serving(addr, p, 15):
                        raise RuntimeError(f"component on {addr}:{p} never served; see {agent.dir}/agent.log")
                time.sleep(args.settle)
                if agent.proc.poll() is not None:
                    raise RuntimeError("the agent exited")
                st = c.proc_status(agent.pid)
                kids = c.children(agent.pid)
                row = {"rss": st["VmRSS"], "hwm": st["VmHWM"], "nkids": len(kids),
                       "kids_rss": sum(c.proc_status(k)["VmRSS"] for k in kids)}
                if names:
                    shims = [c.shim_pid(n)[0] for n in names]
                    sst = [c.proc_status(p) for p in shims]
                    row["shim_rss"] = [s["VmRSS"] for s in sst]
                    row["shim_hwm"] = [s["VmHWM"] for s in sst]
                    row["dockerd"] = sum(c.proc_status(p)["VmRSS"] for p in c.pidof_exact("dockerd"))
                    row["containerd"] = sum(c.proc_status(p)["VmRSS"] for p in c.pidof_exact("containerd"))
                rows.append(row)
                c.log(f"run {run + 1}: agent VmRSS {row['rss']} kB, VmHWM {row['hwm']} kB, "
                      f"{row['nkids']} children ({row['kids_rss']} kB)"
                      + (f"; shims {row['shim_rss']} kB" if names else ""))
            finally:
                agent.stop()
                for n in names:
                    c.docker("rm", "-f", n, check=False)
    finally:
        for n in containers:
            c.docker("rm", "-f", n, check=False)
        if why_no_docker is None:
            c.docker("rmi", IMAGE, check=False)

    a_rss = c.stats([r["rss"] for r in rows])
    a_hwm = c.stats([r["hwm"] for r in rows])
    k_rss = c.stats([r["kids_rss"] for r in rows])
    out = []
    out.append("## Agent memory at idle (3 components)\n")
    out.append(c.machine_md(m) + "\n")
    out.append(f"Binary: {bin_label}. Command: `python3 bench/agent_rss.py` "
               f"({args.runs} runs, {args.settle:g} s settling after all 3 components serve).\n")
    out.append("The agent runs standalone (no server), three `drover demo-server` components on "
               "distinct ports of one instance address, each with an HTTP health check every 1 s. "
               "RSS is the agent process's own (`/proc/PID/status`), its children excluded.\n")
    goal = "met" if a_rss["max"] < GOAL_KB else "NOT met"
    out.append("| Process | min | median | max | goal |")
    out.append("|---|---:|---:|---:|---|")
    out.append(f"| `drover agent` VmRSS (MiB) | {kb(a_rss['min'])} | {kb(a_rss['median'])} | {kb(a_rss['max'])} "
               f"| < 10 MiB: **{goal}** |")
    out.append(f"| `drover agent` VmHWM (MiB) | {kb(a_hwm['min'])} | {kb(a_hwm['median'])} | {kb(a_hwm['max'])} | |")
    out.append(f"| its 3 demo-servers, VmRSS sum (MiB, not the agent's) | {kb(k_rss['min'])} | "
               f"{kb(k_rss['median'])} | {kb(k_rss['max'])} | |")
    out.append("")
    if why_no_docker is None and rows:
        s1 = c.stats([x for r in rows for x in r["shim_rss"]])
        sh = c.stats([x for r in rows for x in r["shim_hwm"]])
        s3 = c.stats([sum(r["shim_rss"]) for r in rows])
        dd = c.stats([r["dockerd"] for r in rows])
        cd = c.stats([r["containerd"] for r in rows])
        tot = c.stats([r["dockerd"] + r["containerd"] + sum(r["shim_rss"]) for r in rows])
        med = a_rss["median"]
        out.append(f"Same run, Docker Engine {c.docker_version()}: three idle containers "
                   "(`FROM scratch` + static busybox, `sleep 3600`, `--network none`), started "
                   "beside each agent and measured at the same moment. A shim is found as the parent "
                   "of the container's `State.Pid` and checked by its command line. Ratio = median "
                   "of the row / median agent VmRSS.\n")
        out.append("| Process | min | median | max | ratio to the agent |")
        out.append("|---|---:|---:|---:|---:|")
        out.append(f"| `drover agent` (3 components) VmRSS (MiB) | {kb(a_rss['min'])} | {kb(med)} | "
                   f"{kb(a_rss['max'])} | 1.00 |")
        out.append(f"| one `containerd-shim-runc-v2` VmRSS (MiB, {len(rows) * 3} shims) | {kb(s1['min'])} | "
                   f"{kb(s1['median'])} | {kb(s1['max'])} | {s1['median'] / med:.2f} |")
        out.append(f"| one `containerd-shim-runc-v2` VmHWM (MiB) | {kb(sh['min'])} | {kb(sh['median'])} | "
                   f"{kb(sh['max'])} | {sh['median'] / med:.2f} |")
        out.append(f"| 3 shims, one per container (MiB) | {kb(s3['min'])} | {kb(s3['median'])} | "
                   f"{kb(s3['max'])} | {s3['median'] / med:.2f} |")
        out.append(f"| `dockerd` VmRSS (MiB) | {kb(dd['min'])} | {kb(dd['median'])} | {kb(dd['max'])} "
                   f"| {dd['median'] / med:.2f} |")
        out.append(f"| `containerd` VmRSS (MiB) | {kb(cd['min'])} | {kb(cd['median'])} | {kb(cd['max'])} "
                   f"| {cd['median'] / med:.2f} |")
        out.append(f"| Docker's node total: dockerd + containerd + 3 shims (MiB) | {kb(tot['min'])} | "
                   f"{kb(tot['median'])} | {kb(tot['max'])} | {tot['median'] / med:.2f} |")
        out.append("")
        out.append("The shims supervise only (like the agent's supervision part); `dockerd` and "
                   "`containerd` are the node daemons, shared by all containers, which the agent "
                   "replaces along with the shims. Payload processes (busybox `sleep`, demo-servers) "
                   "are counted on neither side.")
    else:
        out.append(f"Docker comparison: not measured ({why_no_docker}).")
    body = "\n".join(out) + "\n"
    print(body)
    if not args.no_write:
        c.write_section("agent_rss", body)


if __name__ == "__main__":
    main()
