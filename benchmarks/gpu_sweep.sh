#!/usr/bin/env bash
# `cast sweep` on the GPU machine (issue 21): CAST against every fixed tree shape of the issue's grid at concurrency
# 1, 8 and 32, for the reference target widened to the 8B and the 1B shape (benchmarks/widen_target.py), the
# reference draft on ONNX Runtime (CUDA where onnxruntime-gpu is importable, see /work/shared/device/ORT_GPU.md).
# One call: both targets on both prompt sets (one stack per target, a sweep per set on it), under 8 minutes of wall
# time with the defaults (a cell is cut at CUTOFF seconds; a sweep that would start after DEADLINE seconds is
# skipped, and says so). Everything lands in OUT: the log, per target the stack's log, its cost tables and the
# widening report, per target and set (OUT/SHAPE/SET/) sweep.md, sweep.csv, rounds.csv, sweep.png and the sweep's
# log; and all of it in OUT/gpu_sweep.tar.gz.
# Run from the repository root with the project importable:
#   PYTHONPATH=$PWD:$PWD/protos bash benchmarks/gpu_sweep.sh "$OUT"
# With onnxruntime-gpu carried as ORT_GPU.md says, put it first: PYTHONPATH=/tmp/ortsite:$PWD:$PWD/protos.
# Knobs (environment):
#   DRAFT_PROVIDER   auto (default: CUDA when the installed onnxruntime has it), cuda, or cpu (ORT's CPU provider,
#                    when the ORT GPU wheel cannot be set up)
#   SHAPES           "8b 1b" (default)                POLICIES  "ar,grid,cast" (default: the grid)
#   CONCURRENCY      1,8,32                           ROUNDS    1
#   REQUESTS         1,8,32 (per concurrency)         TOKENS    48 new tokens a request
#   CONFIRM          3: the screen's best 3 shapes per concurrency, its best 3 single shapes and cast are measured
#                    again (CONFIRM_ROUNDS 2 rounds of CONFIRM_REQUESTS 4,16,32 requests) and judged on that
#                    (benchmarks/sweep.py); 0: judged on the screen
#   CELL_SECONDS     2: no request of a cell starts after this
#   CUTOFF           3: a cell's requests still streaming then are cancelled (their tokens count, checked
#                    against ar's prefix); with 41 policies x 3 concurrencies this bounds a target's sweep
#   WIDE_DIR         /tmp/wide-SHAPE: where the widened target is written (an existing one is reused)
#   PORT             50151: the first stack's orchestrator port
#   WARMUP_TOKENS    16: before each cell, one untimed wave this long, as on the CPU (rounds 8-9): graph captures
#                    stay out of the cell and its gate has judged the batch size. With 2, `cast` (one drafted step
#                    in the wave) met its trees' shapes first inside the cell (reports/cast-vs-fixed/ GPU round 7)
#   SETS             "humaneval heldout" (default): humaneval (the tuning set) and/or heldout
#                    (benchmarks/prompts/heldout.jsonl, kept out of tuning), each swept on the same stack
#   DEADLINE         420: seconds after the start past which no further sweep starts (the call's budget is 8 min)
#   CHECK_PROMPTS    1: HumanEval prompts on which widen_target checks the widened logits
set -euo pipefail
OUT=${1:?usage: PYTHONPATH=\$PWD:\$PWD/protos bash benchmarks/gpu_sweep.sh OUT_DIR}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_sweep.log") 2>&1
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}
export CAST_DRAFT_PROVIDER=${DRAFT_PROVIDER:-auto}
SHAPES=${SHAPES:-8b 1b}
SETS=${SETS:-humaneval heldout}
DEADLINE=${DEADLINE:-420}
REF_TARGET=models/reference/target
DRAFT=models/reference/draft
CAST="python3 -m orchestrator.cli"
STACK=
cleanup() {
    if [[ -n "$STACK" ]]; then kill "$STACK" 2>/dev/null || true; wait "$STACK" 2>/dev/null || true; fi
    tar -czf "$OUT/gpu_sweep.tar.gz" -C "$OUT" --exclude gpu_sweep.tar.gz . 2>/dev/null || true
    echo "== done $(date -u +%T), $SECONDS s; results in $OUT (and $OUT/gpu_sweep.tar.gz)"
}
trap cleanup EXIT
stage() { echo; echo "== $1 ($(date -u +%T), ${SECONDS} s)"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, onnxruntime, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'grpc', grpc.__version__)"
echo "draft provider: $CAST_DRAFT_PROVIDER; git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
date -u

failed=0
port=${PORT:-50151}  # the first target's orchestrator; draft and verify on the next two, the next target +10
for shape in $SHAPES; do
    wide=${WIDE_DIR:-/tmp/wide-$shape}
    dir="$OUT/$shape"
    mkdir -p "$dir"
    if [[ ! -f $wide/config.json ]]; then
        stage "widen the reference target to the $shape shape"
        python3 -m benchmarks.widen_target --source $REF_TARGET --shape "$shape" --out "$wide" --dtype bfloat16 \
            --device cuda --check-prompts "${CHECK_PROMPTS:-1}" --report "$dir/widen.json"
    fi
    stage "stack on the $shape-shaped target (services profile their cost tables at start-up)"
    $CAST up --draft-levels '' --target "$wide" --draft $DRAFT --port $port --draft-port $((port + 1)) --verify-port $((port + 2)) \
        --http-port -1 > "$dir/stack.log" 2>&1 &
    STACK=$!
    for _ in $(seq 1 400); do
        grep -q '^ready' "$dir/stack.log" && break
        kill -0 $STACK 2>/dev/null || break
        sleep 1
    done
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader || true
    grep -h "GPU memory\|captured" "$dir"/stack.log "$dir"/*.log 2>/dev/null | sort -u || true
    if ! grep -q '^ready' "$dir/stack.log"; then
        echo "the $shape stack did not come up:"; tail -n 30 "$dir/stack.log"
        failed=1; kill $STACK 2>/dev/null || true; wait $STACK 2>/dev/null || true; STACK=; continue
    fi
    grep -E "serves|service on" "$dir/stack.log" || true
    mkdir -p "$dir/cost-tables"
    cp "$CAST_CACHE_DIR"/cost-tables/*.json "$dir/cost-tables/" 2>/dev/null || true  # as profiled at start-up
    for set in $SETS; do
        case $set in
            humaneval) prompts=humaneval ;;
            heldout) prompts=benchmarks/prompts/heldout.jsonl ;;
            *) prompts=$set; set=$(basename "$set" .jsonl) ;;
        esac
        if (( SECONDS > DEADLINE )); then
            echo "skipped: the $shape sweep on $set would start at ${SECONDS} s, past DEADLINE=${DEADLINE} s"
            failed=1; continue
        fi
        stage "cast sweep, $shape-shaped target, $set prompts"
        mkdir -p "$dir/$set"
        # A failed sweep (say, one target out of memory) must not lose the other sweeps' results.
        if ! $CAST sweep --addr 127.0.0.1:$port --policies "${POLICIES:-ar,grid,cast}" \
                --concurrency "${CONCURRENCY:-1,8,32}" --requests "${REQUESTS:-1,8,32}" --rounds "${ROUNDS:-1}" \
                --max-new-tokens "${TOKENS:-48}" --seconds "${CELL_SECONDS:-2}" \
                --cutoff "${CUTOFF:-3}" --warmup-tokens "${WARMUP_TOKENS:-16}" --prompts "$prompts" \
                --confirm "${CONFIRM:-3}" --confirm-rounds "${CONFIRM_ROUNDS:-2}" \
                --confirm-requests "${CONFIRM_REQUESTS:-4,16,32}" --rstrip-prompts --out "$dir/$set" \
                --title "cast sweep: $shape-shaped target, $set prompts, on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), draft $CAST_DRAFT_PROVIDER" \
                > "$dir/$set/sweep_stdout.md" 2> "$dir/$set/sweep.log"; then
            echo "the $shape sweep on $set failed:"; tail -n 30 "$dir/$set/sweep.log"; failed=1
        fi
        tail -n 3 "$dir/$set/sweep.log" || true
        sed -n '1,12p' "$dir/$set/sweep.md" 2>/dev/null || true
    done
    kill $STACK 2>/dev/null || true; wait $STACK 2>/dev/null || true; STACK=
    port=$((port + 10))
done
exit $failed
