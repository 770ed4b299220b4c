#!/usr/bin/env bash
# CPU round 11: bursts on two stacks (BASE_TREE: an export of the commit before; this tree), burst_ab.py between them.
#   BASE_TREE=/tmp/base bash reports/cast-vs-fixed/cpu11/run.sh OUT [burst_ab.py flags]
set -u
OUT=${1:?usage: BASE_TREE=DIR bash run.sh OUT}; shift
NEW_TREE=$(cd "$(dirname "$0")/../../.." && pwd)
PY=$NEW_TREE/.venv/bin/python
mkdir -p "$OUT"
(cd "$BASE_TREE" && PYTHONPATH=$BASE_TREE:$BASE_TREE/protos exec $PY -m orchestrator.cli up --port 53051 --metrics-port 0 \
    --http-port -1 --draft-port 53052 --verify-port 53053) > "$OUT/stack_base.log" 2>&1 &
BASE_PID=$!
(cd "$NEW_TREE" && exec $PY -m orchestrator.cli up --port 54051 --draft-port 54052 --verify-port 54053 --metrics-port 0 \
    --http-port -1) > "$OUT/stack_new.log" 2>&1 &
NEW_PID=$!
trap 'kill $BASE_PID $NEW_PID 2>/dev/null; wait' EXIT
for _ in $(seq 1 300); do grep -q '^ready' "$OUT/stack_base.log" && grep -q '^ready' "$OUT/stack_new.log" && break; sleep 1; done
cd "$NEW_TREE" && PYTHONPATH=$NEW_TREE:$NEW_TREE/protos $PY reports/cast-vs-fixed/cpu11/burst_ab.py 127.0.0.1:53051 127.0.0.1:54051 "$@"
