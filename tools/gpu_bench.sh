#!/usr/bin/env bash
# One call on the GPU machine (issue 4): profile both services' cost tables for the reference pair, then run
# `cast bench` for every policy at batch 1 and 8. Run from the repository root with the project importable:
#   PYTHONPATH=$PWD:$PWD/protos bash tools/gpu_bench.sh OUT_DIR
# Each stage keeps going if an earlier one failed, so that whatever ran comes back.
set -u
OUT=${1:-bench-out}
mkdir -p "$OUT"
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}
TARGET=models/reference/target
DRAFT=models/reference/draft
CAST="python3 -m orchestrator.cli"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, onnxruntime, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'grpc', grpc.__version__)"
date -u

echo "== profile verify"; t0=$SECONDS
$CAST profile verify --model $TARGET --no-progress ${PROFILE_ARGS:-} --out "$OUT/verify_table.json" --plot "$OUT/verify_table.png"
echo "profile verify: $((SECONDS - t0)) s"
echo "== profile draft"; t0=$SECONDS
$CAST profile draft --model $DRAFT --no-progress ${PROFILE_ARGS:-} --out "$OUT/draft_table.json" --plot "$OUT/draft_table.png"
echo "profile draft: $((SECONDS - t0)) s"

echo "== stack"
export CAST_VERIFY_COST_TABLE="$OUT/verify_table.json" CAST_DRAFT_COST_TABLE="$OUT/draft_table.json"
$CAST up > "$OUT/stack.log" 2>&1 &
STACK=$!
for _ in $(seq 1 300); do grep -q '^ready' "$OUT/stack.log" && break; sleep 1; done
tail -n 5 "$OUT/stack.log"

echo "== one request with per-step decisions"
$CAST generate --json --max-new-tokens 64 "def fibonacci(n):" > "$OUT/generate_cast.json" && head -c 1500 "$OUT/generate_cast.json"; echo

echo "== bench"
$CAST bench --policies cast,eagle2,chain,ar --concurrency 1,8 --requests ${BENCH_REQUESTS:-16} --seconds ${BENCH_SECONDS:-30} \
    --max-new-tokens 128 --rstrip-prompts --out "$OUT" --title "reference pair, verify on GPU, draft on ORT CPU"
kill $STACK; wait $STACK 2>/dev/null
date -u
