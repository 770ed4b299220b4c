#!/usr/bin/env bash
# Draft levels and the cascade on the GPU machine (issue 26), the CPU report's comparison (benchmarks/cascade_report.py)
# on the 8B-shaped target: ar, each level alone (small, sparse, lookup), cast with the small draft, eagle2, the fixed
# cascade and cascade (DyTC), at batch 1 and 8, on HumanEval and the repetitive edit set; and cascade on a stack with
# no draft model. About 6 minutes of wall time with the defaults (widening ~1.5 min, two stacks' start ~1.5 min,
# the levels ~3 min).
#   PYTHONPATH=$PWD:$PWD/protos:/tmp/ortsite bash benchmarks/gpu_cascade.sh OUT_DIR
# (onnxruntime-gpu as /work/shared/device/ORT_GPU.md says; without it the draft levels run on the CPU provider).
#
# The sparse level (benchmarks/gpu_sparse_level.sh): chosen on the reference target's own layers, then widened, so
# that the widened target's identity layers do not fake its acceptance. SPARSE=0 leaves it and the target-only stack
# out.
set -u
OUT=${1:-gpu-cascade}
mkdir -p "$OUT"
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}
export CAST_DRAFT_PROVIDER=${CAST_DRAFT_PROVIDER:-auto}
SHAPE=${SHAPE:-8b}  # or 1b (Llama-3.2-1B's shape: a sparse level of 11 of its 16 layers exports in well under a minute)
REF=models/reference/target
WIDE=${WIDE:-/tmp/wide-$SHAPE}
stage() { echo; echo "== $1 ($(date -u +%T))"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

stage "$SHAPE-shaped target"
[[ -f $WIDE/config.json ]] || python3 -m benchmarks.widen_target --source $REF --shape $SHAPE --out "$WIDE" --dtype bfloat16 \
    --check-prompts ${CHECK_PROMPTS:-5} --report "$OUT/widen_target.json" | tail -3

SPARSE_ARG=none
if [[ ${SPARSE:-1} == 1 ]]; then
    bash benchmarks/gpu_sparse_level.sh "$SHAPE" "$OUT" | tee "$OUT/sparse_level.log"
    SPARSE_ARG="sparse=$(tail -n 1 "$OUT/sparse_level.log")"
fi

stage "the levels, batch 1 and 8 (two stacks: the pair with every level, the target alone)"
python3 -m benchmarks.cascade_report --out "$OUT/bench" --target "$WIDE" --draft models/reference/draft \
    --sparse "$SPARSE_ARG" --rounds ${ROUNDS:-1} --requests ${REQUESTS:-4} \
    --max-new-tokens ${TOKENS:-64} --sets ${SETS:-humaneval,edit} --concurrency ${CONCURRENCY:-1,8} \
    --policies ${POLICIES:-ar,lookup,sparse,small,cast,eagle2,cascade-fixed,cascade} 2>&1 | grep -v "^\s*$" \
    | tee "$OUT/levels.log" | tail -60  # levels.log: each level's row as it is measured (a run cut short keeps them)
grep -h "draft levels\|ERROR" "$OUT"/bench/logs-*/draft.log | head -5
date -u
