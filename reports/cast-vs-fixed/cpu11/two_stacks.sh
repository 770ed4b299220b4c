# Sourced by run.sh and sweep_ab.sh: main's export (BASE_TREE) and this tree as two `cast up` stacks, on ports
# 53051 and 54051, stopped when the sourcing script exits. Sets NEW_TREE and PY; needs OUT.
NEW_TREE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
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
