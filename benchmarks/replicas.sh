#!/usr/bin/env bash
# Replicas on one machine (issue 19): `cast bench` at concurrency 8 against `cast up` with 1 verify + 1 draft,
# 1 verify + 2 drafts and 2 verify + 1 draft replicas; then two orchestrators at concurrency 4 each against one
# verify and one draft replica, beside one orchestrator at 8. Each layout in turn, twice (A B C A B C).
#   bash benchmarks/replicas.sh OUT          (REQUESTS=24 TOKENS=96 POLICY=cast)
set -u
OUT=${1:?usage: bash benchmarks/replicas.sh OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
REQUESTS=${REQUESTS:-24}; TOKENS=${TOKENS:-96}; POLICY=${POLICY:-cast}
mkdir -p "$OUT"
cd "$ROOT"

bench() {  # bench ADDR CONCURRENCY NAME
    $PY -m orchestrator.cli bench --addr "$1" --policies "$POLICY" --concurrency "$2" --requests "$REQUESTS" \
        --seconds 120 --max-new-tokens "$TOKENS" --rstrip-prompts --warmup 1 --out "$OUT/$3" > "$OUT/$3.log" 2>&1
}

up() {  # up NAME DRAFTS VERIFIES: starts a stack on 55051.., waits for it; its pid in UP_PID
    $PY -m orchestrator.cli up --port 55051 --draft-port 55052 --verify-port 55053 --http-port -1 \
        --draft-replicas "$2" --verify-replicas "$3" > "$OUT/stack_$1.log" 2>&1 &
    UP_PID=$!
    for _ in $(seq 1 600); do grep -q '^ready' "$OUT/stack_$1.log" && return 0; sleep 1; done
    echo "stack $1 not ready"; return 1
}

down() { kill -TERM "$UP_PID"; wait "$UP_PID" 2>/dev/null; sleep 2; }

for round in 1 2; do
    for layout in "1v1d 1 1" "1v2d 2 1" "2v1d 1 2"; do
        set -- $layout
        up "$1" "$2" "$3" || exit 1
        bench 127.0.0.1:55051 8 "r${round}_$1_c8"
        echo "round $round $1: $(grep -E 'c=8' "$OUT/r${round}_$1_c8.log" | head -1)"
        down
    done
    # Two orchestrators sharing one verify and one draft replica, each at concurrency 4, against one at 8.
    up "1v1d_shared" 1 1 || exit 1
    bench 127.0.0.1:55051 8 "r${round}_one_orchestrator_c8"
    $PY -m orchestrator.server --tokenizer models/reference/target --port 55061 --draft 127.0.0.1:55052 \
        --verify 127.0.0.1:55053 > "$OUT/orchestrator2_r$round.log" 2>&1 &
    SECOND=$!
    for _ in $(seq 1 300); do grep -q "orchestrator serving" "$OUT/orchestrator2_r$round.log" && break; sleep 1; done
    bench 127.0.0.1:55051 4 "r${round}_two_orchestrators_a_c4" &
    A=$!
    bench 127.0.0.1:55061 4 "r${round}_two_orchestrators_b_c4"
    wait $A
    echo "round $round one orchestrator c=8: $(grep -E 'c=8' "$OUT/r${round}_one_orchestrator_c8.log" | head -1)"
    echo "round $round two orchestrators c=4 each: $(grep -hE 'c=4' "$OUT"/r${round}_two_orchestrators_*_c4.log | head -2 | tr '\n' ' ')"
    kill -TERM "$SECOND"; wait "$SECOND" 2>/dev/null
    down
done
