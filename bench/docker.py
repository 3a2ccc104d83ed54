#!/usr/bin/env python3
"""Docker runtime: respawn of a killed container, drover against Docker's `--restart=always`,
and the agent's memory while it supervises 5 containers.

Everything runs against the local Docker Engine, with images this script builds (the drover
binary and its `ldd` libraries `FROM scratch`, entrypoint /drover; and a static busybox) and pushes
to a registry it starts on loopback (Debian's `docker-registry`), so the agent pulls them and runs
them pinned by digest, as in production.

Respawn, in the same run, with the same image and command, on the host's network and on the
default bridge (the port published on a loopback address): the container's main process
(`State.Pid`) is SIGKILLed and the clock stops at the first HTTP 200 on `GET /`, polled every 1 ms
with 100 ms timeouts once the process is gone. drover: a standalone `drover-agent`, restart
`reset_after = 1s`, each kill after >= 1.5 s of serving, so each is a first restart (immediate by
design). Docker: `docker run --restart=always`, each kill after 11 s of serving (Docker resets its
backoff after 10 s), so each is Docker's first restart too. The engine's own `die` -> `start`
event times are recorded for both: the supervisor's reaction plus the engine's start work.

Memory: one standalone agent supervising 5 busybox httpd containers, each with an HTTP health
check every 1 s; VmRSS, VmHWM, RssAnon and RssFile of the agent process after settling, for
`drover-agent` (the agent binary providers start) and for `drover agent` (the same agent inside
the multi-purpose `drover` binary).

    python3 bench/docker.py [--reps 10] [--rss-runs 3] [--settle 10] [--no-write]
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402

DEMO = "drover-bench-demo"
BUSYBOX = "drover-bench-busybox"
DOCKER_CONTAINER = "drover-bench-docker-respawn"
RSS_GOAL_KB = 10 * 1024
RESTART = {"initial_delay": "200ms", "max_delay": "30s", "reset_after": "1s"}


class Registry:
    """Debian's docker-registry on 127.0.0.1:PORT with temporary storage."""

    def __init__(self):
        exe = shutil.which("docker-registry")
        if not exe:
            raise RuntimeError("no docker-registry (Debian: apt-get install -y docker-registry)")
        self.dir = tempfile.mkdtemp(prefix="drover-bench-registry-")
        self.addr = f"127.0.0.1:{c.free_port()}"
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {self.dir}/storage\nhttp:\n  addr: {self.addr}\n")
        self.log = open(os.path.join(self.dir, "registry.log"), "w")
        self.proc = subprocess.Popen([exe, "serve", cfg], stdout=self.log, stderr=subprocess.STDOUT)
        host, port = self.addr.split(":")
        t0 = time.monotonic()
        while c.http_get(host, int(port), "/v2/") != 200:
            if time.monotonic() - t0 > 20:
                raise RuntimeError("the registry did not start")
            time.sleep(0.05)

    def digest(self, repo, tag):
        import http.client
        conn = http.client.HTTPConnection(self.addr, timeout=5)
        conn.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ", ".join([
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.oci.image.manifest.v1+json"])})
        d = conn.getresponse().getheader("Docker-Content-Digest")
        if not d:
            raise RuntimeError(f"no digest for {repo}:{tag}")
        return d

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by pid
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def build_and_push(registry, name, rootfs_files, entrypoint):
    """Build `name` FROM scratch from {path in image: host file}, push it as REGISTRY/name:v1, and
    remove the local copies (the agent pulls it). Returns (reference, pinned reference)."""
    ctx = tempfile.mkdtemp(prefix="drover-bench-img-")
    try:
        for dst, src in rootfs_files.items():
            p = os.path.join(ctx, "rootfs", dst.lstrip("/"))
            os.makedirs(os.path.dirname(p), exist_ok=True)
            if src.startswith("->"):
                os.symlink(src[2:], p)
            else:
                shutil.copy(src, p)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(f"FROM scratch\nCOPY rootfs/ /\nENTRYPOINT {json.dumps(entrypoint)}\n")
        ref = f"{registry.addr}/{name}:v1"
        subprocess.run(["docker", "build", "-q", "-t", ref, ctx], check=True, capture_output=True,
                       env={**os.environ, "DOCKER_BUILDKIT": "0"})
        c.docker("push", ref)
        pinned = f"{registry.addr}/{name}@{registry.digest(name, 'v1')}"
        c.docker("rmi", ref, check=False)
        return ref, pinned
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def demo_files(binary):
    files = {"/drover": binary}
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    for lib in set(re.findall(r"(/\S+)\s+\(0x", out)):
        files[lib] = lib
    return files


def busybox_files():
    bb = shutil.which("busybox") or "/bin/busybox"
    files = {"/bin/busybox": bb}
    for a in ["sh", "httpd", "mkdir", "echo", "sleep"]:
        files[f"/bin/{a}"] = "->busybox"
    return files


class Events:
    """`docker events` for some containers, with the engine's timestamps: die -> start gaps."""

    def __init__(self, label):
        self.proc = subprocess.Popen(
            ["docker", "events", "--filter", "type=container", "--filter", label,
             "--format", "{{.TimeNano}} {{.Action}} {{.Actor.ID}}"],
            stdout=subprocess.PIPE, text=True)
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 3:
                self.lines.append((int(parts[0]), parts[1], parts[2]))

    def gaps_ms(self):
        """die -> next start of the same container, in ms."""
        out, died = [], {}
        for t, action, cid in sorted(self.lines):
            if action == "die":
                died[cid] = t
            elif action == "start" and cid in died:
                out.append((t - died.pop(cid)) / 1e6)
        return out

    def stop(self):
        self.proc.terminate()  # our own child
        self.proc.wait()


def http_ok(host, port):
    return c.http_get(host, port, "/", timeout=0.1) == 200


def time_kill(pid, host, port, limit_s=60):
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while c.alive(pid):
        if time.monotonic() - t0 > 5:
            raise RuntimeError(f"{pid} still alive 5 s after SIGKILL")
        time.sleep(0.0002)
    while time.monotonic() - t0 < limit_s:
        if http_ok(host, port):
            return (time.monotonic() - t0) * 1000
        time.sleep(0.001)
    return None


def container_of(label):
    ids = c.docker("ps", "-q", "--filter", label).split()
    if len(ids) != 1:
        raise RuntimeError(f"expected one running container with {label}, found {ids}")
    return ids[0]


def docker_component(name, pinned, ref, port, inside_port, args, health=None, extra=None):
    comp = {
        "name": name, "runtime": "docker", "version": "v1", "command": args[0], "args": args[1:],
        "ports": {"http": port}, "restart": RESTART, "stop_grace": "1s", "stop_signal": "SIGTERM",
        "docker": {"image": ref, "pinned": pinned, "container_ports": {"http": inside_port}},
    }
    if health:
        comp["health"] = health
    comp["docker"].update(extra or {})
    return comp


def bench_drover_respawn(binary, ref, pinned, reps, network):
    addr = "127.89.0.2" if network == "bridge" else "127.89.0.4"
    port = c.free_port(addr)
    health = {"type": "http", "port": "http", "path": "/healthz", "interval": "1s", "timeout": "500ms"}
    if network == "bridge":
        comp = docker_component("app", pinned, ref, port, 8080,
                                ["demo-server", "--listen", "0.0.0.0:8080", "--message", "drover"],
                                health=health)
    else:
        comp = docker_component("app", pinned, ref, port, port,
                                ["demo-server", "--listen", "{addr}:{port.http}", "--message", "drover"],
                                health=health, extra={"network": "host", "container_ports": {}})
    instance = f"i-bench-respawn-{network}"
    agent = c.Agent(binary, addr, [comp], instance=instance)
    label = f"label=drover.instance={instance}"
    ev = Events(label)
    times = []
    try:
        if not c.wait_serving(addr, port, 120):
            raise RuntimeError(f"the container never served; see {agent.dir}/agent.log")
        cid = container_of(label)
        for i in range(reps):
            time.sleep(1.5)
            ms = time_kill(c.container_pid(cid), addr, port)
            if ms is None:
                raise RuntimeError("the container did not serve again within 60 s")
            times.append(ms)
            c.log(f"drover ({network}) rep {i + 1}: {ms:.1f} ms")
        time.sleep(0.5)
    finally:
        with open(os.path.join(agent.dir, "agent.log")) as f:
            log = f.read()
        agent.stop()
        ev.stop()
        c.docker("rm", "-f", *c.docker("ps", "-aq", "--filter", label).split(), check=False)
    restarts = log.count("component exited; restarting")
    if restarts != reps:
        raise RuntimeError(f"the agent restarted the container {restarts} times, not {reps}")
    return times, ev.gaps_ms()[-reps:]


def bench_docker_respawn(ref, pinned, reps, network):
    host = "127.89.0.3" if network == "bridge" else "127.89.0.5"
    port = c.free_port(host)
    if network == "bridge":
        net = ["-p", f"{host}:{port}:8080"]
        listen = "0.0.0.0:8080"
    else:
        net = ["--network", "host"]
        listen = f"{host}:{port}"
    c.docker("rm", "-f", DOCKER_CONTAINER, check=False)
    c.docker("pull", "-q", pinned)
    ev = Events(f"container={DOCKER_CONTAINER}")
    times = []
    try:
        c.docker("run", "-d", "--name", DOCKER_CONTAINER, "--restart=always", *net, pinned,
                 "demo-server", "--listen", listen, "--message", "docker")
        if not c.wait_serving(host, port, 60):
            raise RuntimeError("the container never served: " + c.docker("logs", DOCKER_CONTAINER, check=False))
        for i in range(reps):
            time.sleep(11)
            before = int(c.docker("inspect", "-f", "{{.RestartCount}}", DOCKER_CONTAINER))
            ms = time_kill(c.container_pid(DOCKER_CONTAINER), host, port)
            if ms is None:
                raise RuntimeError("the container did not serve again within 60 s")
            after = int(c.docker("inspect", "-f", "{{.RestartCount}}", DOCKER_CONTAINER))
            if after != before + 1:
                raise RuntimeError("the container was not restarted exactly once")
            times.append(ms)
            c.log(f"docker ({network}) rep {i + 1}: {ms:.1f} ms")
        time.sleep(0.5)
    finally:
        ev.stop()
        c.docker("rm", "-f", DOCKER_CONTAINER, check=False)
    return times, ev.gaps_ms()[-reps:]


def bench_rss(binary, ref, pinned, runs, settle, agent_cls=c.Agent):
    rows = []
    for run in range(runs):
        addr = f"127.88.9.{run + 1}"
        ports = []
        while len(ports) < 5:
            p = c.free_port(addr)
            if p not in ports:
                ports.append(p)
        comps = [docker_component(
            f"app{i + 1}", pinned, ref, p, 8080,
            ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www"],
            health={"type": "http", "port": "http", "path": "/", "interval": "1s", "timeout": "500ms"})
            for i, p in enumerate(ports)]
        instance = f"i-bench-rss-{run + 1}"
        agent = agent_cls(binary, addr, comps, instance=instance)
        label = f"label=drover.instance={instance}"
        try:
            for p in ports:
                if not c.wait_serving(addr, p, 120):
                    raise RuntimeError(f"{addr}:{p} never served; see {agent.dir}/agent.log")
            time.sleep(settle)
            if agent.proc.poll() is not None:
                raise RuntimeError("the agent exited")
            st = c.proc_status(agent.pid)
            n = len(c.docker("ps", "-q", "--filter", label).split())
            rows.append({"rss": st["VmRSS"], "hwm": st["VmHWM"], "containers": n,
                         "threads": len(os.listdir(f"/proc/{agent.pid}/task"))})
            anon = file_ = 0
            with open(f"/proc/{agent.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon = int(line.split()[1])
                    elif line.startswith("RssFile:"):
                        file_ = int(line.split()[1])
            rows[-1].update({"anon": anon, "file": file_})
            c.log(f"rss run {run + 1}: VmRSS {st['VmRSS']} kB (anon {anon}, file {file_}), "
                  f"VmHWM {st['VmHWM']} kB, {n} containers")
        finally:
            agent.stop()
            c.docker("rm", "-f", *c.docker("ps", "-aq", "--filter", label).split(), check=False)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rss-runs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    why = c.docker_usable()
    if why:
        sys.exit(f"bench/docker.py needs Docker: {why}")
    binary, bin_dir, bin_label = c.snapshot_binary(c.drover_bin())
    lean_bin, _, lean_label = c.snapshot_binary(c.agent_bin())
    m = c.machine()
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    registry = Registry()
    images = []
    try:
        demo_ref, demo_pin = build_and_push(registry, DEMO, demo_files(binary), ["/drover"])
        bb_ref, bb_pin = build_and_push(registry, BUSYBOX, busybox_files(), ["/bin/busybox"])
        images = [demo_pin, bb_pin]
        resp = {}
        for net in ("host", "bridge"):
            resp[net] = (bench_drover_respawn(lean_bin, demo_ref, demo_pin, args.reps, net),
                         bench_docker_respawn(demo_ref, demo_pin, args.reps, net))
        rss = bench_rss(binary, bb_ref, bb_pin, args.rss_runs, args.settle)
        rss_lean = bench_rss(lean_bin, bb_ref, bb_pin, args.rss_runs, args.settle)
    finally:
        registry.stop()
        for i in images:
            c.docker("rmi", "-f", i, check=False)
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    p50 = lambda xs: c.pct(xs, 50)  # noqa: E731

    def resp_row(name, net, xs, gaps):
        g = f"{p50(gaps):.0f}" if gaps else "-"
        return (f"| {name} | {net} | {len(xs)} | {p50(xs):.0f} | {c.pct(xs, 90):.0f} | {max(xs):.0f} "
                f"| {g} |")

    out = ["## Docker runtime\n", c.machine_md(m) + "\n",
           f"Binaries: {bin_label}; {lean_label}. Docker Engine {c.docker_version()}. Command: `python3 bench/docker.py` "
           f"({args.reps} kills each, {args.rss_runs} memory runs). `uptime` at start: `{uptime_start}`; "
           f"at the end: `{uptime_end}`.\n",
           "Images built by the script and pushed to a `docker-registry` on loopback; the agent pulls "
           "them and runs them pinned by digest. Respawn: the same demo-server image and command for "
           "both, on each network: the host's (`network = \"host\"`; `docker run --network host`: the "
           "server binds a loopback address itself) and the default bridge (the port published on a "
           "loopback address: `-p ADDR:PORT:8080`). SIGKILL of the container's `State.Pid`, then the "
           "first HTTP 200 on `GET /` at ADDR:PORT, polled every 1 ms with 100 ms timeouts once the "
           "process is gone. drover: a standalone agent, `reset_after = 1s`, kills 1.5 s apart (each a "
           "first restart, immediate by design). Docker: `--restart=always`, kills 11 s apart (each "
           "Docker's first restart: it waits 100 ms, and resets its backoff after 10 s of running). "
           "\"die -> start\" is from the engine's own event times (`docker events`): the supervisor's "
           "reaction plus the engine's work to start the container again, without the client's "
           "polling.\n",
           "| Respawn | network | n | p50 (ms) | p90 (ms) | max (ms) | die -> start p50 (ms) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    ratios = {}
    for net in ("host", "bridge"):
        (d, d_gaps), (k, k_gaps) = resp[net]
        out.append(resp_row("`drover-agent`", net, d, d_gaps))
        out.append(resp_row("Docker `--restart=always`", net, k, k_gaps))
        ratios[net] = p50(d) / p50(k)
    out += ["",
            "Goal (drover's median at most 1.1 x Docker's): " + "; ".join(
                f"{net}: ratio {r:.2f}, **{'met' if r <= 1.1 else 'NOT met'}**" for net, r in ratios.items())
            + ". On the bridge, clients that retry while the container restarts make the host's "
            "ARP entry for the container's address incomplete, and the kernel asks again only a "
            "second later: the agent writes the entry itself once the container runs (see "
            "`crates/drover-agent/src/neigh.rs`); Docker does not, which is most of the bridge gap.\n"]
    kb = lambda x: f"{x / 1024:.1f}"  # noqa: E731

    def rss_rows(name, rows, goal):
        s, h = c.stats([r["rss"] for r in rows]), c.stats([r["hwm"] for r in rows])
        a, f = c.stats([r["anon"] for r in rows]), c.stats([r["file"] for r in rows])
        g = f"< 10 MiB: **{'met' if s['max'] < RSS_GOAL_KB else 'NOT met'}**" if goal else ""
        return [f"| {name} VmRSS (MiB) | {kb(s['min'])} | {kb(s['median'])} | {kb(s['max'])} | {g} |",
                f"| {name} VmHWM (MiB) | {kb(h['min'])} | {kb(h['median'])} | {kb(h['max'])} | |",
                f"| {name} RssAnon / RssFile, median (MiB) | | {kb(a['median'])} / {kb(f['median'])} | | |"]

    out += ["| Agent memory, 5 containers | min | median | max | goal |",
            "|---|---:|---:|---:|---|"]
    lean_mb = os.path.getsize(lean_bin) / 1e6
    full_mb = os.path.getsize(binary) / 1e6
    out += rss_rows(f"`drover-agent` ({lean_mb:.1f} MB; what providers start)", rss_lean, True)
    out += rss_rows(f"`drover agent` (the {full_mb:.1f} MB `drover` binary)", rss, False)
    out += ["",
            f"Each memory run: one standalone agent, 5 busybox httpd containers pulled from the "
            f"registry (bridge, ports published on one instance address), an HTTP health check every "
            f"1 s each, {args.settle:g} s settling once all serve; {rss[0]['threads']} thread(s) in the "
            "agent. RSS is the agent process's own; the containers' processes are children of "
            "`containerd-shim`, not of the agent. RssFile is mostly the executable's code: the kernel "
            "maps the 64 KiB around every page of code the agent runs (fault-around), so the same "
            "agent code costs more resident memory inside the multi-purpose `drover` binary (server, "
            "CLI, store, balancer) than in `drover-agent`, the agent alone (the same "
            "`drover_agent::run` and arguments), which the `local` provider starts whenever it is "
            "installed next to `drover`. The respawn rows above are `drover-agent`'s."]
    body = "\n".join(out) + "\n"
    print(body)
    if not args.no_write:
        c.write_section("docker", body)


if __name__ == "__main__":
    main()
