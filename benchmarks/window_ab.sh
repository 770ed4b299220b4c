#!/usr/bin/env bash
# Trimmed copy of benchmarks/replicas.sh's two-orchestrator part: per round, for the batching window on and off,
# one orchestrator at c=8 then two at c=4 each against the same 1 verify + 1 draft replica.
set -u
OUT=${1:?OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
REQUESTS=${REQUESTS:-24}; TOKENS=${TOKENS:-96}; POLICY=${POLICY:-cast}; ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT"; cd "$ROOT"
bench() { $PY -m orchestrator.cli bench --addr "$1" --policies "$POLICY" --concurrency "$2" --requests "$REQUESTS" \
        --seconds 120 --max-new-tokens "$TOKENS" --rstrip-prompts --warmup 1 --out "$OUT/$3" > "$OUT/$3.log" 2>&1; }
up() {
    CAST_VERIFY_WINDOW=$2 CAST_VERIFY_WINDOW_CAP=${CAP:-0.05} $PY -m orchestrator.cli up --port $P0 --draft-port $((P0+1)) --verify-port $((P0+2)) --http-port -1 \
        > "$OUT/stack_$1.log" 2>&1 &
    UP_PID=$!
    for _ in $(seq 1 600); do grep -q '^ready' "$OUT/stack_$1.log" && return 0; sleep 1; done
    echo "stack $1 not ready"; return 1
}
P0=${P0:-56051}
for round in $(seq 1 $ROUNDS); do
    order=${WINDOWS:-0.5 0}; [[ $((round % 2)) == 0 ]] && order=$(echo $order | tr ' ' '\n' | tac | tr '\n' ' ')
    for w in $order; do
        name="r${round}_w$w"
        up "$name" "$w" || exit 1
        bench 127.0.0.1:$P0 8 "${name}_one_c8"
        $PY -m orchestrator.server --tokenizer models/reference/target --port $((P0+10)) --draft 127.0.0.1:$((P0+1)) \
            --verify 127.0.0.1:$((P0+2)) > "$OUT/orchestrator2_$name.log" 2>&1 &
        SECOND=$!
        for _ in $(seq 1 300); do grep -q "orchestrator serving" "$OUT/orchestrator2_$name.log" && break; sleep 1; done
        bench 127.0.0.1:$P0 4 "${name}_two_a_c4" & A=$!
        bench 127.0.0.1:$((P0+10)) 4 "${name}_two_b_c4"
        wait $A
        echo "$name one c=8: $(grep -E 'c=8' "$OUT/${name}_one_c8.log" | head -1)"
        echo "$name two c=4: $(grep -hE 'c=4' "$OUT"/${name}_two_*_c4.log | head -2 | tr '\n' ' ')"
        kill -TERM "$SECOND"; wait "$SECOND" 2>/dev/null
        kill -TERM "$UP_PID"; wait "$UP_PID" 2>/dev/null; sleep 2
    done
done
