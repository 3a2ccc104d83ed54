#!/usr/bin/env bash
# The control plane at fleet scale (issues 9, 15): one `drover server`, N simulated agents over
# real HTTP (drover-fleetsim), N = 10,000 / 50,000 in 10 regions. Per N:
#
#   1. "unknown" - agents heartbeat (1 per 5 s) for ids the server does not know: it answers
#      {"known": false} at once. HTTP + JSON + one map lookup only, NOT the heartbeat path.
#   2. "known"   - `drover apply` of a fleet of N instances (10 groups of N/10, one per region,
#      every region `provider = "sim"`: the server records each launch and starts nothing).
#      drover-fleetsim runs the agents for them (it follows the `launched` events, and ends
#      an instance that leaves with POST /v1/agent/exit): heartbeats (1 per 5 s; the
#      server runs with --heartbeat-interval 5s, so silent_after is 15 s), a permit long-poll
#      while the heartbeat answer says `leave_soon` (the agent's protocol), leaving on a
#      permit. Status is polled every 5 s as `drover status` and the dashboard ask for it
#      (`GET /v1/status?instances=none`, the groups' summaries). Measured once every instance
#      is healthy: heartbeat latency, status latency (the poll, the whole list through the
#      API, and `drover status`), server CPU and RSS; then a deploy of one group (time to the first
#      permit) and a server restart (SIGKILL, start, time until every instance is healthy).
#
# Writes the "Control plane at fleet scale" section of docs/benchmarks.md (--no-write to only
# print). One command from the repository root:
#
#   bench/fleet.sh [--no-write] [--profile] [--sizes "10000 50000"]
#
# Settings (environment): DURATION (30: measured seconds per run), WARMUP (10), PERMITS_MODE
# (auto: permit long-polls on, as hinted, when N/10 + 2000 fit the open-file limit; on;
# always: every agent holds one, the protocol before the hint; off), INTERVAL (5s: heartbeat
# interval of the known instances; the server gets the same), AB (0; 1: also run the largest N
# whose agents can all hold a long-poll with `--permits always`), SIM_THREADS (2: the load
# tool's worker threads), UNKNOWN (1; 0 skips the unknown-ids runs), NICE (-20:
# server and load tool run at this niceness, so other work on a shared machine disturbs them
# less; empty to leave it), PORT (17990), KEEP (1: keep the work directory),
# DROVER_BIN / FLEETSIM_BIN (default target/release/{drover,drover-fleetsim}, built if
# missing), BIN_NOTE (a sentence on where the binaries come from, for the report).
# Needs Linux, curl, python3; --profile needs perf.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZES=${SIZES:-"10000 50000"}
DURATION=${DURATION:-30}
INTERVAL=${INTERVAL:-5s}
WARMUP=${WARMUP:-10}
NICE=${NICE--20}
PORT=${PORT:-17990}
KEEP=${KEEP:-0}
AB=${AB:-0}
SIM_THREADS=${SIM_THREADS:-2}
UNKNOWN=${UNKNOWN:-1}
WRITE=1
PROFILE=0
while (($#)); do
    case "$1" in
        --no-write) WRITE=0 ;;
        --profile) PROFILE=1 ;;
        --sizes) SIZES=$2; shift ;;
        *) echo "usage: bench/fleet.sh [--no-write] [--profile] [--sizes \"10000 50000\"]" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "fleet.sh: $*" >&2; }
now_ms() { date +%s%3N; }
# A command prefix, not a function: `"${NICE_CMD[@]}" prog &` leaves prog's own pid in $!.
NICE_CMD=()
[[ -n "$NICE" ]] && NICE_CMD=(nice -n "$NICE")
# With autogroups (kernel.sched_autogroup_enabled), niceness only ranks processes within one
# session's group; between sessions the group's own niceness counts. Give this run its own.
if [[ -n "$NICE" && -w /proc/self/autogroup ]] && (($(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo 0))); then
    echo "$NICE" >/proc/$$/autogroup 2>/dev/null || true
fi

for tool in curl python3; do
    command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done
if ((PROFILE)) && ! command -v perf >/dev/null; then log "--profile needs perf"; exit 1; fi

# Permit long-polls (a group being replaced) are open sockets in the server and the load tool.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)

DROVER_BIN=${DROVER_BIN:-$ROOT/target/release/drover}
FLEETSIM_BIN=${FLEETSIM_BIN:-$ROOT/target/release/drover-fleetsim}
if [[ ! -x $DROVER_BIN ]]; then log "building drover"; (cd "$ROOT" && cargo build --release -p drover); fi
if [[ ! -x $FLEETSIM_BIN ]]; then log "building drover-fleetsim"; (cd "$ROOT" && cargo build --release -p drover-fleetsim); fi

WORK=$(mktemp -d /tmp/drover-fleet.XXXXXX)
RES=$WORK/results
mkdir -p "$RES" "$WORK/bin"
# Copied once: others may rebuild target/ during the run.
cp "$DROVER_BIN" "$WORK/bin/drover"
cp "$FLEETSIM_BIN" "$WORK/bin/fleetsim"
DROVER=$WORK/bin/drover
SIM=$WORK/bin/fleetsim
URL=http://127.0.0.1:$PORT

SERVER_PID=
SIM_PID=
cleanup() {
    [[ -n $SIM_PID ]] && kill "$SIM_PID" 2>/dev/null || true
    [[ -n $SERVER_PID ]] && kill -9 "$SERVER_PID" 2>/dev/null || true
    # The balancer processes the servers started (`drover lb`, which outlives its server by
    # design): every process whose command line names this run's work directory.
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue
        if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "$WORK/"; then
            kill "${p#/proc/}" 2>/dev/null || true
        fi
    done
    if [[ $KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Start `drover server` on data directory $1 and wait until it answers.
start_server() {
    local d=$1
    if curl -sf -m 1 "$URL/v1/health" >/dev/null 2>&1; then
        log "something already answers on $URL; set PORT"; exit 1
    fi
    now_ms >"$d.start_ms"
    "${NICE_CMD[@]}" "$DROVER" server --data-dir "$d" --listen "127.0.0.1:$PORT" \
        --heartbeat-interval "$INTERVAL" >>"$d.server.log" 2>&1 &
    SERVER_PID=$!
    echo "$SERVER_PID" >"$d.pid"
    local i
    for i in $(seq 1200); do
        curl -sf -m 2 "$URL/v1/health" >/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { log "server died; see $d.server.log"; tail -5 "$d.server.log" >&2; exit 1; }
        sleep 0.05
    done
    kill -0 "$SERVER_PID" 2>/dev/null || { log "server died; see $d.server.log"; exit 1; }
}

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

count_kind() { grep -c "kind=\"$2\"" "$1" 2>/dev/null || true; }
# The CLI with the server's admin token (written by the server to DATA_DIR/admin.token).
# At the server's niceness: a CLI at 0 beside a server and load tool at -20 gets about 1 % of
# a busy core (CFS weights 1024 against 88761), and its time was the scheduler's, not status's.
cli() {
    local d=$1; shift
    DROVER_TOKEN=$(cat "$d/admin.token" 2>/dev/null || true) "${NICE_CMD[@]}" "$DROVER" --server "$URL" "$@"
}

python3 "$ROOT/bench/fleet_report.py" meta "$RES/meta.json" "$DROVER_BIN" "$FLEETSIM_BIN" \
    "$SIZES" "$DURATION" "$WARMUP" "${NICE:-none}" "$NOFILE" "${BIN_NOTE:-}"

known_phase() {
    local N=$1 PERMITS=$2 TAG=$3 FULL=$4
    local PG=$((N / 10)) D=$WORK/k$TAG$N
    "$SIM" fleet-file --groups 10 --desired "$PG" --max "$PG" >"$D.toml"
    log "N=$N known instances: apply, 1 heartbeat per $INTERVAL each, permit long-polls $PERMITS"
    start_server "$D"
    "${NICE_CMD[@]}" "$SIM" --threads "$SIM_THREADS" run --server "$URL" --mode fleet --follow-new --wait-healthy "$N" \
        --permits "$PERMITS" --interval "$INTERVAL" --warmup "${WARMUP}s" --duration "${DURATION}s" \
        --server-pid-file "$D.pid" --status-every 5s --status-query instances=none --data-dir "$D" --linger --progress \
        --json "$RES/known$TAG-$N.json" >"$D.sim.out" 2>"$D.sim.err" &
    SIM_PID=$!
    sleep 1
    APPLY_MS=$(now_ms)
    cli "$D" apply "$D.toml" >"$D.apply.out"
    for i in $(seq 900); do
        [[ -s "$RES/known$TAG-$N.json" ]] && break
        kill -0 "$SIM_PID" 2>/dev/null || break
        sleep 1
    done
    if [[ ! -s "$RES/known$TAG-$N.json" ]]; then
        log "N=$N: the fleet never became healthy (see $D.sim.err, $D.server.log)"
        tail -3 "$D.sim.err" >&2
    fi
    HEALTHY_AFTER=$(python3 "$ROOT/bench/fleet_report.py" healthy-after "$D.server.log" "$N" "$APPLY_MS" || true)
    grep -E "^(heartbeat|server|status)" "$D.sim.err" | sed 's/^/    /' >&2 || true
    LAUNCH_TERM=$(count_kind "$D.server.log" terminating)
    if [[ $FULL != 1 ]]; then
        kill "$SIM_PID" 2>/dev/null || true
        wait "$SIM_PID" 2>/dev/null || true
        SIM_PID=
        stop_server
        return 0
    fi

    PERF_TOP=
    if ((PROFILE)) && [[ $N == "${SIZES##* }" ]]; then
        log "N=$N: perf, 15 s of steady state"
        perf record -F 499 --call-graph dwarf,16384 -p "$SERVER_PID" -o "$WORK/perf.data" -- sleep 15 >/dev/null 2>&1 || true
        perf report -i "$WORK/perf.data" --children --sort symbol --stdio -g none 2>/dev/null \
            | grep -E "Engine::run|World::reconcile_due|group::reconcile_group|group::next_change|instances::refresh|update_targets|World::publish|Engine::heartbeat|World::heartbeat|absorb_heartbeat|World::status|UpgradeableConnection" \
            >"$RES/perf-$N.txt" || true
    fi

    # `drover status` lists groups (summaries); `drover status s0/r0 --page 2`: 100 instances.
    STATUS_CLI=()
    STATUS_PAGE=()
    for i in 1 2 3; do
        t0=$(date +%s%N); cli "$D" status >/dev/null; t1=$(date +%s%N)
        STATUS_CLI+=($(((t1 - t0) / 1000000)))
        t0=$(date +%s%N); cli "$D" status s0/r0 --page 2 >/dev/null; t1=$(date +%s%N)
        STATUS_PAGE+=($(((t1 - t0) / 1000000)))
    done
    # The whole list (every instance) through the API, 3 times.
    "$SIM" status-latency --data-dir "$D" --server "$URL" --n 3 >"$RES/status-full-$N.json" 2>/dev/null \
        || log "status-latency failed"

    # A deploy of one group (s0/r0, N/10 instances): time to the first permit.
    P0=$(count_kind "$D.server.log" permit)
    "$SIM" deploy-probe --data-dir "$D" --server "$URL" s0 app v2 --timeout 20s >"$RES/deploy-$N.json" 2>"$D.deploy.err" \
        || { log "deploy probe failed"; cat "$D.deploy.err" >&2; }
    if ((PROFILE)) && [[ $N == "${SIZES##* }" ]]; then
        # The 5 s after the deploy: its permits and the long-polls of the group it replaces.
        perf record -F 499 --call-graph dwarf,16384 -p "$SERVER_PID" -o "$WORK/perf-deploy.data" -- sleep 5 >/dev/null 2>&1 || sleep 5
    else
        sleep 5
    fi
    PERMITS_5S=$(($(count_kind "$D.server.log" permit) - P0))
    # The first permit an agent received after the deploy was sent (earlier ones: instances
    # being terminated, whose long-poll also answers permit: true).
    SENT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("deploy_sent_epoch_ms", 0))' "$RES/deploy-$N.json" 2>/dev/null || echo 0)
    AGENT_PERMIT_MS=$(awk -v t="$SENT" '/^PERMIT/ && $3 >= t {print $3; exit}' "$D.sim.out")

    # Restart under load: SIGKILL, start again; the agents keep reporting.
    T0=$(count_kind "$D.server.log" terminating)
    LOST0=$(count_kind "$D.server.log" lost)
    L0=$(count_kind "$D.server.log" launched)
    log "N=$N: server restart"
    stop_server
    start_server "$D"
    API_UP_MS=$(($(now_ms) - $(cat "$D.start_ms")))
    PERF_PID=
    if ((PROFILE)) && [[ $N == "${SIZES##* }" ]]; then
        perf record -F 499 --call-graph dwarf,16384 -p "$SERVER_PID" -o "$WORK/perf-restart.data" -- sleep 10 >/dev/null 2>&1 &
        PERF_PID=$!
    fi
    "$SIM" wait-healthy --data-dir "$D" --server "$URL" --count "$N" --since-epoch-ms "$(cat "$D.start_ms")" \
        --timeout 60s --poll 500ms --server-pid "$SERVER_PID" >"$RES/restart-$N.json" 2>/dev/null || true
    [[ -n $PERF_PID ]] && { wait "$PERF_PID" || true; }
    sleep 2
    python3 - "$RES/extra-$N.json" <<EOF
import json, sys
json.dump({
    "apply_ms": $APPLY_MS,
    "healthy_after_s": float("${HEALTHY_AFTER:-nan}") if "${HEALTHY_AFTER}" else None,
    "terminated_while_launching": int("${LAUNCH_TERM:-0}" or 0),
    "permits": "$PERMITS",
    "status_cli_ms": [$(IFS=,; echo "${STATUS_CLI[*]}")],
    "status_page_cli_ms": [$(IFS=,; echo "${STATUS_PAGE[*]}")],
    "permits_in_5s": $PERMITS_5S,
    "agent_first_permit_epoch_ms": int("${AGENT_PERMIT_MS:-0}" or 0) or None,
    "restart_api_up_ms": $API_UP_MS,
    "terminated_after_restart": $(($(count_kind "$D.server.log" terminating) - T0)),
    "lost_after_restart": $(($(count_kind "$D.server.log" lost) - LOST0)),
    "launched_after_restart": $(($(count_kind "$D.server.log" launched) - L0)),
    "server_rss_mib_after_restart": $(awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/$SERVER_PID/status 2>/dev/null || echo null),
    "server_hwm_mib_after_restart": $(awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$SERVER_PID/status 2>/dev/null || echo null),
}, open(sys.argv[1], "w"))
EOF
    log "N=$N: restart $(cat "$RES/restart-$N.json" 2>/dev/null)"
    kill "$SIM_PID" 2>/dev/null || true
    wait "$SIM_PID" 2>/dev/null || true
    SIM_PID=
    stop_server
}

AB_N=
for N in $SIZES; do
    PG=$((N / 10))

    # 1. Unknown ids: the HTTP + JSON floor (UNKNOWN=0 skips it).
    if ((UNKNOWN)); then
    D=$WORK/u$N
    log "N=$N unknown ids: 1 heartbeat per 5 s each"
    start_server "$D"
    # The groups exist (desired 0), so the agents get their groups' agent tokens.
    "$SIM" fleet-file --groups 10 --desired 0 --max "$PG" >"$D.toml"
    cli "$D" apply "$D.toml" >/dev/null
    "${NICE_CMD[@]}" "$SIM" --threads "$SIM_THREADS" run --server "$URL" --mode unknown --instances "$N" --interval 5s \
        --warmup "${WARMUP}s" --duration "${DURATION}s" --server-pid "$SERVER_PID" \
        --data-dir "$D" --status-every 5s --status-query instances=none --json "$RES/unknown-$N.json" 2>"$D.sim.err" >/dev/null \
        || { log "load tool failed"; tail -5 "$D.sim.err" >&2; }
    grep -E "^(heartbeat|server)" "$D.sim.err" | sed 's/^/    /' >&2 || true
    stop_server
    fi

    # 2. Known instances: apply N, run their agents, measure, deploy, restart.
    # Open files in the server: the heartbeat connections and a long-poll per hinted agent
    # (one group of N/10 during the deploy); with `always`, one long-poll per agent.
    PERMITS=${PERMITS_MODE:-auto}
    if [[ $PERMITS == auto ]]; then
        PERMITS=off
        ((N / 10 + 2000 <= NOFILE)) && PERMITS=on
    fi
    known_phase "$N" "$PERMITS" "" 1
    ((AB)) && ((N + 2000 <= NOFILE)) && [[ $PERMITS == on ]] && AB_N=$N

done

# What the hint saves: the largest N where every agent can hold a long-poll, again with
# every agent holding one (the protocol before the hint; steady state only).
if [[ -n $AB_N ]]; then
    known_phase "$AB_N" always -always 0
fi

uptime >"$RES/uptime-end.txt"
python3 "$ROOT/bench/fleet_report.py" report "$RES" $( ((WRITE)) || echo --no-write)
