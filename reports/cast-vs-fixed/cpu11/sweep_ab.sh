#!/usr/bin/env bash
# A sweep cell on two stacks in turn (BASE_TREE: an export of the commit before; this tree): base, new, new, base.
#   BASE_TREE=/tmp/base CONCURRENCY=8 REQUESTS=16 bash reports/cast-vs-fixed/cpu11/sweep_ab.sh OUT
set -u
OUT=${1:?usage: BASE_TREE=DIR bash sweep_ab.sh OUT}
source "$(dirname "$0")/two_stacks.sh"
cd "$NEW_TREE"
n=0
for who in base new new base; do
    n=$((n + 1)); port=53051; [[ $who == new ]] && port=54051
    $PY -m orchestrator.cli sweep --addr 127.0.0.1:$port --prompts ${PROMPTS:-benchmarks/prompts/heldout.jsonl} \
        --policies ar,cast --concurrency ${CONCURRENCY:-8} --requests ${REQUESTS:-16} --max-new-tokens 48 --rounds 2 \
        --warmup-tokens 16 --confirm 0 --rstrip-prompts --out "$OUT/s${n}_$who" > "$OUT/s${n}_$who.log" 2>&1
    echo "sweep $n $who: $(grep -E '^\| cast / oracle' "$OUT/s${n}_$who/sweep.md")"
done
