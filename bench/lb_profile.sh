#!/usr/bin/env bash
# Per-connection cost of drover's balancer and of HAProxy 2.6 (TCP mode) on the same backends:
# syscalls per connection (perf's syscall tracepoints, counted in the kernel, so the load runs
# at full speed) and, with CALLGRIND=1, user-space instructions per connection (valgrind's
# callgrind; no hardware counters in this VM). Prints tables; writes nothing.
#
#   bench/lb_profile.sh
#
# Settings (environment): MODE (close: `Connection: close`, a new connection per request;
# keepalive), DURATION seconds of counted load (10), CONNS (50), WRK_THREADS (2), BACKENDS (3),
# CALLGRIND (0; 1 adds the instruction counts, at CG_CONNS wrk connections for CG_DURATION
# seconds: 4 and 10), LB_BENCH (target/release/examples/lb_bench), DROVER_BIN
# (target/release/drover, for the backends).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${MODE:-close}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
WRK_THREADS=${WRK_THREADS:-2}
BACKENDS=${BACKENDS:-3}
CALLGRIND=${CALLGRIND:-0}
CG_CONNS=${CG_CONNS:-4}
CG_DURATION=${CG_DURATION:-10}
LB_BENCH=${LB_BENCH:-$ROOT/target/release/examples/lb_bench}
DROVER_BIN=${DROVER_BIN:-$ROOT/target/release/drover}

log() { echo "lb_profile.sh: $*" >&2; }
for tool in wrk haproxy perf; do
    command -v "$tool" >/dev/null || { log "needs $tool (apt-get install wrk haproxy linux-perf)"; exit 1; }
done
if [ "$CALLGRIND" = 1 ]; then
    command -v valgrind >/dev/null || { log "CALLGRIND=1 needs valgrind"; exit 1; }
fi
for f in "$LB_BENCH" "$DROVER_BIN"; do
    [ -x "$f" ] || { log "missing $f: cargo build --release -p drover && cargo build --release -p drover-lb --example lb_bench"; exit 1; }
done

TMP=$(mktemp -d /tmp/drover-lb-profile.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
    for i in $(seq 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "nothing listens on port $1; logs in $TMP"; tail -n 5 "$TMP"/*.log >&2; exit 1
}

for p in "${BACKEND_PORTS[@]}"; do
    "$DROVER_BIN" demo-server --listen "127.0.0.1:$p" >"$TMP/backend-$p.log" 2>&1 &
    PIDS+=($!)
done
{
    echo "global"
    echo "    nbthread 1"
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

start_lb() { # name [wrapper...] -> PID in LB_PID
    local name=$1
    shift
    if [ "$name" = drover ]; then
        "$@" "$LB_BENCH" --listen "127.0.0.1:$DROVER_PORT" --threads 1 "${TARGETS[@]}" \
            >"$TMP/drover.log" 2>&1 &
    else
        "$@" haproxy -f "$TMP/haproxy.cfg" -db >"$TMP/haproxy.log" 2>&1 &
    fi
    LB_PID=$!
    PIDS+=("$LB_PID")
}
port_of() { if [ "$1" = drover ]; then echo "$DROVER_PORT"; else echo "$HAPROXY_PORT"; fi; }

run_wrk() { # port threads conns seconds
    local hdr=()
    [ "$MODE" = close ] && hdr=(-H "Connection: close")
    wrk -t"$2" -c"$3" -d"$4"s "${hdr[@]}" "http://127.0.0.1:$1/"
}
requests_of() { awk '/requests in/ {print $1}' "$1"; }

for p in "${BACKEND_PORTS[@]}"; do wait_port "$p"; done

SYSCALLS=(accept4 socket connect setsockopt getsockopt fcntl ioctl recvfrom sendto read write
    readv writev recvmsg sendmsg shutdown close epoll_ctl epoll_wait epoll_pwait epoll_pwait2
    pipe2 splice futex getsockname getpeername mmap munmap madvise brk)
EVENTS=(-e raw_syscalls:sys_enter)
for s in "${SYSCALLS[@]}"; do EVENTS+=(-e "syscalls:sys_enter_$s"); done
# Failed calls: EAGAIN accepts and reads, and connects in progress.
for s in accept4 recvfrom sendto connect read; do
    EVENTS+=(-e "syscalls:sys_exit_$s" --filter 'ret < 0')
done

declare -A RES
for lb in drover haproxy; do
    start_lb "$lb"
    wait_port "$(port_of "$lb")"
    run_wrk "$(port_of "$lb")" "$WRK_THREADS" "$CONNS" 2 >/dev/null # warm-up
    perf stat -x, -o "$TMP/perf-$lb.csv" "${EVENTS[@]}" -p "$LB_PID" &
    perf_pid=$!
    sleep 0.3
    run_wrk "$(port_of "$lb")" "$WRK_THREADS" "$CONNS" "$DURATION" >"$TMP/wrk-$lb.txt"
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    RES[$lb]=$(requests_of "$TMP/wrk-$lb.txt")
    kill -TERM "$LB_PID"
    wait "$LB_PID" 2>/dev/null || true
    log "$lb: ${RES[$lb]} requests counted"
done

python3 - "$TMP" "$MODE" "${RES[drover]}" "${RES[haproxy]}" <<'EOF'
import csv, sys
tmp, mode, n_d, n_h = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def load(name):
    out, seen = {}, {}
    for row in csv.reader(open(f"{tmp}/perf-{name}.csv")):
        if len(row) < 3 or row[0].startswith("#") or not row[2]:
            continue
        ev = row[2].split(":", 1)[1]
        seen[ev] = seen.get(ev, 0) + 1
        key = ev if seen[ev] == 1 else ev + "#2"
        out[key] = int(row[0]) if row[0].isdigit() else 0
    return out
d, h = load("drover"), load("haproxy")
unit = "connection" if mode == "close" else "request"
print(f"\nsyscalls per {unit} ({mode}; drover {n_d} requests, HAProxy {n_h}; perf tracepoints)\n")
print(f"| syscall | drover-lb | HAProxy |")
print("|---|---:|---:|")
def name(k):
    if k == "sys_enter":
        return "**all syscalls**"
    if k.startswith("sys_exit_"):
        return f"`{k[9:]}` failed (EAGAIN / EINPROGRESS)"
    return f"`{k[10:]}`"
keys = ["sys_enter"] + [k for k in d if k != "sys_enter"]
for k in keys:
    a, b = d.get(k, 0) / n_d, h.get(k, 0) / n_h
    if a < 0.005 and b < 0.005:
        continue
    print(f"| {name(k)} | {a:.2f} | {b:.2f} |")
EOF

if [ "$CALLGRIND" = 1 ]; then
    for lb in drover haproxy; do
        start_lb "$lb" valgrind --tool=callgrind --callgrind-out-file="$TMP/cg-$lb.out"
        wait_port "$(port_of "$lb")"
        run_wrk "$(port_of "$lb")" 1 "$CG_CONNS" 2 >/dev/null # warm-up
        callgrind_control -z "$LB_PID" >/dev/null 2>&1
        run_wrk "$(port_of "$lb")" 1 "$CG_CONNS" "$CG_DURATION" >"$TMP/cg-wrk-$lb.txt"
        callgrind_control -d "$LB_PID" >/dev/null 2>&1
        n=$(requests_of "$TMP/cg-wrk-$lb.txt")
        kill -TERM "$LB_PID"
        wait "$LB_PID" 2>/dev/null || true
        dump=$(ls "$TMP"/cg-$lb.out.* | head -n 1)
        cp "$dump" "/tmp/lb_profile-cg-$lb.out"
        callgrind_annotate --inclusive=no --threshold=90 "$dump" >"/tmp/lb_profile-cg-$lb.txt" 2>/dev/null || true
        ir=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "/tmp/lb_profile-cg-$lb.txt")
        echo "$lb: user-space instructions per $MODE request: $((ir / n)) ($ir over $n requests, callgrind)"
        log "callgrind profile of $lb in /tmp/lb_profile-cg-$lb.txt (data: /tmp/lb_profile-cg-$lb.out)"
    done
fi
