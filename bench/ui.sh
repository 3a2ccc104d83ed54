#!/usr/bin/env bash
# The dashboard at fleet scale (issue 19): one `drover server` with N instances (default
# 10,000: 10 regions, one service of N/10 per region, every region `provider = "sim"`: the
# server records each launch and starts nothing), their agents simulated over real HTTP by
# drover-fleetsim (as in bench/fleet.sh: it follows the `launched` events and heartbeats for
# each instance every 5 s). Once all N are healthy, it measures:
#
#   - the API the dashboard reads: `GET /v1/ui/summary` (every group, no instance lists) and
#     `GET /v1/ui/groups/s0/r0` (one group, the first 50 of its N/10 instances), beside
#     `GET /v1/status` (everything), each RUNS times with curl: time and body size;
#   - the pages in headless Chromium (bench/ui_load.py): a new browser per run logs in with a
#     `drover ui` link, opens the fleet page (or the group page) afresh, and reads when the
#     page first showed its data.
#
# Writes the "Dashboard at fleet scale" section of docs/benchmarks.md (--no-write: print only).
#
#   bench/ui.sh [--no-write]          N=10000 RUNS=5 PORT=17995 DROVER_BIN= FLEETSIM_BIN=
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-10000}
RUNS=${RUNS:-5}
PORT=${PORT:-17995}
WRITE=1
[[ ${1:-} == --no-write ]] && WRITE=0
log() { echo "ui.sh: $*" >&2; }
for tool in curl python3 /usr/bin/chromedriver /usr/bin/chromium; do
    command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done
ulimit -n "$(ulimit -Hn)"

DROVER_BIN=${DROVER_BIN:-$ROOT/target/release/drover}
FLEETSIM_BIN=${FLEETSIM_BIN:-$ROOT/target/release/drover-fleetsim}
[[ -x $DROVER_BIN ]] || (cd "$ROOT" && cargo build --release -p drover)
[[ -x $FLEETSIM_BIN ]] || (cd "$ROOT" && cargo build --release -p drover-fleetsim)

WORK=$(mktemp -d /tmp/drover-ui.XXXXXX)
mkdir -p "$WORK/bin"
cp "$DROVER_BIN" "$WORK/bin/drover"
cp "$FLEETSIM_BIN" "$WORK/bin/fleetsim"
DROVER=$WORK/bin/drover
SIM=$WORK/bin/fleetsim
URL=http://127.0.0.1:$PORT
D=$WORK/data
SERVER_PID=
SIM_PID=
cleanup() {
    [[ -n $SIM_PID ]] && kill "$SIM_PID" 2>/dev/null || true
    [[ -n $SERVER_PID ]] && kill -9 "$SERVER_PID" 2>/dev/null || true
    # The server's balancer process (`drover lb`, which outlives its server by design): every
    # process whose command line names this run's work directory.
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$WORK/"; then
            kill "${p#/proc/}" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if curl -sf -m 1 "$URL/v1/health" >/dev/null 2>&1; then log "something answers on $URL; set PORT"; exit 1; fi
"$DROVER" server --data-dir "$D" --listen "127.0.0.1:$PORT" --heartbeat-interval 5s \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
echo "$SERVER_PID" >"$WORK/server.pid"
for _ in $(seq 600); do curl -sf -m 2 "$URL/v1/health" >/dev/null && break; sleep 0.05; done
TOKEN=$(cat "$D/admin.token")
cli() { DROVER_TOKEN=$TOKEN "$DROVER" --server "$URL" "$@"; }

"$SIM" fleet-file --groups 10 --desired $((N / 10)) --max $((N / 10)) >"$WORK/fleet.toml"
"$SIM" --threads 2 run --server "$URL" --mode fleet --follow-new --wait-healthy "$N" --interval 5s \
    --warmup 1s --duration 3600s --server-pid-file "$WORK/server.pid" --data-dir "$D" --linger \
    >"$WORK/sim.out" 2>"$WORK/sim.err" &
SIM_PID=$!
sleep 1
log "applying a fleet of $N instances"
cli apply "$WORK/fleet.toml" >/dev/null
T0=$(date +%s)
while :; do
    H=$(curl -sf -m 10 -H "Authorization: Bearer $TOKEN" "$URL/v1/ui/summary" \
        | python3 -c 'import json,sys; print(sum(g["healthy"] for g in json.load(sys.stdin)["groups"]))' || echo 0)
    ((H >= N)) && break
    (($(date +%s) - T0 > 600)) && { log "only $H of $N healthy after 600 s"; tail -3 "$WORK/sim.err" >&2; exit 1; }
    sleep 2
done
log "$N healthy after $(($(date +%s) - T0)) s"
sleep 5

curl_times() {
    local path=$1 out=$WORK/curl.txt
    : >"$out"
    for _ in $(seq "$RUNS"); do
        curl -s -o /dev/null -w '%{time_total} %{size_download}\n' -H "Authorization: Bearer $TOKEN" \
            "$URL$path" >>"$out"
    done
    python3 - "$out" <<'PY'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
t = [r[0] * 1000 for r in rows]
print(f"{statistics.median(t):.1f} {max(t):.1f} {rows[-1][1] / 1e6:.2f}")
PY
}
read -r ST_MED ST_MAX ST_MB < <(curl_times /v1/status)
read -r SU_MED SU_MAX SU_MB < <(curl_times /v1/ui/summary)
read -r GR_MED GR_MAX GR_MB < <(curl_times "/v1/ui/groups/s0/r0?page=1&per_page=50")
log "status $ST_MED ms ($ST_MB MB); summary $SU_MED ms ($SU_MB MB); group page $GR_MED ms ($GR_MB MB)"
python3 "$ROOT/bench/ui_load.py" "$URL" "$DROVER" "$D" "$RUNS" "$WORK/browser.json"

SECTION=$WORK/section.md
python3 - "$WORK/browser.json" "$SECTION" "$N" "$RUNS" "$ST_MED" "$ST_MAX" "$ST_MB" "$SU_MED" "$SU_MAX" "$SU_MB" \
    "$GR_MED" "$GR_MAX" "$GR_MB" "$DROVER_BIN" "$(cd "$ROOT" && git rev-parse --short HEAD)" "$(nproc)" \
    "$(/usr/bin/chromium --version 2>/dev/null | head -1)" <<'PY'
import json, sys, datetime
(b, out, n, runs, st_med, st_max, st_mb, su_med, su_max, su_mb, gr_med, gr_max, gr_mb, binp, head,
 cores, chromium) = sys.argv[1:]
b = json.load(open(b))
n = int(n)
f, g = b["fleet"], b["group"]
goal = lambda ms: "yes" if ms < 1000 else "**no**"
lines = [
    "<!-- ui:begin -->",
    "## Dashboard at fleet scale",
    "",
    f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {cores} cores (shared with other builds), "
    f"`bench/ui.sh` (N={n:,}, {runs} runs each), server `{binp.replace(binp.split('target/')[0], '') if 'target/' in binp else binp}` at {head}, {chromium}.",
    "",
    f"One `drover server` with {n:,} instances (10 groups of {n // 10:,} on `sim` regions; agents simulated by drover-fleetsim, "
    "heartbeats every 5 s). Browser: a new headless Chromium per run (empty cache), logged in by a "
    "`drover ui` link, then the page opened afresh; time from the start of the navigation until the page "
    "first shows its data (the `drover:PAGE:rendered` mark).",
    "",
    "| page | median (ms) | max (ms) | under 1 s | what it shows |",
    "| --- | ---: | ---: | --- | --- |",
    f"| fleet | {f['median_ms']:.0f} | {f['max_ms']:.0f} | {goal(f['max_ms'])} | {f['cells']} group cells, no instance list |",
    f"| group `s0/r0` | {g['median_ms']:.0f} | {g['max_ms']:.0f} | {goal(g['max_ms'])} | {g['rows']} instance rows, {g['pager']} |",
    "",
    "| request (curl) | median (ms) | max (ms) | body (MB) |",
    "| --- | ---: | ---: | ---: |",
    f"| `GET /v1/status` (everything) | {float(st_med):.1f} | {float(st_max):.1f} | {st_mb} |",
    f"| `GET /v1/ui/summary` (fleet page) | {float(su_med):.1f} | {float(su_max):.1f} | {su_mb} |",
    f"| `GET /v1/ui/groups/s0/r0?per_page=50` (group page) | {float(gr_med):.1f} | {float(gr_max):.1f} | {gr_mb} |",
    "",
    f"Summary against status: {float(su_mb) / max(float(st_mb), 1e-9):.3f}x the bytes, "
    f"{float(su_med) / max(float(st_med), 1e-9):.2f}x the time.",
    "<!-- ui:end -->",
]
open(out, "w").write("\n".join(lines) + "\n")
PY
cat "$SECTION"
if ((WRITE)); then
    python3 - "$ROOT/docs/benchmarks.md" "$SECTION" <<'PY'
import re, sys
doc, sec = open(sys.argv[1]).read(), open(sys.argv[2]).read()
if "<!-- ui:begin -->" in doc:
    doc = re.sub(r"<!-- ui:begin -->.*?<!-- ui:end -->\n", lambda m: sec, doc, flags=re.S)
else:
    doc = doc.rstrip("\n") + "\n\n" + sec
open(sys.argv[1], "w").write(doc)
PY
    log "wrote docs/benchmarks.md"
fi
