"""Chaos soak (issue 20): the example fleet under steady load through its ingress while faults
are injected at random from a printed seed; see bench/chaos.sh for the command and settings.

Faults (one every FAULT_GAP seconds or so, drawn from the seed):
  kill_component  SIGKILL of one instance's component (its agent restarts it)
  kill_agent      SIGKILL of one agent (the server must replace that instance)
  stop_agent      SIGSTOP of one agent for 1-3 s, then SIGCONT (shorter than silent_after:
                  nothing may be replaced)
  kill_server     SIGKILL of `drover server`, started again 1-3 s later
  kill_lb         SIGKILL of the balancer process (`drover lb`; the server starts it again)
  idle_conns      5,000 idle TCP connections to the API, held 10 s
  hb_flood        an agent token of the group (as if stolen): 2,000 heartbeats for the other
                  instances with seq = 2^64-1, and 2,000 garbage bodies
  registry_outage the artifact host (the example fleet has no registry: its component gets an
                  artifact served by this script over HTTP, the local provider's artifact
                  path) refuses or hangs for 20 s, with a deploy in the middle
Every DEPLOY_EVERY seconds a deploy, alternating a good version and a broken one (its
component exits at once: the rollout fails and is reverted).

It reports failed requests (each matched to the fault windows open when it failed), instances
replaced against those that had to be, acknowledged changes missing afterwards, server and
agent RSS growth, store growth, and panics in any log; and writes the "Chaos soak" section of
docs/benchmarks.md unless --no-write. Exit status 0 when every goal is met.
"""

import hashlib
import hmac
import http.client
import io
import json
import os
import sqlite3
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import log  # noqa: E402

ARGS = sys.argv[1:]
WRITE = "--no-write" not in ARGS
ARGS = [a for a in ARGS if a != "--no-write"]
DURATION = common_duration = None


def parse_duration(s):
    m = re.fullmatch(r"(\d+)(s|m|h)?", s)
    if not m:
        sys.exit(f"chaos: duration {s!r} is not like 30m, 180s or 1h")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 60}[m.group(2)]


DURATION = parse_duration(ARGS[0] if ARGS else os.environ.get("DURATION", "30m"))
SEED = int(os.environ.get("SEED") or random.SystemRandom().randrange(1, 2**31))
FAULT_GAP = float(os.environ.get("FAULT_GAP", "6"))
DEPLOY_EVERY = float(os.environ.get("DEPLOY_EVERY", "60"))
RATE = float(os.environ.get("RATE", "100"))  # requests/s through the ingress
LOADERS = 4
SUBNET = int(os.environ.get("SUBNET", "63"))
# Event retention of the soak's server: low enough that retention runs within the soak (the
# server's default keeps 100,000), so that a flat store shows retention at work.
EVENTS_KEEP = int(os.environ.get("EVENTS_KEEP", "500"))
# Memory and store goals need a long run; a short one (CI) reports them without judging.
JUDGE_GROWTH = DURATION >= 600
rng = random.Random(SEED)
T0 = time.monotonic()


def now():
    return time.monotonic() - T0


# ---------------------------------------------------------------------------------------------
# Set-up

DROVER = os.environ.get("DROVER_BIN") or common.drover_bin()
AGENT = os.environ.get("AGENT_BIN") or os.path.join(os.path.dirname(DROVER), "drover-agent")
TMP = os.environ.get("CHAOS_DIR") or __import__("tempfile").mkdtemp(prefix="drover-chaos.")
os.makedirs(TMP, exist_ok=True)
BIN = os.path.join(TMP, "bin")
os.makedirs(BIN, exist_ok=True)
# Others may rebuild target/ during the run: run copies.
shutil.copy2(DROVER, os.path.join(BIN, "drover"))
if os.path.exists(AGENT):
    shutil.copy2(AGENT, os.path.join(BIN, "drover-agent"))
DROVER = os.path.join(BIN, "drover")
BIN_LABEL = os.environ.get("BIN_NOTE") or os.path.relpath(os.environ.get("DROVER_BIN") or "target/release/drover", common.ROOT)
DATA = os.path.join(TMP, "data")
API_PORT = common.free_port()
INGRESS = common.free_port()
ART_PORT = common.free_port()
API = f"http://127.0.0.1:{API_PORT}"
try:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
except (ValueError, OSError):
    pass

EXAMPLE = open(os.path.join(common.ROOT, "examples", "hello", "drover.toml")).read()

# The artifact host: one small archive per version, served over HTTP; `outage` makes it
# refuse (socket closed) or hang (accept, never answer).
ARTIFACTS = {}
outage = {"mode": None}


def artifact_for(version):
    if version not in ARTIFACTS:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            body = f"app {version}\n".encode()
            info = tarfile.TarInfo("VERSION")
            info.size = len(body)
            info.mtime = 0
            t.addfile(info, io.BytesIO(body))
        ARTIFACTS[version] = buf.getvalue()
    return hashlib.sha256(ARTIFACTS[version]).hexdigest()


def artifact_server():
    ls = None
    while not STOP.is_set():
        if outage["mode"] == "refuse":
            if ls:
                ls.close()
                ls = None
            time.sleep(0.2)
            continue
        if ls is None:
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", ART_PORT))
            ls.listen(128)
            ls.settimeout(0.2)
        try:
            c, _ = ls.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve_artifact, args=(c,), daemon=True).start()
    if ls:
        ls.close()


def serve_artifact(c):
    try:
        c.settimeout(5)
        req = c.recv(4096).decode(errors="replace")
        if outage["mode"] == "hang":
            time.sleep(25)
            return
        m = re.match(r"GET /app-(\S+)\.tar\.gz ", req)
        body = ARTIFACTS.get(m.group(1)) if m else None
        if body is None:
            c.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        else:
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    finally:
        c.close()


def fleet(version, broken=False):
    sha = artifact_for(version)
    text = (EXAMPLE.replace("127.0.0.1:8080", f"127.0.0.1:{INGRESS}")
            .replace('provider = "local"', f'provider = "local"\nsubnet = "127.{SUBNET}.0.0/16"')
            .replace('version = "v1"', f'version = "{version}"'))
    extra = ', "--crash-after", "0s"' if broken else ""
    text = text.replace('"hello from web {version}"]', f'"hello from web {{version}}"{extra}]')
    text += (f'artifact = {{ url = "http://127.0.0.1:{ART_PORT}/app-{{version}}.tar.gz", '
             f'sha256 = "{sha}" }}\n')
    return text


# ---------------------------------------------------------------------------------------------
# Processes

STOP = threading.Event()
server_proc = {"p": None}
server_log = open(os.path.join(TMP, "server.log"), "ab")


def start_server():
    p = subprocess.Popen([DROVER, "server", "--data-dir", DATA, "--listen", f"127.0.0.1:{API_PORT}",
                          "--events-keep", str(EVENTS_KEEP)],
                         stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    server_proc["p"] = p
    for _ in range(400):
        if api_up():
            return
        time.sleep(0.05)
    log("chaos: the server did not answer; tail of server.log:")
    os.system(f"tail -n 20 {TMP}/server.log >&2")
    sys.exit(1)


def api_up():
    """The API answers (the port accepts before the server serves) and the admin token is
    written."""
    if not os.path.exists(os.path.join(DATA, "admin.token")):
        return False
    return common.http_get("127.0.0.1", API_PORT, "/v1/health", timeout=1) == 200


def token():
    return open(os.path.join(DATA, "admin.token")).read().strip()


def api(method, path, body=None, tok=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(API + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {tok or token()}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


def status():
    try:
        code, s = api("GET", "/v1/status", timeout=3)
        return s if code == 200 else None
    except (OSError, ValueError):
        return None


def pid_file(path):
    try:
        return int(open(path).read().strip())
    except (OSError, ValueError):
        return None


def agents():
    out = {}
    d = DATA + ".instances"  # beside the data directory (DATA.instances/ID)
    for i in os.listdir(d) if os.path.isdir(d) else []:
        p = pid_file(os.path.join(d, i, "agent.pid"))
        if p and common.alive(p):
            out[i] = p
    return out


def lb_pid():
    p = pid_file(os.path.join(DATA, "lb", "lb.pid"))
    return p if p and common.alive(p) else None


def rss_kb(pid):
    try:
        return common.proc_status(pid).get("VmRSS", 0)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Load: RATE requests/s through the ingress, one connection each; every failure timed.

failures = []  # (t, what)
ok_count = [0]
lock = threading.Lock()


def loader(i):
    gap = LOADERS / RATE
    nxt = time.monotonic()
    while not STOP.is_set():
        nxt += gap
        t = now()
        try:
            with socket.create_connection(("127.0.0.1", INGRESS), timeout=3) as s:
                s.settimeout(3)
                s.sendall(b"GET / HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            if data.startswith(b"HTTP/1.1 200") and b"hello from web" in data:
                with lock:
                    ok_count[0] += 1
            else:
                with lock:
                    failures.append((t, "bad answer: " + data[:40].decode(errors="replace")))
        except OSError as e:
            with lock:
                failures.append((t, type(e).__name__))
        d = nxt - time.monotonic()
        if d > 0:
            time.sleep(d)
        else:
            nxt = time.monotonic()


# ---------------------------------------------------------------------------------------------
# Faults

windows = []  # (start, end, kind, detail)
must_replace = set()  # instances whose agent was killed
stopped = {}  # instance -> seconds stopped
acked = {}  # revision -> version
deploys = []  # (t, version, broken, outcome)


def window(kind, detail, start, end):
    windows.append((start, end, kind, detail))
    log(f"chaos: {start:7.1f}s {kind} {detail} ({end - start:.1f}s)")


def f_kill_component():
    s = status()
    inst = [i for g in (s or {}).get("groups", []) for i in g["instances"]
            if any(c.get("pid") for c in i["components"])]
    if not inst:
        return
    i = rng.choice(inst)
    pid = next(c["pid"] for c in i["components"] if c.get("pid"))
    t = now()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    window("kill_component", f"{i['id']} pid {pid}", t, t + 3)


def f_kill_agent():
    a = agents()
    if not a:
        return
    i = rng.choice(sorted(a))
    t = now()
    try:
        os.killpg(a[i], signal.SIGKILL)  # the agent and its components (its process group)
    except ProcessLookupError:
        return
    must_replace.add(i)
    window("kill_agent", i, t, t + 3)


def f_stop_agent():
    a = agents()
    if not a:
        return
    i = rng.choice(sorted(a))
    secs = rng.uniform(1, 3)
    t = now()
    try:
        os.kill(a[i], signal.SIGSTOP)
        time.sleep(secs)
    finally:
        try:
            os.kill(a[i], signal.SIGCONT)
        except ProcessLookupError:
            pass
    stopped[i] = max(stopped.get(i, 0), secs)
    window("stop_agent", f"{i} {secs:.1f}s", t, now() + 1)


def f_kill_server():
    p = server_proc["p"]
    t = now()
    p.kill()
    p.wait()
    time.sleep(rng.uniform(1, 3))
    start_server()
    window("kill_server", f"pid {p.pid}", t, now() + 2)


def f_kill_lb():
    pid = lb_pid()
    if not pid:
        return
    t = now()
    os.kill(pid, signal.SIGKILL)
    # Until the ingress accepts again (the server's supervisor starts a new balancer).
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", INGRESS), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    window("kill_lb", f"pid {pid}", t, now() + 1)


def f_idle_conns():
    t = now()
    conns = []
    for _ in range(5000):
        try:
            conns.append(socket.create_connection(("127.0.0.1", API_PORT), timeout=2))
        except OSError:
            break
    opened = len(conns)
    time.sleep(10)
    for c in conns:
        c.close()
    window("idle_conns", f"{opened} opened", t, now() + 1)


stolen = {"group": None}


def instance_token_of(instance):
    """The token the local provider gave `instance` (as if read out of it): derived from the
    group's agent token as the server does, from the agent-token key in the store."""
    code, toks = api("GET", "/v1/tokens")
    if code != 200:
        return None
    ids = sorted(t["id"] for t in toks if t.get("group") == "web/local" and not t.get("revoked_at_ms"))
    if not ids:
        return None
    with sqlite3.connect(f"file:{os.path.join(DATA, 'drover.db')}?mode=ro", uri=True) as db:
        key = db.execute("SELECT value FROM secrets WHERE name = 'agent-token-key'").fetchone()[0]
    tid = ids[0]
    group = "drover_agent_" + hmac.new(key, f"drover agent token {tid}".encode(), hashlib.sha256).hexdigest()
    mac = hmac.new(group.encode(), f"drover instance token {instance}".encode(), hashlib.sha256).hexdigest()
    return f"drover_instance.{instance}.{tid}.{mac}"


def f_hb_flood():
    """A stolen instance token (and a group agent token) used to speak for the other instances
    with seq = 2^64-1, and garbage bodies; every answer counted by status code."""
    if not stolen["group"]:
        code, made = api("POST", "/v1/tokens", {"scope": "agent", "name": "chaos-stolen",
                                                "group": "web/local"})
        if code != 201:
            return
        stolen["group"] = made["token"]
    s = status()
    inst = [i for g in (s or {}).get("groups", []) for i in g["instances"]]
    if len(inst) < 2:
        return
    thief = rng.choice(inst)
    tokens = [t for t in (instance_token_of(thief["id"]), stolen["group"]) if t]
    others = [i for i in inst if i["id"] != thief["id"]]
    t = now()
    answers = {}
    conn = http.client.HTTPConnection("127.0.0.1", API_PORT, timeout=5)
    for n in range(4000):
        tok = tokens[n % len(tokens)]
        hdr = {"Authorization": f"Bearer {tok}", "Content-Type": "application/json"}
        i = rng.choice(others)
        if n % 4 < 2:
            body = json.dumps({"instance": i["id"], "group": "web/local",
                               "generation": i["generation"], "addr": i["addr"],
                               "phase": "running", "seq": 2**64 - 1,
                               "components": [{"name": "app", "version": "x", "state": "healthy",
                                               "restarts": n % 2, "message": "x" * 5000}],
                               "utilization": {"cpu": 0, "memory_bytes": 0,
                                               "agent_rss_bytes": 0}}).encode()
        else:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        try:
            conn.request("POST", "/v1/agent/heartbeat", body=body, headers=hdr)
            r = conn.getresponse()
            got = r.read()
            # 200 with `"known": false`: the instance is gone (terminated since the status
            # read), nothing was taken for it.
            key = str(r.status)
            if r.status == 200 and b'"known":false' in got.replace(b" ", b""):
                key = "200 unknown"
            answers[key] = answers.get(key, 0) + 1
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", API_PORT, timeout=5)
            answers["error"] = answers.get("error", 0) + 1
    conn.close()
    flood_answers.append(answers)
    window("hb_flood", f"as {thief['id']}: " + json.dumps(answers, sort_keys=True), t, now() + 1)


flood_answers = []


version_n = [1]


def deploy(broken, during_outage=None):
    version_n[0] += 1
    v = f"v{version_n[0]}" + ("-broken" if broken else "")
    t = now()
    try:
        code, r = api("POST", "/v1/apply", {"file": "drover.toml", "toml": fleet(v, broken)},
                      timeout=60)
    except (OSError, ValueError) as e:
        code, r = None, str(e)
    if code == 200 and r.get("applied"):
        acked[r["revision"]] = v
        outcome = f"revision {r['revision']}"
    else:
        outcome = f"not applied: {code} {(r or {}).get('message', r) if isinstance(r, dict) else r}"
    deploys.append((t, v, broken, outcome, during_outage))
    log(f"chaos: {t:7.1f}s deploy {v}: {outcome}")
    window("deploy", v, t, now() + 1)


def f_registry_outage():
    mode = rng.choice(["refuse", "hang"])
    t = now()
    outage["mode"] = mode
    time.sleep(5)
    deploy(broken=False, during_outage=mode)
    time.sleep(max(0, 20 - (now() - t)))
    outage["mode"] = None
    window("registry_outage", mode, t, now() + 1)


FAULTS = [
    (f_kill_component, 3), (f_kill_agent, 2), (f_stop_agent, 2), (f_kill_server, 2),
    (f_kill_lb, 1), (f_idle_conns, 1), (f_hb_flood, 1), (f_registry_outage, 1),
]


# ---------------------------------------------------------------------------------------------
# Samples: RSS of the server and the agents, store size, every 10 s.

samples = []  # (t, server_rss_kb, [agent rss kb], store bytes)


def store_bytes():
    return sum(os.path.getsize(os.path.join(DATA, f)) for f in os.listdir(DATA)
               if f.startswith("drover.db"))


def sampler():
    while not STOP.wait(10):
        p = server_proc["p"]
        srv = rss_kb(p.pid) if p and p.poll() is None else None
        ag = [r for r in (rss_kb(x) for x in agents().values()) if r]
        samples.append((now(), srv, ag, store_bytes()))


# ---------------------------------------------------------------------------------------------
# Run

def main():
    log(f"chaos: seed {SEED}, {DURATION}s, work directory {TMP}")
    threading.Thread(target=artifact_server, daemon=True).start()
    start_server()
    code, r = api("POST", "/v1/apply", {"file": "drover.toml", "toml": fleet("v1")}, timeout=60)
    if code != 200:
        sys.exit(f"chaos: the first apply failed: {code} {r}")
    acked[r["revision"]] = "v1"
    for _ in range(600):
        s = status()
        if s and sum(1 for g in s["groups"] for i in g["instances"] if i["in_rotation"]) >= 3:
            break
        time.sleep(0.1)
    else:
        sys.exit("chaos: the fleet did not come up")
    time.sleep(2)
    load = [threading.Thread(target=loader, args=(i,)) for i in range(LOADERS)]
    for t in load:
        t.start()
    smp = threading.Thread(target=sampler)
    smp.start()
    samples.append((now(), rss_kb(server_proc["p"].pid), [rss_kb(x) for x in agents().values()],
                    store_bytes()))
    next_deploy = now() + DEPLOY_EVERY
    broken = False
    end = now() + DURATION
    only = [x for x in os.environ.get("FAULTS", "").split(",") if x]
    chosen = [(f, w) for f, w in FAULTS if not only or f.__name__[2:] in only]
    fn, w = zip(*chosen)
    while now() < end:
        if now() >= next_deploy:
            deploy(broken)
            broken = not broken
            next_deploy += DEPLOY_EVERY
        else:
            rng.choices(fn, weights=w)[0]()
        time.sleep(rng.uniform(FAULT_GAP / 2, FAULT_GAP * 1.5))
    # Quiet end: load continues 20 s with no fault, so late effects are seen.
    quiet = now()
    time.sleep(20)
    STOP.set()
    for t in load:
        t.join()
    smp.join()
    return quiet


def report(quiet):
    evs, after = [], 0
    while True:
        code, page = api("GET", f"/v1/events?after={after}&limit=5000", timeout=60)
        if code != 200 or not page:
            break
        evs += page
        after = page[-1]["seq"]
    code, revs = api("GET", "/v1/revisions", timeout=60)
    have = {r["number"] for r in revs} if code == 200 else set()
    lost = []
    for n, v in sorted(acked.items()):
        if n not in have:
            lost.append(f"revision {n} ({v}) missing")
            continue
        c, body = api("GET", f"/v1/revisions/{n}", timeout=30)
        if c != 200 or f'version = "{v}"' not in body.get("toml", ""):
            lost.append(f"revision {n} ({v}) does not hold its version")
    # Replacements: `terminating` with "replacing it" (silent, unhealthy, ...), and `lost`.
    replaced = {}
    for e in evs:
        if e["kind"] == "terminating" and "replacing it" in e["message"]:
            replaced[e.get("instance")] = e["message"]
        elif e["kind"] == "lost":
            replaced[e.get("instance")] = e["message"]
    broken_gens = set()
    for e in evs:
        if e["kind"] == "launched" and "-broken" in e["message"]:
            broken_gens.add(e.get("instance"))
    # Replacing an instance that never turned healthy (a broken version, an artifact it could
    # not fetch during an outage) is what has to happen; only a healthy one replaced without
    # a fault of its own is wrong.
    ever_healthy = {e.get("instance") for e in evs if e["kind"] == "healthy"}
    needed = {i for i in replaced
              if i in must_replace or i in broken_gens or i not in ever_healthy}
    wrong = {i: m for i, m in replaced.items() if i not in needed}
    # Failed requests and the windows that explain them (a request may fail up to 3 s after
    # it started: its timeout).
    by_kind, unexplained = {}, []
    for t, what in failures:
        ks = sorted({k for (s, e, k, _) in windows if s - 0.5 <= t <= e + 3})
        if not ks:
            unexplained.append((t, what))
        for k in ks or ["(none)"]:
            by_kind[k] = by_kind.get(k, 0) + 1
    outside_lb = [(t, w) for t, w in failures
                  if not any(k == "kill_lb" and s - 0.5 <= t <= e + 3 for (s, e, k, _) in windows)]
    panics = []
    for root, _, files in os.walk(TMP):
        for f in files:
            if f.endswith(".log"):
                with open(os.path.join(root, f), errors="replace") as fh:
                    for line in fh:
                        if "panicked" in line:
                            panics.append(f"{os.path.relpath(os.path.join(root, f), TMP)}: {line.strip()[:200]}")
    srv = [(t, s) for t, s, _, _ in samples if s]
    ag = [(t, max(a)) for t, _, a, _ in samples if a]
    st = [(t, b) for t, _, _, b in samples]

    def growth(xs):
        if len(xs) < 4:
            return None, None, None
        q = max(1, len(xs) // 4)
        first = sorted(v for _, v in xs[:q])[q // 2]
        last = sorted(v for _, v in xs[-q:])[q // 2]
        return first, last, last / first if first else None

    fault_counts = {}
    for (_, _, k, _) in windows:
        fault_counts[k] = fault_counts.get(k, 0) + 1
    return {
        "seed": SEED, "duration_s": DURATION, "requests_ok": ok_count[0],
        "failed": len(failures), "failed_by_window": by_kind, "unexplained": unexplained[:20],
        # Each failure with the faults whose windows it fell in, for reading a run afterwards.
        "failures": [(round(t, 2), what,
                      sorted({k for (s, e, k, _) in windows if s - 0.5 <= t <= e + 3}))
                     for t, what in failures[:200]],
        "failed_outside_lb_kill": len(outside_lb), "faults": fault_counts,
        "deploys": [(round(t), v, o, d) for t, v, b, o, d in deploys],
        "replaced": len(replaced), "had_to_be": len(needed), "must_replace_killed": len(must_replace),
        "wrongly_replaced": wrong, "lost": lost, "acked": len(acked), "panics": panics[:20],
        "server_rss_kb": growth(srv), "agent_rss_kb": growth(ag), "store_bytes": growth(st),
        "events": len(evs), "oldest_event_seq": evs[0]["seq"] if evs else None,
        "newest_event_seq": evs[-1]["seq"] if evs else None,
        "quiet_from_s": round(quiet), "flood_answers": flood_answers,
        "flood_accepted": sum(a.get("200", 0) for a in flood_answers),
    }


def cleanup():
    p = server_proc["p"]
    if p and p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
    for pid in list(agents().values()) + ([lb_pid()] if lb_pid() else []):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    time.sleep(2)
    for pid in list(agents().values()) + ([lb_pid()] if lb_pid() else []):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def fmt_growth(g, unit):
    first, last, ratio = g
    if first is None:
        return "too few samples"
    if unit == "MB":
        return f"{first / 1024:.1f} MB -> {last / 1024:.1f} MB ({ratio:.2f}x)"
    return f"{first / 1e6:.2f} MB -> {last / 1e6:.2f} MB ({ratio:.2f}x)"


def markdown(r):
    m = common.machine()
    judged = "" if JUDGE_GROWTH else " (not judged in a run under 10 minutes)"
    goals = [
        ("0 panics", len(r["panics"]) == 0, f"{len(r['panics'])}"),
        ("0 lost changes", not r["lost"], f"{len(r['lost'])} of {r['acked']} acknowledged applies"),
        ("0 healthy instances replaced", not r["wrongly_replaced"],
         f"{len(r['wrongly_replaced'])} ({r['replaced']} replaced, {r['had_to_be']} had to be)"),
        ("failed requests only while the balancer was killed", r["failed_outside_lb_kill"] == 0,
         f"{r['failed_outside_lb_kill']} outside, of {r['failed']}"),
        ("0 spoofed heartbeats accepted", r["flood_accepted"] == 0,
         f"{r['flood_accepted']} of {sum(sum(a.values()) for a in r['flood_answers'])}"),
        ("server memory flat", not JUDGE_GROWTH or (r["server_rss_kb"][2] or 9) < 1.5,
         fmt_growth(r["server_rss_kb"], "MB") + judged),
        ("agent memory flat", not JUDGE_GROWTH or (r["agent_rss_kb"][2] or 9) < 1.5,
         fmt_growth(r["agent_rss_kb"], "MB") + judged),
        ("store flat", not JUDGE_GROWTH or (r["store_bytes"][2] or 9) < 1.5,
         fmt_growth(r["store_bytes"], "B") + judged),
        # Retention deleted events (the oldest kept is not the first), and kept about the
        # newest EVENTS_KEEP (a pass runs every minute: what came since the last one is extra).
        ("event retention ran, the store kept its newest events",
         not JUDGE_GROWTH or ((r["oldest_event_seq"] or 0) > 1
                              and r["events"] <= EVENTS_KEEP * 2),
         f"{r['events']} stored, seq {r['oldest_event_seq']} to {r['newest_event_seq']}, "
         f"keeping {EVENTS_KEEP}" + judged),
    ]
    L = ["## Chaos soak", "",
         f"`bench/chaos.sh {r['duration_s'] // 60}m`, seed **{r['seed']}** (`SEED={r['seed']}` "
         f"replays the same draw of faults), binary `{BIN_LABEL}`. {common.machine_md(m)}", "",
         "The example fleet (3 instances of the demo server "
         f"behind its ingress) at {RATE:.0f} requests/s, one connection each, a fault every "
         f"~{FAULT_GAP:.0f} s and a deploy every {DEPLOY_EVERY:.0f} s (good and broken versions "
         "in turn). The example fleet has no registry: its component gets an artifact served by "
         "the script over HTTP (the local provider's artifact path), and the registry outage is "
         "that host refusing or hanging. The server keeps the newest "
         f"{EVENTS_KEEP} events (`--events-keep`; its default is 100,000), so that retention "
         "runs within the soak. A flood is 4,000 requests: heartbeats with seq = 2^64-1 for the "
         "other instances (an instance's stolen token and a group token, in turn) and garbage "
         "bodies. Memory and store: median of the first quarter of the "
         "10 s samples against the last quarter.", "",
         "| goal | result | met |", "|---|---|---|"]
    for name, ok, text in goals:
        L.append(f"| {name} | {text} | **{'yes' if ok else 'no'}** |")
    L += ["", f"Requests: {r['requests_ok']} answered, {r['failed']} failed; by the fault window "
          f"they fell in: {json.dumps(r['failed_by_window'], sort_keys=True)}. Faults injected: "
          f"{json.dumps(r['faults'], sort_keys=True)}. Events stored: {r['events']}."]
    if r["wrongly_replaced"]:
        L += ["", "Replaced without cause:"] + [f"- {i}: {m}" for i, m in list(r["wrongly_replaced"].items())[:10]]
    if r["lost"]:
        L += ["", "Lost:"] + [f"- {x}" for x in r["lost"]]
    if r["panics"]:
        L += ["", "Panics:"] + [f"- `{x}`" for x in r["panics"][:5]]
    return "\n".join(L), all(ok for _, ok, _ in goals)


if __name__ == "__main__":
    try:
        quiet = main()
        r = report(quiet)
    finally:
        STOP.set()
        cleanup()
    with open(os.path.join(TMP, "report.json"), "w") as f:
        json.dump(r, f, indent=1, default=str)
    md, ok = markdown(r)
    print(md)
    print(f"\nchaos: report in {TMP}/report.json", file=sys.stderr)
    if WRITE:
        common.write_section("chaos", md)
    sys.exit(0 if ok else 1)
