#!/usr/bin/env python3
"""How fast a bad version is caught: a crash at start, and a version bad only under load.

One `drover up` of the example fleet (local provider, 3 instances of the demo server, subnet
127.78.0.0/16, its own API and ingress ports) with a canary (`instances = 1, bake = "5s"`)
judged on the demo server's `error_rate`, and steady load through the ingress (a Python
client, 4 at once, a new connection per request). Per round:
- `drover deploy web app crashN --wait`: the demo server exits at start on that version
  (`--crash-on-versions`); measured: the deploy's `applied` event to the rollout's `failed`
  event (server clock), and the command's wall time; and whether its output names the exit
  and prints the crash line;
- `drover deploy web app badN --wait`: 1 request in 5 answers 500 on that version
  (`--error-rate-on-versions`); measured: `applied` to the canary's failed verdict, and the
  failed requests during the round against all requests.

    python3 bench/detect.py [--rounds 3] [--no-write] [--keep]

Results go to docs/benchmarks.md (section "detect").
"""

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402

SUBNET = "127.78.0.0/16"
BAKE_S = 5


def fleet_text(ingress_port, rounds):
    with open(os.path.join(c.ROOT, "examples", "hello", "drover.toml")) as f:
        text = f.read()
    crash = ", ".join(f'"--crash-on-versions", "crash{k}"' for k in range(rounds))
    bad = ", ".join(f'"--error-rate-on-versions", "bad{k}=0.2"' for k in range(rounds))
    subs = [
        ("127.0.0.1:8080", f"127.0.0.1:{ingress_port}"),
        ('provider = "local"', f'provider = "local"\nsubnet = "{SUBNET}"'),
        ('drain_timeout = "10s"',
         f'drain_timeout = "2s"\ncanary = {{ instances = 1, bake = "{BAKE_S}s" }}\n'
         'analysis = { metrics = [{ metric = "error_rate", direction = "lower", '
         'max_ratio = 1.5, tolerance = 0.02 }] }'),
        ('"--message", "hello from web {version}"]',
         f'"--message", "hello from web {{version}}", {crash}, {bad}]\n'
         'custom_metrics = { error_rate = { port = "http", path = "/error_rate" } }'),
    ]
    for old, new in subs:
        if old not in text:
            raise SystemExit(f"examples/hello/drover.toml changed: no {old!r} to replace")
        # Every occurrence of the ingress address (the comment names it too), else the first.
        text = text.replace(old, new) if old.startswith("127.") else text.replace(old, new, 1)
    return text


class Load:
    """GETs from `conns` clients, a new connection each (many short-lived clients: behind an
    L4 balancer a canary only gets new connections), until stopped; counts answers and
    failures."""

    def __init__(self, port, conns=4):
        self.port, self.stop_flag = port, threading.Event()
        self.ok = self.failed = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(conns)]
        for t in self.threads:
            t.start()

    def run(self):
        conn = None
        while not self.stop_flag.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/", headers={"Connection": "close"})
                r = conn.getresponse()
                r.read()
                conn.close()
                conn = None
                with self.lock:
                    if r.status == 200:
                        self.ok += 1
                    else:
                        self.failed += 1
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.failed += 1
                conn = None
                time.sleep(0.01)
            time.sleep(0.005)

    def take(self):
        with self.lock:
            r = (self.ok, self.failed)
            self.ok = self.failed = 0
            return r

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=5)


def events(binary, server):
    r = subprocess.run([binary, "events", "--json", "--limit", "100000", "--server", server],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def status(binary, server):
    r = subprocess.run([binary, "status", "--json", "--server", server],
                       capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def wait_settled(binary, server, n, timeout_s):
    """Until n instances, all on the group's generation and in rotation, no rollout open."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        s = status(binary, server)
        g = s and s.get("groups") and s["groups"][0]
        if g and not g["rollout"]["in_progress"] and len(g["instances"]) == n and all(
                i["generation"] == g["generation"] and i["in_rotation"] for i in g["instances"]):
            return
        time.sleep(0.2)
    raise RuntimeError(f"not settled within {timeout_s}s: {s}")


def deploy(binary, server, version):
    t = time.monotonic()
    r = subprocess.run([binary, "deploy", "web", "app", version, "--wait", "--timeout", "2m",
                        "--server", server], capture_output=True, text=True)
    return r, time.monotonic() - t


def between(evs, after_seq, start_text, end_text):
    """at_ms of the first event after `after_seq` containing end_text, minus the first
    containing start_text."""
    start = next(e for e in evs if e["seq"] > after_seq and start_text in e["message"])
    end = next(e for e in evs if e["seq"] > after_seq and end_text in e["message"])
    return (end["at_ms"] - start["at_ms"]) / 1000.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    binary = c.drover_bin()
    work = tempfile.mkdtemp(prefix="drover-bench-detect-")
    data = os.path.join(work, "data")
    api_port, ing_port = c.free_port(), c.free_port()
    api = f"127.0.0.1:{api_port}"
    server = f"http://{api}"
    fleet = os.path.join(work, "drover.toml")
    with open(fleet, "w") as f:
        f.write(fleet_text(ing_port, a.rounds))
    os.environ["DROVER_DATA_DIR"] = data
    up_out = open(os.path.join(work, "up.log"), "w")
    up = subprocess.Popen([binary, "up", fleet, "--data-dir", data, "--listen", api],
                          cwd=work, stdin=subprocess.DEVNULL, stdout=up_out,
                          stderr=subprocess.STDOUT, start_new_session=True)
    c.log(f"work dir {work}; drover up pid {up.pid}; api {api}; ingress {ing_port}")
    crash, bad = [], []
    load = None
    try:
        wait_settled(binary, server, 3, 60)
        load = Load(ing_port)
        for k in range(a.rounds):
            seq = max(e["seq"] for e in events(binary, server))
            r, wall = deploy(binary, server, f"crash{k}")
            out = r.stdout + r.stderr
            assert r.returncode == 1, out
            evs = events(binary, server)
            took = between(evs, seq, "deploy web app crash", f"rollout to generation")
            named = "exited 3 times before it was ever healthy" in out
            line = "crashes at start" in out
            crash.append((took, wall, named, line))
            c.log(f"crash{k}: failed {took:.2f}s after the deploy (command {wall:.2f}s); "
                  f"exit named: {named}; crash line printed: {line}")
            wait_settled(binary, server, 3, 60)
            load.take()
            seq = max(e["seq"] for e in evs)
            r, wall = deploy(binary, server, f"bad{k}")
            out = r.stdout + r.stderr
            assert r.returncode == 1 and "canary analysis failed" in out, out
            wait_settled(binary, server, 3, 60)
            ok, failed = load.take()
            evs = events(binary, server)
            took = between(evs, seq, "deploy web app bad", "canary analysis failed")
            bad.append((took, ok, failed))
            c.log(f"bad{k}: canary failed it {took:.2f}s after the deploy; "
                  f"{failed} of {ok + failed} requests failed")
    finally:
        if load:
            load.stop()
        os.killpg(up.pid, 15)  # only the `drover up` this script started, by its group
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, 9)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    m = c.machine()
    L = ["## Detecting a bad version", "",
         f"{c.machine_md(m)} Binary: {c.binary_label(binary)}. "
         f"`python3 bench/detect.py --rounds {a.rounds}`: "
         "`drover up` of the example (3 instances, canary 1 instance baked "
         f"{BAKE_S} s on `error_rate`, `fail_after_exits` 3), load from 4 clients "
         "through the ingress, a new connection per request.", "",
         "| round | crash at start: deploy -> failed | `deploy --wait` returns | exit and crash "
         "line printed | bad under load: deploy -> canary failed | failed requests |",
         "|---|---|---|---|---|---|"]
    for k, ((ct, cw, named, line), (bt, ok, failed)) in enumerate(zip(crash, bad)):
        L.append(f"| {k + 1} | {ct:.2f} s | {cw:.2f} s | {'yes' if named and line else 'no'} | "
                 f"{bt:.2f} s | {failed} of {ok + failed} ({failed * 100 / max(1, ok + failed):.1f} %) |")
    L += ["", "Goal: a crash at start fails its rollout in under 5 s (was `healthy_deadline`, "
          "30 s). A version bad under load fails at the end of its bake (boot + "
          "min_healthy_time + bake); its failed requests (counted over the whole round) stay "
          "within the canary's share: 1 of 4 instances in rotation x 1 in 5 answers = 5 %, during "
          "its bake only."]
    body = "\n".join(L)
    print(body)
    if not a.no_write:
        c.write_section("detect", body)
    ok = all(ct < 5 and named and line for ct, _, named, line in crash)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
