#!/usr/bin/env bash
# Chaos soak (issue 20): the example fleet under steady load through its ingress while faults
# are injected at random from a seed it prints (SIGKILL of a component, an agent, the server
# and the balancer; SIGSTOP/SIGCONT of an agent; 5,000 idle API connections; a heartbeat flood
# and garbage bodies with a stolen agent token; an artifact-host outage during a deploy; a
# deploy every minute, good and broken versions in turn). Reports failed requests against the
# fault windows, instances replaced against those that had to be, lost changes, server and
# agent RSS growth, store growth and panics; writes the "Chaos soak" section of
# docs/benchmarks.md (--no-write: print only). Exit status 0 when every goal is met.
#
#   bench/chaos.sh [DURATION] [--no-write]     # DURATION: 30m (default), 3m (CI), 180s, 1h
#
# Settings (environment): SEED (a random one, printed), RATE (100 requests/s), FAULT_GAP (6 s
# between faults on average), DEPLOY_EVERY (60 s), SUBNET (63: instances on 127.63.0.0/16),
# DROVER_BIN (default target/release/drover, built if missing; drover-agent beside it),
# CHAOS_DIR (work directory; default a new one under /tmp, kept for its logs), EVENTS_KEEP (500:
# the server's --events-keep), FAULTS (e.g. kill_lb,hb_flood: only these), BIN_NOTE.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${DROVER_BIN:-}" ]; then
    echo "chaos.sh: building target/release/drover and drover-agent" >&2
    (cd "$ROOT" && cargo build --release -q -p drover --bin drover --bin drover-agent)
    export DROVER_BIN="$ROOT/target/release/drover"
fi
exec python3 "$ROOT/bench/chaos.py" "$@"
