#!/usr/bin/env bash
# The balancer users run (the `drover lb` process that `drover server` starts, following the
# server's targets) against HAProxy 2.6 (TCP mode) and against no balancer at all, in one run,
# on the same backends (the fleet's own instances): wrk with and without keep-alive, with
# round robin and with least connections; requests/s, p99 latency and the balancer's CPU time
# per request. Writes the "Load balancer" section of docs/benchmarks.md (--no-write: print).
#
#   bench/lb.sh [--no-write]
#
# Settings (environment): ROUNDS (7), DURATION seconds per wrk run (10), CONNS (50),
# WRK_THREADS (2), LB_THREADS (1: `drover lb` runs on tokio's single-threaded runtime, and
# HAProxy `nbthread 1`), BACKENDS (3 instances per service; two services, one per policy), PIN (empty: no CPU pinning; "1": the balancer on
# CPU 1, wrk and the backends on CPU 0), NICE (-20: every process of the benchmark runs at
# this niceness so that other work on the machine disturbs it less; empty to leave it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
WRK_THREADS=${WRK_THREADS:-2}
LB_THREADS=${LB_THREADS:-1}
BACKENDS=${BACKENDS:-3}
PIN=${PIN:-}
NICE=${NICE--20}
WRITE=1
for a in "$@"; do
    case "$a" in
        --no-write) WRITE=0 ;;
        *) echo "usage: bench/lb.sh [--no-write]" >&2; exit 2 ;;
    esac
done

log() { echo "lb.sh: $*" >&2; }

# Tools: wrk and HAProxy from Debian, installed when missing.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || missing+=(haproxy)
if ((${#missing[@]})); then
    log "installing ${missing[*]} with apt-get"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

log "building target/release/drover"
(cd "$ROOT" && cargo build --release -q -p drover --bin drover --bin drover-agent)

TMP=$(mktemp -d /tmp/drover-bench-lb.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    # The balancer and the agents outlive `drover server` by design: stop them by their pids.
    for f in "$TMP"/data/lb/lb.pid "$TMP"/data.instances/*/agent.pid; do
        if [ -f "$f" ]; then kill -TERM "$(cat "$f")" 2>/dev/null || true; fi
    done
    sleep 1
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Others may rebuild target/ during the run: measure copies.
cp "$ROOT/target/release/drover" "$ROOT/target/release/drover-agent" "$TMP/"

prio=()
if [ -n "$NICE" ] && nice -n "$NICE" true 2>/dev/null; then prio=(nice -n "$NICE"); else NICE=""; fi
pin_lb=() pin_rest=()
if [ -n "$PIN" ]; then pin_lb=(taskset -c 1) pin_rest=(taskset -c 0); fi

# Free ports: the API, drover's two ingresses, HAProxy's two listeners.
read -r -a PORTS <<<"$(python3 - 5 <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
API_PORT=${PORTS[0]} RR_PORT=${PORTS[1]} LC_PORT=${PORTS[2]} HA_RR_PORT=${PORTS[3]} HA_LC_PORT=${PORTS[4]}

wait_port() {
    local i
    for i in $(seq 400); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "nothing listens on port $1; logs in $TMP:"
    tail -n 5 "$TMP"/*.log "$TMP"/data/lb/lb.log >&2 || true
    exit 1
}

# One service per policy, BACKENDS instances each, the demo server as in the example fleet.
service() { # name port balance
    cat <<EOF
[services.$1]
regions = ["local"]
capacity = { min = $BACKENDS, desired = $BACKENDS, max = $BACKENDS }
ingress = { listen = "127.0.0.1:$2", component = "app", port = "http", balance = "$3" }

[services.$1.components.app]
runtime = "process"
version = "v1"
command = "{drover}"
args = ["demo-server", "--listen", "{addr}:{port.http}"]
ports = { http = 8080 }
health = { type = "http", port = "http", path = "/healthz", interval = "500ms", timeout = "400ms", healthy_threshold = 1, unhealthy_threshold = 3 }

EOF
}
{
    printf '[fleet]\nname = "lbbench"\n\n[regions.local]\nprovider = "local"\nsubnet = "127.77.0.0/16"\n\n'
    service rr "$RR_PORT" round_robin
    service lc "$LC_PORT" least_connections
} >"$TMP/drover.toml"

log "starting drover server, the fleet (2 x $BACKENDS instances) and its balancer"
"${prio[@]}" "$TMP/drover" server --data-dir "$TMP/data" --listen "127.0.0.1:$API_PORT" \
    >"$TMP/server.log" 2>&1 &
PIDS+=($!)
wait_port "$API_PORT"
export DROVER_SERVER="http://127.0.0.1:$API_PORT" DROVER_DATA_DIR="$TMP/data"
"$TMP/drover" apply "$TMP/drover.toml" >/dev/null
wait_port "$RR_PORT"
wait_port "$LC_PORT"
in_rotation() {
    "$TMP/drover" status --json | python3 -c 'import json, sys
print(sum(1 for g in json.load(sys.stdin)["groups"] for i in g["instances"] if i["in_rotation"]))'
}
for _ in $(seq 300); do
    [ "$(in_rotation)" -ge $((2 * BACKENDS)) ] && break
    sleep 0.1
done
backends_of() { # group -> ip:port per line
    "$TMP/drover" status --json | python3 -c '
import json, sys
for g in json.load(sys.stdin)["groups"]:
    if g["group"] == sys.argv[1]:
        for i in g["instances"]:
            print(i["addr"] + ":8080")' "$1"
}
mapfile -t RR_TARGETS < <(backends_of rr/local)
mapfile -t LC_TARGETS < <(backends_of lc/local)
LB_PID=$(cat "$TMP/data/lb/lb.pid")
# The server started the balancer and the agents: give them the benchmark's priority and CPU.
if [ -n "$NICE" ]; then
    renice -n "$NICE" -p "$LB_PID" >/dev/null
    for f in "$TMP"/data.instances/*/agent.pid; do renice -n "$NICE" -g "$(cat "$f")" >/dev/null 2>&1 || true; done
fi
if [ -n "$PIN" ]; then
    taskset -pc 1 "$LB_PID" >/dev/null
fi

{
    echo "global"
    echo "    nbthread $LB_THREADS"
    echo "    maxconn 4000"
    echo "defaults"
    echo "    mode tcp"
    echo "    timeout connect 2s"
    echo "    timeout client 300s"
    echo "    timeout server 300s"
    echo "    timeout check 400ms"
    echo "    option httpchk GET /healthz"
    i=0
    echo "listen bench_rr"
    echo "    bind 127.0.0.1:$HA_RR_PORT"
    echo "    balance roundrobin"
    for t in "${RR_TARGETS[@]}"; do i=$((i + 1)); echo "    server s$i $t check inter 500ms rise 1 fall 3"; done
    echo "listen bench_lc"
    echo "    bind 127.0.0.1:$HA_LC_PORT"
    echo "    balance leastconn"
    for t in "${LC_TARGETS[@]}"; do i=$((i + 1)); echo "    server s$i $t check inter 500ms rise 1 fall 3"; done
} >"$TMP/haproxy.cfg"
"${prio[@]}" "${pin_lb[@]}" haproxy -f "$TMP/haproxy.cfg" -db >"$TMP/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")
wait_port "$HA_RR_PORT"
wait_port "$HA_LC_PORT"

# utime + stime of a process, all threads, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

declare -A URL PID_OF
URL[drover-rr]="http://127.0.0.1:$RR_PORT/"
URL[haproxy-rr]="http://127.0.0.1:$HA_RR_PORT/"
URL[drover-lc]="http://127.0.0.1:$LC_PORT/"
URL[haproxy-lc]="http://127.0.0.1:$HA_LC_PORT/"
URL[direct]="http://${RR_TARGETS[0]}/"
PID_OF[drover-rr]=$LB_PID
PID_OF[haproxy-rr]=$HAPROXY_PID
PID_OF[drover-lc]=$LB_PID
PID_OF[haproxy-lc]=$HAPROXY_PID
PID_OF[direct]=""

run_wrk() { # mode path seconds -> wrk output on stdout
    local hdr=()
    [ "$1" = close ] && hdr=(-H "Connection: close")
    "${prio[@]}" "${pin_rest[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"$3"s --latency "${hdr[@]}" "${URL[$2]}"
}

log "warming up"
paths=(drover-rr haproxy-rr drover-lc haproxy-lc direct)
for path in "${paths[@]}"; do run_wrk keepalive "$path" 2 >/dev/null; done

RESULTS="$TMP/results.tsv"
UPTIME_START=$(uptime)
for round in $(seq "$ROUNDS"); do
    for mode in keepalive close; do
        # Rotate the order from round to round so that no path always runs first.
        k=$(((round - 1) % ${#paths[@]}))
        for path in "${paths[@]:k}" "${paths[@]:0:k}"; do
            pid=${PID_OF[$path]}
            before=0
            [ -n "$pid" ] && before=$(cpu_ticks "$pid")
            out=$(run_wrk "$mode" "$path" "$DURATION")
            after=0
            [ -n "$pid" ] && after=$(cpu_ticks "$pid")
            echo "$out" >"$TMP/wrk-$round-$mode-$path.txt"
            printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$path" "$((after - before))" \
                "$(echo "$out" | base64 -w0)" >>"$RESULTS"
            log "round $round $mode $path: $(echo "$out" | awk '/Requests\/sec/ {print $2}') req/s"
        done
    done
done
UPTIME_END=$(uptime)
if [ "$(cat "$TMP/data/lb/lb.pid")" != "$LB_PID" ]; then
    log "the balancer process changed during the run: the results are not of one process"; exit 1
fi

python3 "$ROOT/bench/lb_report.py" "$RESULTS" \
    --write "$WRITE" \
    --clk-tck "$(getconf CLK_TCK)" \
    --rounds "$ROUNDS" --duration "$DURATION" --conns "$CONNS" --wrk-threads "$WRK_THREADS" \
    --lb-threads "$LB_THREADS" --backends "$BACKENDS" --pin "$PIN" --nice "$NICE" \
    --uptime-start "$UPTIME_START" --uptime-end "$UPTIME_END" \
    --haproxy "$(haproxy -v | head -n 1)" --wrk "$(dpkg-query -W -f '${Version}' wrk 2>/dev/null || echo '?')"
