#!/usr/bin/env bash
# CPU A/B of two trees of this project on one machine: an earlier commit's export (BASE_TREE, e.g.
# `git archive REV | tar -x -C DIR`, with models/ linked into it) and this tree, each as its own stack, benched in
# the order base, new, new, base, base, new, so that a drift of the machine hits both alike. Metrics and HTTP off
# (`cast up` serves them on fixed ports: two stacks would collide).
#   BASE_TREE=/tmp/base POLICIES=cast CONCURRENCY="1 8" bash benchmarks/cpu_ab.sh OUT
set -u
OUT=${1:?usage: BASE_TREE=DIR bash benchmarks/cpu_ab.sh OUT}
BASE_TREE=${BASE_TREE:?an export of the commit to compare against}
NEW_TREE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$NEW_TREE/.venv/bin/python}
mkdir -p "$OUT"
(cd "$BASE_TREE" && PYTHONPATH=$BASE_TREE:$BASE_TREE/protos exec $PY -m orchestrator.cli up --port 53051 --metrics-port 0 --http-port -1 \
    --draft-port 53052 --verify-port 53053) > "$OUT/stack_base.log" 2>&1 &
BASE_PID=$!
(cd "$NEW_TREE" && exec $PY -m orchestrator.cli up --port 54051 --draft-port 54052 --verify-port 54053 --metrics-port 0 --http-port -1) \
    > "$OUT/stack_new.log" 2>&1 &
NEW_PID=$!
trap 'kill $BASE_PID $NEW_PID 2>/dev/null; wait' EXIT  # `cast up` stops its services on SIGTERM
for _ in $(seq 1 300); do grep -q '^ready' "$OUT/stack_base.log" && grep -q '^ready' "$OUT/stack_new.log" && break; sleep 1; done
round=0
for who in base new new base base new; do
    round=$((round + 1)); port=53051; [[ $who == new ]] && port=54051
    for c in ${CONCURRENCY:-1 8}; do
        $PY -m orchestrator.cli bench --addr 127.0.0.1:$port --policies ${POLICIES:-cast} --concurrency $c \
            --requests ${REQUESTS:-16} --prompts ${PROMPTS:-humaneval} --seconds 60 --max-new-tokens ${TOKENS:-64} --rstrip-prompts --warmup 1 \
            --out "$OUT/r${round}_${who}_c$c" > "$OUT/r${round}_${who}_c$c.log" 2>&1
        echo "round $round $who c=$c"; grep -E "c=|step p50" "$OUT/r${round}_${who}_c$c.log"
    done
done
