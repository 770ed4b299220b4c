#!/usr/bin/env bash
# Policies on the GPU with the reference pair, in one call (reports/gpu-reference-pair/): profile both services'
# cost tables, then run `cast bench` for every policy at batch 1 and 8, and optionally a CAST threshold sweep.
# Run from the repository root with the project importable:
#   PYTHONPATH=$PWD:$PWD/protos bash benchmarks/gpu_policies.sh OUT_DIR
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
$CAST bench --policies cast,eagle2,chain,ar --concurrency ${BENCH_CONCURRENCY:-1,8} --requests ${BENCH_REQUESTS:-16} \
    --seconds ${BENCH_SECONDS:-30} --max-new-tokens 128 --rstrip-prompts --out "$OUT" \
    --title "reference pair, verify on GPU, draft on ORT CPU"

# CAST threshold sweep: one more orchestrator per setting on the same draft and verify services.
# SWEEP="C1:C2:C3 ..." e.g. "1:1:1 4:3:2.5 16:9:6"
port=50061
for setting in ${SWEEP:-}; do
    IFS=: read -r c1 c2 c3 <<< "$setting"
    python3 -m orchestrator.server --tokenizer $TARGET --port $port --cast-c1 $c1 --cast-c2 $c2 --cast-c3 $c3 \
        > "$OUT/sweep-$port.log" 2>&1 &
    ORCH=$!
    for _ in $(seq 1 60); do grep -q "serving on" "$OUT/sweep-$port.log" && break; sleep 0.5; done
    echo "== sweep C1=$c1 C2=$c2 C3=$c3"
    $CAST bench --addr 127.0.0.1:$port --policies cast --concurrency ${SWEEP_CONCURRENCY:-1,8} --requests ${SWEEP_REQUESTS:-8} \
        --seconds ${SWEEP_SECONDS:-10} --max-new-tokens 128 --rstrip-prompts --out "$OUT/sweep-$c1-$c2-$c3" --title "C1=$c1 C2=$c2 C3=$c3"
    kill $ORCH; wait $ORCH 2>/dev/null
    port=$((port + 1))
done
kill $STACK; wait $STACK 2>/dev/null
date -u
