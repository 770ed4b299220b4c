#!/usr/bin/env bash
# Issue 23 on the GPU machine, in one call: pipelined steps against not, on the 8B-shaped target (the reference
# target widened, bf16), HumanEval, 128 new tokens, batch 1 and 8, with the draft on the GPU (ONNX Runtime's CUDA
# provider) and on the host's CPU cores (its CPU provider). Per draft placement: one stack (`cast up --pipeline on`)
# and a second orchestrator with --pipeline off on the same draft and verify services, benched in turn
# (on, off, off, on, ...) so that drift hits both alike. Everything lands in OUT (bench CSVs, logs, summary.txt).
#   PYTHONPATH=$PWD:$PWD/protos bash benchmarks/gpu_pipeline.sh OUT
# Knobs: SHAPE (8b), PROVIDERS ("cuda cpu"), POLICIES (cast,eagle2,chain), CONCURRENCY (1,8), ROUNDS (2),
# REQUESTS (16 per level), BENCH_SECONDS (60 per level).
set -u
OUT=${1:-gpu-pipeline}
mkdir -p "$OUT"
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}
SHAPE=${SHAPE:-8b}
WIDE=${WIDE:-/tmp/wide-$SHAPE}
DRAFT=models/reference/draft
CAST="python3 -m orchestrator.cli"
stage() { echo; echo "== $1 ($(date -u +%T))"; }
exec > >(tee -a "$OUT/summary.txt") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import torch, transformers, onnxruntime, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'grpc', grpc.__version__)"
date -u

if [[ ! -f "$WIDE/config.json" ]]; then
    stage "widen the reference target to the $SHAPE shape"
    python3 -m benchmarks.widen_target --source models/reference/target --shape "$SHAPE" --out "$WIDE" \
        --dtype bfloat16 --device cuda --check-prompts ${CHECK_PROMPTS:-20} --report "$OUT/widen_$SHAPE.json"
fi

for provider in ${PROVIDERS:-cuda cpu}; do
    stage "draft on $provider: pipelined (port 50051) and not (port 50061) on the same services"
    export CAST_DRAFT_PROVIDER=$provider
    # --draft-levels '': the small draft alone, as the policies benched use it (cast up serves sparse and lookup
    # beside it by default: a sparse copy of the widened target would be exported and held for nothing).
    $CAST up --target "$WIDE" --draft $DRAFT --draft-levels '' --pipeline on --http-port -1 --metrics-port 0 \
        > "$OUT/stack_$provider.log" 2>&1 &
    STACK=$!
    for _ in $(seq 1 900); do grep -q '^ready' "$OUT/stack_$provider.log" && break; kill -0 $STACK 2>/dev/null || break; sleep 1; done
    tail -n 2 "$OUT/stack_$provider.log"
    python3 -m orchestrator.server --tokenizer "$WIDE" --port 50061 --pipeline off \
        > "$OUT/orchestrator_off_$provider.log" 2>&1 &
    OFF=$!
    for _ in $(seq 1 120); do grep -q 'serving on' "$OUT/orchestrator_off_$provider.log" && break; sleep 1; done
    $CAST generate --json --max-new-tokens 64 "def fibonacci(n):" > "$OUT/generate_on_$provider.json" 2>&1
    order="on off"
    for round in $(seq 1 ${ROUNDS:-2}); do
        for mode in $order; do
            port=50051; [[ $mode == off ]] && port=50061
            echo "-- round $round, pipeline $mode, draft $provider"
            $CAST bench --addr 127.0.0.1:$port --policies ${POLICIES:-cast,eagle2,chain} \
                --concurrency ${CONCURRENCY:-1,8} --requests ${REQUESTS:-16} --seconds ${BENCH_SECONDS:-60} \
                --max-new-tokens 128 --rstrip-prompts --warmup 1 --out "$OUT/bench_${provider}_${mode}_r$round" \
                --title "$SHAPE target, draft $provider, pipeline $mode" 2>&1 | grep -E "c=|step p50|pipeline hits"
        done
        order=$(echo $order | awk '{print $2, $1}')
    done
    kill $OFF; wait $OFF 2>/dev/null
    kill $STACK; wait $STACK 2>/dev/null
done
date -u
