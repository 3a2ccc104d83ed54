#!/usr/bin/env bash
# The control plane on etcd against SQLite (issue 16), at N instances (default 10,000) in 10
# regions of the `sim` provider, in one run:
#
#   1. sqlite - one `drover server` on its SQLite store.
#   2. etcd   - a real 3-member etcd cluster on loopback (Debian's etcd-server), 3 `drover
#               server`s on it (one data directory), the first one leading.
#
# In both, drover-fleetsim runs the N agents (1 heartbeat per 5 s each, permit long-polls as
# hinted) through an HAProxy in TCP mode in front of the servers (the leader first, the second
# server as the backup: as agents move to the next server when theirs stops answering), so
# both runs pay the same extra hop. The proxy connects from 16 loopback addresses per server,
# since the server caps connections per client address at 512. Measured once every instance is healthy: heartbeat latency (the
# load tool's window), and the leader's store writer from /metrics (commit latency
# histogram, commits and records written per second) over the launch of the N instances
# (apply to every instance healthy) and over 20 s of steady state. On etcd then: SIGKILL of the leader,
# and the time until another server leads, until its first controller pass, and until every
# instance is healthy in its view; and how many instances were replaced (0 is the goal).
#
# Writes the "Control plane on etcd" section of docs/benchmarks.md (--no-write to print only).
#
#   bench/ha.sh [--no-write] [--size 10000]
#
# Settings (environment): DURATION (30), WARMUP (10), INTERVAL (5s), PORT (18990: the proxy;
# servers on PORT+1.., etcd on PORT+10..), KEEP (0), SIM_THREADS (2), NICE (-20),
# DROVER_BIN / FLEETSIM_BIN (default target/release/...). Needs etcd, haproxy, curl, python3.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=10000
DURATION=${DURATION:-30}
WARMUP=${WARMUP:-10}
INTERVAL=${INTERVAL:-5s}
PORT=${PORT:-18990}
KEEP=${KEEP:-0}
SIM_THREADS=${SIM_THREADS:-2}
NICE=${NICE--20}
WRITE=1
while (($#)); do
    case "$1" in
        --no-write) WRITE=0 ;;
        --size) N=$2; shift ;;
        *) echo "usage: bench/ha.sh [--no-write] [--size N]" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "ha.sh: $*" >&2; }
now_ms() { date +%s%3N; }
NICE_CMD=()
[[ -n "$NICE" ]] && NICE_CMD=(nice -n "$NICE")
for tool in etcd haproxy curl python3; do
    command -v "$tool" >/dev/null || { log "needs $tool (apt-get install etcd-server haproxy curl)"; exit 1; }
done
ulimit -n "$(ulimit -Hn)"

DROVER_BIN=${DROVER_BIN:-$ROOT/target/release/drover}
FLEETSIM_BIN=${FLEETSIM_BIN:-$ROOT/target/release/drover-fleetsim}
if [[ ! -x $DROVER_BIN || ! -x $FLEETSIM_BIN ]]; then
    log "building drover and drover-fleetsim (release)"
    (cd "$ROOT" && cargo build --release -p drover -p drover-fleetsim)
fi

WORK=$(mktemp -d /tmp/drover-ha.XXXXXX)
RES=$WORK/results
mkdir -p "$RES" "$WORK/bin"
cp "$DROVER_BIN" "$WORK/bin/drover"
cp "$FLEETSIM_BIN" "$WORK/bin/fleetsim"
DROVER=$WORK/bin/drover
SIM=$WORK/bin/fleetsim
URL=http://127.0.0.1:$PORT

PIDS=()
cleanup() {
    local p
    disown -a 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    # The balancer processes the servers started (`drover lb` outlives its server by design):
    # every process whose command line names this run's work directory.
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$WORK/"; then
            kill "${p#/proc/}" 2>/dev/null || true
        fi
    done
    if [[ $KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# HAProxy in TCP mode: the first server, then the others as backups.
start_proxy() {
    local cfg=$WORK/haproxy-$1.cfg i
    {
        echo "global"
        echo "  maxconn $(( ($(ulimit -n) - 100) / 2 ))"
        echo "defaults"
        echo "  mode tcp"
        echo "  timeout connect 1s"
        echo "  timeout client 120s"
        echo "  timeout server 120s"
        echo "frontend api"
        echo "  bind 127.0.0.1:$PORT"
        echo "  default_backend servers"
        echo "backend servers"
        echo "  option httpchk GET /v1/health"
        echo "  balance roundrobin"
        echo "  option allbackups"
        # The server caps connections per client address (512): the proxy's connections to
        # one server come from 16 loopback addresses, as agents come from their own.
        local k
        for ((i = 0; i < $2 && i < 2; i++)); do
            for ((k = 1; k <= 16; k++)); do
                echo "  server s$i-$k 127.0.0.1:$((PORT + 1 + i)) source 127.0.$((100 + i)).$k check inter 200 fall 1 rise 2 $( ((i > 0)) && echo backup)"
            done
        done
    } >"$cfg"
    haproxy -f "$cfg" -db >"$WORK/haproxy-$1.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
}

stop() { kill -9 "$@" 2>/dev/null || true; for p in "$@"; do wait "$p" 2>/dev/null || true; done; }

wait_http() {
    local url=$1 i
    for i in $(seq 600); do
        curl -sf -m 1 "$url" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    log "no answer from $url"; return 1
}

# `drover server` number $1 on data directory $2, with more arguments.
start_server() {
    local i=$1 d=$2; shift 2
    "${NICE_CMD[@]}" "$DROVER" server --data-dir "$d" --listen "127.0.0.1:$((PORT + 1 + i))" \
        --heartbeat-interval "$INTERVAL" "$@" >>"$d.server$i.log" 2>&1 &
    SERVER_PIDS[$i]=$!
    PIDS+=("$!")
}

metric() { # the value of metric $2 (exact name and labels) in the text file $1
    awk -v m="$2" '$1 == m {print $2; exit}' "$1"
}

scrape() { # the leader's /metrics, with the token, to $2
    curl -sf -m 5 -H "Authorization: Bearer $(cat "$D/admin.token")" "$1/metrics" >"$2"
}

# One run: the fleet on the servers behind the proxy; steady state measured. The leader's
# store writer is read before the apply and once every instance is healthy (the launches).
measure() {
    local TAG=$1 LEADER_URL=$2 LOG=$3
    scrape "$LEADER_URL" "$RES/$TAG.m0"
    "$SIM" fleet-file --groups 10 --desired $((N / 10)) --max $((N / 10)) >"$D.toml"
    "${NICE_CMD[@]}" "$SIM" --threads "$SIM_THREADS" run --server "$URL" --mode fleet --follow-new --wait-healthy "$N" \
        --permits on --interval "$INTERVAL" --warmup "${WARMUP}s" --duration "${DURATION}s" \
        --server-pid-file "$D.pid" --status-every 5s --data-dir "$D" --linger \
        --json "$RES/$TAG.json" >"$D.sim.out" 2>"$D.sim.err" &
    SIM_PID=$!
    PIDS+=("$SIM_PID")
    sleep 1
    local APPLY_MS
    APPLY_MS=$(now_ms)
    DROVER_TOKEN=$(cat "$D/admin.token") "$DROVER" --server "$URL" apply "$D.toml" >"$D.apply.out"
    local i
    for i in $(seq 900); do
        [[ -s "$RES/$TAG.json" ]] && break
        kill -0 "$SIM_PID" 2>/dev/null || break
        sleep 1
    done
    [[ -s "$RES/$TAG.json" ]] || { log "$TAG: the fleet never became healthy (see $D.sim.err)"; tail -3 "$D.sim.err" >&2; exit 1; }
    grep -E "^heartbeat" "$D.sim.err" | sed "s/^/    $TAG: /" >&2 || true
    scrape "$LEADER_URL" "$RES/$TAG.m1"
    python3 "$ROOT/bench/fleet_report.py" healthy-after "$LOG" "$N" "$APPLY_MS" >"$RES/$TAG.healthy_s" || true
    # 20 s of steady state: what the store is written when nothing changes.
    sleep 20
    scrape "$LEADER_URL" "$RES/$TAG.m2"
}

# 1. SQLite.
D=$WORK/sqlite
log "N=$N on SQLite"
declare -a SERVER_PIDS
start_server 0 "$D"
echo "${SERVER_PIDS[0]}" >"$D.pid"
wait_http "http://127.0.0.1:$((PORT + 1))/v1/health"
start_proxy sqlite 1
wait_http "$URL/v1/health"
measure sqlite "http://127.0.0.1:$((PORT + 1))" "$D.server0.log"
stop "$SIM_PID" "${SERVER_PIDS[0]}" "$PROXY_PID"

# 2. etcd: 3 members, 3 servers.
log "N=$N on etcd (3 members, 3 servers)"
CLUSTER=
EPS=
for i in 0 1 2; do
    CLUSTER+="${CLUSTER:+,}e$i=http://127.0.0.1:$((PORT + 20 + i))"
    EPS+="${EPS:+,}127.0.0.1:$((PORT + 10 + i))"
done
for i in 0 1 2; do
    etcd --name "e$i" --data-dir "$WORK/etcd$i" \
        --listen-client-urls "http://127.0.0.1:$((PORT + 10 + i))" \
        --advertise-client-urls "http://127.0.0.1:$((PORT + 10 + i))" \
        --listen-peer-urls "http://127.0.0.1:$((PORT + 20 + i))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((PORT + 20 + i))" \
        --initial-cluster "$CLUSTER" --initial-cluster-state new \
        --quota-backend-bytes $((8 * 1024 * 1024 * 1024)) >"$WORK/etcd$i.log" 2>&1 &
    PIDS+=("$!")
done
for i in 0 1 2; do wait_http "http://127.0.0.1:$((PORT + 10 + i))/health"; done
D=$WORK/etcd
STORE="etcd://$EPS/drover/bench"
SERVERS="http://127.0.0.1:$((PORT + 1)),http://127.0.0.1:$((PORT + 2)),http://127.0.0.1:$((PORT + 3))"
start_server 0 "$D" --store "$STORE" --servers "$SERVERS"
echo "${SERVER_PIDS[0]}" >"$D.pid"
for i in $(seq 400); do
    curl -sf -m 1 "http://127.0.0.1:$((PORT + 1))/v1/health" | grep -q '"role":"leader"' && break
    sleep 0.05
done
start_server 1 "$D" --store "$STORE" --servers "$SERVERS"
start_server 2 "$D" --store "$STORE" --servers "$SERVERS"
for i in 2 3; do wait_http "http://127.0.0.1:$((PORT + i))/v1/health"; done
start_proxy etcd 3
wait_http "$URL/v1/health"
measure etcd "http://127.0.0.1:$((PORT + 1))" "$D.server0.log"

# Failover: SIGKILL of the leader, the agents going on through the proxy.
SEQ0=$(curl -sf -m 5 -H "Authorization: Bearer $(cat "$D/admin.token")" "$URL/v1/events?limit=1&newest=true" \
    | python3 -c 'import json,sys; e=json.load(sys.stdin); print(e[-1]["seq"] if e else 0)')
log "etcd: SIGKILL of the leader"
KILL_MS=$(now_ms)
stop "${SERVER_PIDS[0]}"
NEW=
while [[ -z $NEW ]]; do
    for i in 1 2; do
        if curl -sf -m 1 "http://127.0.0.1:$((PORT + 1 + i))/v1/health" | grep -q '"role":"leader"'; then NEW=$i; break; fi
    done
    (($(now_ms) - KILL_MS > 60000)) && { log "no new leader within 60 s"; exit 1; }
    [[ -n $NEW ]] || sleep 0.02
done
LEAD_MS=$(now_ms)
NEW_URL="http://127.0.0.1:$((PORT + 1 + NEW))"
while :; do
    scrape "$NEW_URL" "$RES/new.m" 2>/dev/null || true
    P=$(metric "$RES/new.m" drover_controller_passes_total)
    [[ -n $P && $P -ge 1 ]] && break
    (($(now_ms) - KILL_MS > 60000)) && { log "no controller pass within 60 s"; exit 1; }
    sleep 0.02
done
PASS_MS=$(now_ms)
"$SIM" wait-healthy --data-dir "$D" --server "$NEW_URL" --count "$N" --since-epoch-ms "$KILL_MS" \
    --timeout 120s --poll 250ms --server-pid "${SERVER_PIDS[$NEW]}" >"$RES/failover.json" 2>"$D.wait.err" || true
sleep 2
python3 - "$RES/failover-extra.json" "$NEW_URL" "$(cat "$D/admin.token")" <<EOF
import json, sys, urllib.request
events, after = [], $SEQ0
while True:  # every event since the kill, a page at a time
    req = urllib.request.Request(f"{sys.argv[2]}/v1/events?after={after}&limit=10000",
                                 headers={"Authorization": f"Bearer {sys.argv[3]}"})
    page = json.load(urllib.request.urlopen(req, timeout=30))
    events += page
    if len(page) < 10000:
        break
    after = page[-1]["seq"]
count = lambda k: sum(1 for e in events if e["kind"] == k)
json.dump({
    "kill_to_leader_ms": $((LEAD_MS - KILL_MS)),
    "kill_to_first_pass_ms": $((PASS_MS - KILL_MS)),
    "silent": count("silent"), "lost": count("lost"),
    "terminating": count("terminating"), "launched": count("launched"),
}, open(sys.argv[1], "w"))
EOF
stop "$SIM_PID"

uptime >"$RES/uptime-end.txt"
python3 "$ROOT/bench/ha_report.py" "$RES" "$N" "$DROVER_BIN" $( ((WRITE)) || echo --no-write)
