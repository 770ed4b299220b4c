#!/usr/bin/env bash
# Draft levels and the cascade on the GPU machine (issue 26), the CPU report's comparison (benchmarks/cascade_report.py)
# on the 8B-shaped target: ar, each level alone (small, sparse, lookup), cast with the small draft, eagle2, the fixed
# cascade and cascade (DyTC), at batch 1 and 8, on HumanEval and the repetitive edit set; and cascade on a stack with
# no draft model. About 6 minutes of wall time with the defaults (widening ~1.5 min, two stacks' start ~1.5 min,
# the levels ~3 min).
#   PYTHONPATH=$PWD:$PWD/protos:/tmp/ortsite bash benchmarks/gpu_cascade.sh OUT_DIR
# (onnxruntime-gpu as /work/shared/device/ORT_GPU.md says; without it the draft levels run on the CPU provider).
#
# The sparse level, honestly: the 8B-shaped target is the reference target widened (benchmarks/widen_target.py), its
# 26 added layers are identity by construction, so a sparse level chosen on it would skip those for free and fake both
# its acceptance and its cost. Instead the layers are chosen on the reference target's own 6 layers (agreement on
# held-out text, draft_service/sparse.py; the CPU report's choice), and that sparse checkpoint is widened to the 8B
# shape with the same fraction of the 8B's 32 layers as it keeps of the reference's 6 (4 of 6 -> 21 of 32, real
# layers spread as in the target). Its acceptance is then exactly the reference sparse level's and its forward costs
# what a real 8B with a third of its layers skipped costs. The draft service serves that checkpoint as it is
# (sparse=DIR with sparse.json in it). Exporting that 21-layer 8B-shaped checkpoint to ONNX and checking it against
# torch on the CPU takes about 4 minutes on the GPU machine (6 such layers: 67 s + 24 s on a 2-core VM): it runs as a
# stage of its own before the stacks start. SPARSE=0 leaves the sparse level and the target-only stack out.
set -u
OUT=${1:-gpu-cascade}
mkdir -p "$OUT"
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}
export CAST_DRAFT_PROVIDER=${CAST_DRAFT_PROVIDER:-auto}
SHAPE=${SHAPE:-8b}  # or 1b (Llama-3.2-1B's shape: a sparse level of 11 of its 16 layers exports in well under a minute)
WIDE_LAYERS=$(python3 -c "from benchmarks.widen_target import SHAPES; print(SHAPES['$SHAPE']['num_hidden_layers'])")
REF=models/reference/target
WIDE=${WIDE:-/tmp/wide-$SHAPE}
SPARSE_REF=${SPARSE_REF:-/tmp/sparse-ref}
SPARSE_WIDE=${SPARSE_WIDE:-/tmp/wide-$SHAPE-sparse}
stage() { echo; echo "== $1 ($(date -u +%T))"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

stage "$SHAPE-shaped target"
[[ -f $WIDE/config.json ]] || python3 -m benchmarks.widen_target --source $REF --shape $SHAPE --out "$WIDE" --dtype bfloat16 \
    --check-prompts ${CHECK_PROMPTS:-5} --report "$OUT/widen_target.json" | tail -3

SPARSE_ARG=none
if [[ ${SPARSE:-1} == 1 ]]; then
stage "sparse level: layers chosen on the reference target's own layers, then widened"
[[ -f $SPARSE_REF/sparse.json ]] || python3 -m draft_service.sparse --target $REF --out "$SPARSE_REF" | tail -12
cp "$SPARSE_REF/sparse.json" "$OUT/sparse_ref.json"
KEPT=$(python3 -c "import json; print(len(json.load(open('$SPARSE_REF/sparse.json'))['layers']))")
FULL=$(python3 -c "import json; print(json.load(open('$SPARSE_REF/sparse.json'))['target_layers'])")
LAYERS=$(( (WIDE_LAYERS * KEPT + FULL / 2) / FULL ))
echo "the reference sparse level keeps $KEPT of $FULL layers: widened to $LAYERS of $WIDE_LAYERS"
if [[ ! -f $SPARSE_WIDE/sparse.json ]]; then
    python3 -m benchmarks.widen_target --source "$SPARSE_REF" --shape "$(python3 -c "import json; from benchmarks.widen_target import SHAPES; print(json.dumps(dict(SHAPES['$SHAPE'], num_hidden_layers=$LAYERS)))")" \
        --out "$SPARSE_WIDE" --dtype bfloat16 --check-prompts ${CHECK_PROMPTS:-5} --report "$OUT/widen_sparse.json" | tail -3
    # sparse.json (the reference choice, as it is) marks it a sparse checkpoint, served as it is; widened.json says
    # how it was widened.
    cp "$SPARSE_REF/sparse.json" "$SPARSE_WIDE/sparse.json"
    echo "{\"widened_to\": \"$SHAPE\", \"layers\": $LAYERS, \"of\": $WIDE_LAYERS}" > "$SPARSE_WIDE/widened.json"
fi
SPARSE_ARG="sparse=$SPARSE_WIDE"
fi

if [[ $SPARSE_ARG != none ]]; then
    # Before the stacks start: this export takes minutes, and the orchestrator waits 600 s for the services, which start
    # one after the other on a host.
    stage "export the sparse level (cached in $CAST_CACHE_DIR)"
    python3 - "$SPARSE_WIDE" "$CAST_CACHE_DIR" <<'PY'
import sys, time
from draft_service.export import export_draft
from draft_service.runner import choose_dtype, choose_provider
start = time.perf_counter()
path, meta = export_draft(sys.argv[1], dtype=choose_dtype("auto", choose_provider("auto")), cache_dir=sys.argv[2])
print(f"{path}: {meta.num_layers} layers, {meta.dtype}, {time.perf_counter() - start:.0f} s")
PY
fi

stage "the levels, batch 1 and 8 (two stacks: the pair with every level, the target alone)"
python3 -m benchmarks.cascade_report --out "$OUT/bench" --target "$WIDE" --draft models/reference/draft \
    --sparse "$SPARSE_ARG" --rounds ${ROUNDS:-1} --requests ${REQUESTS:-4} \
    --max-new-tokens ${TOKENS:-64} --sets ${SETS:-humaneval,edit} --concurrency ${CONCURRENCY:-1,8} \
    --policies ${POLICIES:-ar,lookup,sparse,small,cast,eagle2,cascade-fixed,cascade} 2>&1 | grep -v "^\s*$" \
    | tee "$OUT/levels.log" | tail -60  # levels.log: each level's row as it is measured (a run cut short keeps them)
grep -h "draft levels\|ERROR" "$OUT"/bench/logs-*/draft.log | head -5
date -u
