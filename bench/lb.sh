#!/usr/bin/env bash
# drover's built-in balancer against HAProxy 2.6 (TCP mode) and against no balancer at all,
# in one run, on the same backends: wrk with and without keep-alive, requests/s, p99 latency
# and the balancer's CPU time per request. Writes the "Load balancer" section of
# docs/benchmarks.md (pass --no-write to only print).
#
#   bench/lb.sh [--no-write]
#
# Settings (environment): ROUNDS (7), DURATION seconds per wrk run (10), CONNS (50),
# WRK_THREADS (2), LB_THREADS (1: drover's lb_bench on tokio's single-threaded runtime and
# HAProxy `nbthread 1`), BACKENDS (3), PIN (empty: no CPU pinning; "1": the balancer on
# CPU 1, wrk and the backends on CPU 0), NICE (-20: every process of the benchmark runs at
# this niceness so that other work on the machine disturbs it less; empty to leave it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-7}
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

log "building target/release/drover and the lb_bench example"
(cd "$ROOT" && cargo build --release -q -p drover && cargo build --release -q -p drover-lb --example lb_bench)

TMP=$(mktemp -d /tmp/drover-bench-lb.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Others may rebuild target/ during the run: measure copies.
cp "$ROOT/target/release/drover" "$TMP/drover"
cp "$ROOT/target/release/examples/lb_bench" "$TMP/lb_bench"

prio=()
if [ -n "$NICE" ] && nice -n "$NICE" true 2>/dev/null; then prio=(nice -n "$NICE"); else NICE=""; fi
pin_lb=() pin_rest=()
if [ -n "$PIN" ]; then pin_lb=(taskset -c 1) pin_rest=(taskset -c 0); fi

# Free ports: BACKENDS backends, drover, HAProxy.
read -r -a PORTS <<<"$(python3 - "$((BACKENDS + 2))" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
BACKEND_PORTS=("${PORTS[@]:0:BACKENDS}")
DROVER_PORT=${PORTS[BACKENDS]}
HAPROXY_PORT=${PORTS[BACKENDS + 1]}
TARGETS=()
for p in "${BACKEND_PORTS[@]}"; do TARGETS+=("127.0.0.1:$p"); done

wait_port() {
    local i
    for i in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "nothing listens on port $1; logs in $TMP:"; tail -n 5 "$TMP"/*.log >&2; exit 1
}

for p in "${BACKEND_PORTS[@]}"; do
    "${prio[@]}" "${pin_rest[@]}" "$TMP/drover" demo-server --listen "127.0.0.1:$p" \
        >"$TMP/backend-$p.log" 2>&1 &
    PIDS+=($!)
done

"${prio[@]}" "${pin_lb[@]}" "$TMP/lb_bench" --listen "127.0.0.1:$DROVER_PORT" \
    --threads "$LB_THREADS" "${TARGETS[@]}" >"$TMP/drover-lb.log" 2>&1 &
DROVER_PID=$!
PIDS+=("$DROVER_PID")

{
    echo "global"
    echo "    nbthread $LB_THREADS"
    echo "    maxconn 4000"
    echo "defaults"
    echo "    mode tcp"
    echo "    timeout connect 2s"
    echo "    timeout client 300s"
    echo "    timeout server 300s"
    echo "listen bench"
    echo "    bind 127.0.0.1:$HAPROXY_PORT"
    echo "    balance roundrobin"
    i=0
    for t in "${TARGETS[@]}"; do i=$((i + 1)); echo "    server s$i $t"; done
} >"$TMP/haproxy.cfg"
"${prio[@]}" "${pin_lb[@]}" haproxy -f "$TMP/haproxy.cfg" -db >"$TMP/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")

for p in "${BACKEND_PORTS[@]}" "$DROVER_PORT" "$HAPROXY_PORT"; do wait_port "$p"; done

# utime + stime of a process, all threads, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

declare -A URL PID_OF
URL[drover]="http://127.0.0.1:$DROVER_PORT/"
URL[haproxy]="http://127.0.0.1:$HAPROXY_PORT/"
URL[direct]="http://127.0.0.1:${BACKEND_PORTS[0]}/"
PID_OF[drover]=$DROVER_PID
PID_OF[haproxy]=$HAPROXY_PID
PID_OF[direct]=""

run_wrk() { # mode path seconds -> wrk output on stdout
    local hdr=()
    [ "$1" = close ] && hdr=(-H "Connection: close")
    "${prio[@]}" "${pin_rest[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"$3"s --latency "${hdr[@]}" "${URL[$2]}"
}

log "warming up"
for path in drover haproxy direct; do run_wrk keepalive "$path" 2 >/dev/null; done

RESULTS="$TMP/results.tsv"
UPTIME_START=$(uptime)
paths=(drover haproxy direct)
for round in $(seq "$ROUNDS"); do
    for mode in keepalive close; do
        # Rotate the order from round to round so that no path always runs first.
        k=$(((round - 1) % 3))
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

python3 "$ROOT/bench/lb_report.py" "$RESULTS" \
    --write "$WRITE" \
    --clk-tck "$(getconf CLK_TCK)" \
    --rounds "$ROUNDS" --duration "$DURATION" --conns "$CONNS" --wrk-threads "$WRK_THREADS" \
    --lb-threads "$LB_THREADS" --backends "$BACKENDS" --pin "$PIN" --nice "$NICE" \
    --uptime-start "$UPTIME_START" --uptime-end "$UPTIME_END" \
    --haproxy "$(haproxy -v | head -n 1)" --wrk "$(dpkg-query -W -f '${Version}' wrk 2>/dev/null || echo '?')"
