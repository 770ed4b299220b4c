#!/usr/bin/env bash
# CPU A/B of pipelined steps: two stacks of this tree, `cast up --pipeline on` and `--pipeline off` (the reference
# pair, the small draft alone: --draft-levels ""), benched in the order on, off, off, on, on, off, so that a drift
# of the machine hits both alike.
#   POLICIES=cast CONCURRENCY="1 8" bash benchmarks/pipeline_ab.sh OUT
set -u
OUT=${1:?usage: bash benchmarks/pipeline_ab.sh OUT}
TREE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$TREE/.venv/bin/python}
mkdir -p "$OUT"
cd "$TREE"
$PY -m orchestrator.cli up --draft-levels "" --pipeline on --port 55051 --draft-port 55052 --verify-port 55053 \
    --http-port -1 --metrics-port 0 > "$OUT/stack_on.log" 2>&1 &
ON_PID=$!
$PY -m orchestrator.cli up --draft-levels "" --pipeline off --port 56051 --draft-port 56052 --verify-port 56053 \
    --http-port -1 --metrics-port 0 > "$OUT/stack_off.log" 2>&1 &
OFF_PID=$!
trap 'kill $ON_PID $OFF_PID 2>/dev/null; wait' EXIT  # `cast up` stops its services on SIGTERM
for _ in $(seq 1 300); do grep -q '^ready' "$OUT/stack_on.log" && grep -q '^ready' "$OUT/stack_off.log" && break; sleep 1; done
round=0
for who in on off off on on off; do
    round=$((round + 1)); port=55051; [[ $who == off ]] && port=56051
    for c in ${CONCURRENCY:-1 8}; do
        $PY -m orchestrator.cli bench --addr 127.0.0.1:$port --policies ${POLICIES:-cast} --concurrency $c \
            --requests ${REQUESTS:-16} --seconds 60 --max-new-tokens ${TOKENS:-64} --rstrip-prompts --warmup 1 \
            --out "$OUT/r${round}_${who}_c$c" > "$OUT/r${round}_${who}_c$c.log" 2>&1
        echo "round $round $who c=$c"; grep -E "c=|step p50|pipeline hits" "$OUT/r${round}_${who}_c$c.log"
    done
done
