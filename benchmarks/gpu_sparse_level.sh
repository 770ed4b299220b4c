#!/usr/bin/env bash
# The sparse level for a widened target on the GPU machine (issue 26), shared by gpu_cascade.sh and
# gpu_cascade_ab.sh. The widened target's added layers are identity by construction, so a sparse level chosen on it
# would skip those for free and fake both its acceptance and its cost. Instead the layers are chosen on the reference
# target's own 6 layers (agreement on held-out text, draft_service/sparse.py; the CPU report's choice), and that
# sparse checkpoint is widened to SHAPE with the same fraction of its layers (8B: 4 of 6 -> 21 of 32; 1B: 11 of 16),
# real layers spread as in the target. Its acceptance is then exactly the reference sparse level's and its forward
# costs what a real target of that shape with a third of its layers skipped costs. It is then exported to ONNX
# (cached in CAST_CACHE_DIR: the draft service finds it there), before any stack starts: the 8B's export takes about
# 4 minutes, and the orchestrator waits 600 s for services that start one after the other.
#   bash benchmarks/gpu_sparse_level.sh SHAPE OUT_DIR   # the last line printed: the sparse checkpoint's directory
set -eu
SHAPE=${1:?usage: bash benchmarks/gpu_sparse_level.sh SHAPE OUT_DIR}
OUT=${2:?usage: bash benchmarks/gpu_sparse_level.sh SHAPE OUT_DIR}
mkdir -p "$OUT"
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}
REF=models/reference/target
SPARSE_REF=${SPARSE_REF:-/tmp/sparse-ref}
SPARSE_WIDE=${SPARSE_WIDE:-/tmp/wide-$SHAPE-sparse}
WIDE_LAYERS=$(python3 -c "from benchmarks.widen_target import SHAPES; print(SHAPES['$SHAPE']['num_hidden_layers'])")
echo "== sparse level: layers chosen on the reference target's own layers, then widened ($(date -u +%T))"
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
echo "== export the sparse level (cached in $CAST_CACHE_DIR; $(date -u +%T))"
python3 - "$SPARSE_WIDE" "$CAST_CACHE_DIR" <<'PY'
import sys, time
from draft_service.export import export_draft
from draft_service.runner import choose_dtype, choose_provider
start = time.perf_counter()
path, meta = export_draft(sys.argv[1], dtype=choose_dtype("auto", choose_provider("auto")), cache_dir=sys.argv[2])
print(f"{path}: {meta.num_layers} layers, {meta.dtype}, {time.perf_counter() - start:.0f} s")
PY
echo "$SPARSE_WIDE"
