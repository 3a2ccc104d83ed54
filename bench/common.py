"""Shared helpers for the benchmarks under bench/ (python3 standard library only)."""

import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")

DOC_HEADER = """# Benchmarks

Measured numbers for the targets in DESIGN.md "Numbers we aim at". Each benchmark is one
command from the repository root; it builds `target/release/drover` first if it is missing
(set `DROVER_BIN=/path/to/drover` to measure another build), prints its tables, and rewrites
its own section of this file (`--no-write` to only print).

| Benchmark | Command | What it measures |
|---|---|---|
| Agent memory | `python3 bench/agent_rss.py` | RSS of one standalone `drover agent` at idle with 3 components, beside `containerd-shim-runc-v2` and the Docker daemons measured in the same run |
| Respawn | `python3 bench/respawn.py` | SIGKILL of a component to its first successful HTTP GET, under a standalone agent and under Docker `--restart=always`, in the same run |

Both need Linux (`/proc`); the Docker comparisons need a working `docker` CLI and daemon and
are skipped (and said so) otherwise. Only containers and images the scripts name
`drover-bench-*` are created, and they are removed at the end.
"""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _release_bin(name, env):
    """target/release/NAME of the `drover` package (or $ENV), built first if missing."""
    b = os.environ.get(env)
    if b:
        return os.path.abspath(b)
    b = os.path.join(ROOT, "target", "release", name)
    if not os.path.exists(b):
        log(f"building target/release/{name} ...")
        subprocess.run(["cargo", "build", "--release", "-p", "drover", "--bin", name],
                       cwd=ROOT, check=True)
    return b


def drover_bin():
    """The release binary, built first if missing."""
    return _release_bin("drover", "DROVER_BIN")


def agent_bin():
    """The lean agent binary (`drover-agent`, what providers start), built first if missing."""
    return _release_bin("drover-agent", "DROVER_AGENT_BIN")


def snapshot_binary(b):
    """Copy the binary to a temporary file (others may rebuild target/ during a run) and describe
    the original. Returns (path of the copy, its directory to remove, markdown label)."""
    import hashlib
    label = binary_label(b)
    import atexit
    d = tempfile.mkdtemp(prefix="drover-bench-bin-")
    atexit.register(shutil.rmtree, d, True)
    copy = os.path.join(d, os.path.basename(b))
    shutil.copy2(b, copy)
    with open(copy, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return copy, d, f"{label[:-1]}, sha256 {digest}; copied once, used for the whole run)"


def binary_label(b):
    st = os.stat(b)
    mtime = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    rel = os.path.relpath(b, ROOT) if b.startswith(ROOT) else b
    return f"`{rel}` ({st.st_size / 1e6:.1f} MB, built {mtime:%Y-%m-%d %H:%M} UTC; repo HEAD {commit})"


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "kernel": platform.release(),
        "cpu": cpu,
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "date": date,
        "load": open("/proc/loadavg").read().split()[0],
    }


def machine_md(m):
    return (f"Machine: `nproc` {m['nproc']}, kernel `{m['kernel']}`, CPU \"{m['cpu']}\", "
            f"RAM {m['ram']}. Date: `{m['date']}`. Load average (1 min) at start: {m['load']} "
            "(other builds may share the machine).")


def proc_status(pid):
    """VmRSS, VmHWM (kB) and PPid of a process, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
            elif k == "PPid":
                out[k] = int(v.strip())
    return out


def children(pid):
    """Direct children of a process (all its threads)."""
    kids = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/children") as f:
                    kids += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return sorted(set(kids))


def alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        return s[s.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(host, port, path="/", timeout=0.5):
    """Status code of one HTTP/1.0 GET, or None if it failed in any way."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
        m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def wait_serving(host, port, deadline_s, path="/"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if http_get(host, port, path) == 200:
            return True
        time.sleep(0.01)
    return False


def component(name, port, health_interval="1s", restart=None):
    return {
        "name": name, "runtime": "process", "version": "v1", "command": "{drover}",
        "args": ["demo-server", "--listen", "{addr}:{port.http}", "--message", f"hello from {name}"],
        "ports": {"http": port},
        "health": {"type": "http", "port": "http", "path": "/healthz", "interval": health_interval,
                   "timeout": "500ms", "healthy_threshold": 1, "unhealthy_threshold": 3},
        "restart": restart or {"initial_delay": "200ms", "max_delay": "30s", "reset_after": "1m"},
        "stop_grace": "2s", "stop_signal": "SIGTERM",
    }


class Agent:
    """One standalone agent (`drover agent --standalone`, or `drover-agent --standalone` when
    `binary` is the lean agent binary) in its own process group and temporary directory."""

    def __init__(self, binary, addr, components, instance="i-bench"):
        self.dir = tempfile.mkdtemp(prefix="drover-bench-")
        self.addr = addr
        plan = {"fleet": "bench", "service": "web", "region": "local", "generation": 1,
                "revision": 1, "components": components}
        plan_file = os.path.join(self.dir, "plan.json")
        with open(plan_file, "w") as f:
            json.dump(plan, f)
        self.log = open(os.path.join(self.dir, "agent.log"), "w")
        self.proc = subprocess.Popen(
            [binary, *([] if os.path.basename(binary).startswith("drover-agent") else ["agent"]),
             "--instance", instance, "--group", "web/local", "--addr", addr,
             "--standalone", "--plan-file", plan_file, "--dir", os.path.join(self.dir, instance)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                # Only the process group this script started.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def docker(*args, check=True, timeout=300):
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def docker_usable():
    """None if the Docker CLI and daemon answer, else why not."""
    if not shutil.which("docker"):
        return "no `docker` CLI on this machine"
    try:
        r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`docker info` failed: {e}"
    if r.returncode != 0 or not r.stdout.strip():
        return f"`docker info` failed: {r.stderr.strip()[:200]}"
    return None


def docker_version():
    return docker("info", "--format", "{{.ServerVersion}}", check=False)


def docker_build(tag, context):
    # The legacy builder is enough for a FROM scratch image; quiet prints the image id.
    return docker("build", "-q", "-t", tag, context, timeout=600)


def container_pid(name):
    return int(docker("inspect", "-f", "{{.State.Pid}}", name))


def container_id(name):
    return docker("inspect", "-f", "{{.Id}}", name)


def shim_pid(name):
    """The containerd-shim of a container: the parent of its main process, checked by cmdline."""
    cid = container_id(name)
    pid = container_pid(name)
    ppid = proc_status(pid)["PPid"]
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    if "containerd-shim" not in cmd or cid not in cmd:
        raise RuntimeError(f"parent {ppid} of container {name} is not its shim: {cmd}")
    return ppid, cmd.split()[0]


def pidof_exact(exe):
    """PIDs whose /proc/PID/exe basename is exactly `exe` (read only, to measure; never to kill)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.path.basename(os.readlink(f"/proc/{d}/exe")) == exe:
                    out.append(int(d))
            except OSError:
                pass
    return out


def stats(xs):
    xs = sorted(xs)
    return {"min": xs[0], "median": statistics.median(xs), "max": xs[-1]}


def pct(xs, p):
    """Nearest-rank percentile."""
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, -(-p * len(xs) // 100) - 1))
    return xs[int(k)]


def write_section(name, body):
    """Replace this benchmark's section of docs/benchmarks.md (created with its header if missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(DOC).read() if os.path.exists(DOC) else DOC_HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(text)
    log(f"wrote section {name} of {os.path.relpath(DOC, ROOT)}")
