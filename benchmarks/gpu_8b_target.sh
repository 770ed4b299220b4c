#!/usr/bin/env bash
# Everything measured on the 8B-shaped target, in one call on the GPU machine: the widened target and its logits check,
# the verifier's and the draft's step in process, the RPC floor, `cast bench` at batch 1 and 8 (results in
# reports/gpu-8b-target/ and the step reports beside it), and transformers' generate() and assisted generation.
# Run from the repository root with the project importable:
#   PYTHONPATH=$PWD:$PWD/protos bash benchmarks/gpu_8b_target.sh OUT_DIR
# STAGES picks what runs (default: all, in this order):
#   widen rpc verify_ref verify_wide draft_step bench_ref bench_wide baselines
# and, on request, bench_awake: one stack, bench rounds alternating without and with SCHED_IDLE spinners on
# KEEP_AWAKE_CPUS (orchestrator/keep_awake.py), AWAKE_ROUNDS times; orch_profile: the orchestrator under
# cProfile (OUT/orchestrator.prof) through a `cast` level at batch 1;
# bench_ab: two stacks, BASE_TREE's code and this tree's, benched in turn with the CPUs idle and kept awake,
# AB_ROUNDS times (the order alternates, so neither always goes first); pyspy: py-spy samples of the
# orchestrator and both services (OUT/pyspy_*.txt, benchmarks/pyspy_summary.py reads them) through a `cast` level
# (PYSPY_PROMPTS: a JSONL file of prompts, where HumanEval's 164 run out before the recording ends).
# Each stage keeps going if an earlier one failed, so that whatever ran comes back.
set -u
OUT=${1:-gpu-8b-target}
mkdir -p "$OUT"
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}
STAGES=${STAGES:-widen rpc verify_ref verify_wide draft_step bench_ref bench_wide baselines}
FORWARDS=${FORWARDS:-service,transformers}  # the verifier forwards benchmarks.verify_step compares
SHAPE=${SHAPE:-8b}
WIDE=${WIDE:-/tmp/wide-$SHAPE}
REF_TARGET=models/reference/target
DRAFT=models/reference/draft
PROMPTS=${PROMPTS:-10}
CAST="python3 -m orchestrator.cli"
has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() { echo; echo "== $1 ($(date -u +%T))"; }
# start_wide_stack LOG [cast up flags]: the three services on the widened target, in the background (pid in
# STACK); returns once they are ready or the stack died.
start_wide_stack() {
    local log=$1; shift
    export CAST_DRAFT_PROVIDER=${CAST_DRAFT_PROVIDER:-auto}
    $CAST up --target "$WIDE" --draft $DRAFT "$@" > "$log" 2>&1 &
    STACK=$!
    for _ in $(seq 1 600); do grep -q '^ready' "$log" && break; kill -0 $STACK 2>/dev/null || break; sleep 1; done
    tail -n 3 "$log"
}
# bench_levels ADDR OUT TITLE: BENCH_POLICIES at BENCH_CONCURRENCY against ADDR, the summary lines printed.
bench_levels() {
    $CAST bench --addr "$1" --policies ${BENCH_POLICIES:-cast,eagle2,ar} --concurrency ${BENCH_CONCURRENCY:-1,8} \
        --requests ${BENCH_REQUESTS:-16} --seconds ${BENCH_SECONDS:-30} --max-new-tokens 128 --rstrip-prompts \
        --warmup ${BENCH_WARMUP:-1} --out "$2" --title "$3" 2>&1 | grep -E "c=|step p50"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, onnxruntime, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'grpc', grpc.__version__)"
date -u

if has widen; then
    stage "widen the reference target to the $SHAPE shape"
    python3 -m benchmarks.widen_target --source $REF_TARGET --shape "$SHAPE" --out "$WIDE" --dtype bfloat16 --device cuda \
        --check-prompts ${CHECK_PROMPTS:-100} --report "$OUT/widen_$SHAPE.json"
    df -h /tmp | tail -1
fi

if has rpc; then
    stage "loopback RPC latency (no models)"
    python3 -m benchmarks.rpc_latency --calls ${RPC_CALLS:-500} --out "$OUT/rpc_latency.csv"
    # The same calls as inside a step at batch 1: the handler works 7 ms (the verifier's forward), the client idles
    # 3 ms between calls (the draft's turn), so both processes sleep as they do in `cast bench`.
    python3 -m benchmarks.rpc_latency --calls ${RPC_STEP_CALLS:-150} --compute-ms ${RPC_COMPUTE_MS:-7} \
        --gap-ms ${RPC_GAP_MS:-3} --out "$OUT/rpc_latency_in_step.csv"
    if [[ -n "${RPC_KEEP_AWAKE:-}" ]]; then  # the same with the CPUs kept from halting
        python3 -m benchmarks.rpc_latency --calls ${RPC_STEP_CALLS:-150} --compute-ms ${RPC_COMPUTE_MS:-7} \
            --gap-ms ${RPC_GAP_MS:-3} --keep-awake "$RPC_KEEP_AWAKE" --out "$OUT/rpc_latency_in_step_awake.csv"
    fi
fi

if has verify_ref; then
    stage "verifier step, reference target (in-process)"
    python3 -m benchmarks.verify_step --model $REF_TARGET --batch 1,8 --tokens 1,8,16,32,64 --dtype bfloat16 \
        --context 256 --forwards $FORWARDS --out "$OUT/verify_step_ref.json"
fi

if has verify_wide; then
    stage "verifier step, $SHAPE-shaped target (in-process)"
    python3 -m benchmarks.verify_step --model "$WIDE" --batch 1,8 --tokens 1,8,16,32,64 --dtype bfloat16 \
        --context 256 --forwards $FORWARDS --out "$OUT/verify_step_$SHAPE.json" --torch-profile "$OUT/verify_torch_profile_$SHAPE.txt"
fi

if has draft_step; then
    stage "draft expansion step (in-process)"
    for provider in ${DRAFT_PROVIDERS:-cuda cpu}; do
        python3 -m benchmarks.draft_step --model $DRAFT --provider $provider --batch 1,8 --depth 6 --top-k 8 \
            --breadth 8 --context 256 --buffers ${DRAFT_BUFFERS:-fixed,growing} --out "$OUT/draft_step_$provider.json"
    done
fi

if has bench_ref; then
    stage "cast bench on the reference pair"
    $CAST up ${REF_UP_FLAGS:-} > "$OUT/stack_ref.log" 2>&1 &  # e.g. REF_UP_FLAGS="--verify-dtype float32"
    STACK=$!
    for _ in $(seq 1 300); do grep -q '^ready' "$OUT/stack_ref.log" && break; kill -0 $STACK 2>/dev/null || break; sleep 1; done
    tail -n 3 "$OUT/stack_ref.log"
    $CAST bench --policies ${REF_POLICIES:-cast,eagle2,chain,ar} --concurrency ${REF_CONCURRENCY:-1,8,32} \
        --requests ${REF_REQUESTS:-32} --seconds ${REF_SECONDS:-30} --max-new-tokens 128 --rstrip-prompts --warmup ${BENCH_WARMUP:-1} \
        --out "$OUT/bench_ref" --title "reference pair on one GPU, draft ${CAST_DRAFT_PROVIDER:-auto}"
    kill $STACK; wait $STACK 2>/dev/null
fi

if has bench_wide; then
    stage "cast bench on the $SHAPE-shaped target"
    # Tables profiled by the services at start-up (small grid): the 8B verifier's curve is what CAST prices.
    start_wide_stack "$OUT/stack_wide.log"
    $CAST generate --json --max-new-tokens 64 "def fibonacci(n):" > "$OUT/generate_cast_wide.json" 2>&1 && head -c 600 "$OUT/generate_cast_wide.json"; echo
    $CAST bench --policies ${BENCH_POLICIES:-cast,eagle2,chain,ar} --concurrency ${BENCH_CONCURRENCY:-1,8} \
        --requests ${BENCH_REQUESTS:-10} --seconds ${BENCH_SECONDS:-60} --max-new-tokens 128 --rstrip-prompts --warmup ${BENCH_WARMUP:-1} \
        --out "$OUT/bench_wide" --title "$SHAPE-shaped target (widened reference target), draft ${CAST_DRAFT_PROVIDER}"
    # VARIANTS: more orchestrators on the same draft and verify services, each with its own flags, e.g.
    #   VARIANTS="c2x2=--cast-c2_2 c3x2=--cast-c3_2"  (underscores become spaces); each is benched with
    #   VARIANT_POLICIES at VARIANT_CONCURRENCY, interleaved with the main orchestrator on the same policies.
    port=50061
    for variant in ${VARIANTS:-}; do
        name=${variant%%=*}; flags=${variant#*=}; flags=${flags//_/ }
        python3 -m orchestrator.server --tokenizer "$WIDE" --port $port $flags > "$OUT/orchestrator_$name.log" 2>&1 &
        ORCH=$!
        for _ in $(seq 1 60); do grep -q 'serving on' "$OUT/orchestrator_$name.log" && break; sleep 1; done
        for addr in 127.0.0.1:$port 127.0.0.1:50051 127.0.0.1:$port; do
            echo "-- variant $name ($flags) at $addr"
            $CAST bench --addr $addr --policies ${VARIANT_POLICIES:-ar,cast} --concurrency ${VARIANT_CONCURRENCY:-1} \
                --requests ${BENCH_REQUESTS:-10} --seconds ${BENCH_SECONDS:-60} --max-new-tokens 128 --rstrip-prompts --warmup ${BENCH_WARMUP:-1} \
                --out "/tmp/bench_variant_$name" --title "variant $name" 2>&1 | grep -E "c=|step p50"
        done
        kill $ORCH; wait $ORCH 2>/dev/null
        port=$((port + 10))
    done
    kill $STACK; wait $STACK 2>/dev/null
fi
if has bench_awake; then
    stage "cast bench on the $SHAPE-shaped target, CPUs idle and kept awake in turn"
    start_wide_stack "$OUT/stack_awake.log"
    for round in $(seq 1 ${AWAKE_ROUNDS:-2}); do
        for mode in idle awake; do
            SPIN=
            if [[ $mode == awake ]]; then
                python3 -m orchestrator.keep_awake --cpus ${KEEP_AWAKE_CPUS:-all} & SPIN=$!
                sleep 1
            fi
            echo "-- round $round, CPUs $mode"
            bench_levels 127.0.0.1:50051 "$OUT/bench_${mode}_r$round" "$SHAPE-shaped target, CPUs $mode"
            [[ -n "$SPIN" ]] && { kill $SPIN; wait $SPIN 2>/dev/null; }
        done
    done
    kill $STACK; wait $STACK 2>/dev/null
fi

if has bench_ab; then
    stage "cast bench on the $SHAPE-shaped target: $BASE_TREE and this tree in turn, CPUs idle and kept awake"
    # BASE_TREE: another checkout (git archive of an earlier commit) with models/ beside its code, as here.
    (cd "$BASE_TREE" && PYTHONPATH=$BASE_TREE:$BASE_TREE/protos:$PYTHONPATH start_wide_stack "$OUT/stack_base.log" \
        --port 50061 --draft-port 50062 --verify-port 50063; echo $STACK > "$OUT/stack_base.pid")
    start_wide_stack "$OUT/stack_new.log" --port 50071 --draft-port 50072 --verify-port 50073
    for round in $(seq 1 ${AB_ROUNDS:-2}); do
        order="base new"; (( round % 2 == 0 )) && order="new base"
        for mode in ${AB_MODES:-idle awake}; do
            SPIN=
            if [[ $mode == awake ]]; then
                python3 -m orchestrator.keep_awake --cpus ${KEEP_AWAKE_CPUS:-all} & SPIN=$!
                sleep 1
            fi
            for tree in $order; do
                port=50061; [[ $tree == new ]] && port=50071
                echo "-- round $round, $tree, CPUs $mode"
                bench_levels 127.0.0.1:$port "$OUT/bench_${tree}_${mode}_r$round" "$SHAPE-shaped target, $tree, CPUs $mode"
            done
            [[ -n "$SPIN" ]] && { kill $SPIN; wait $SPIN 2>/dev/null; }
            order=$(echo $order | awk '{print $2, $1}')
        done
    done
    kill $STACK $(cat "$OUT/stack_base.pid"); wait $STACK 2>/dev/null
fi

if has pyspy; then
    stage "py-spy on the three processes through cast at batch ${PYSPY_CONCURRENCY:-1 8}, CPUs kept awake"
    python3 -m orchestrator.keep_awake --cpus ${KEEP_AWAKE_CPUS:-all} & SPIN=$!
    start_wide_stack "$OUT/stack_pyspy.log" --port 50081 --draft-port 50082 --verify-port 50083
    for c in ${PYSPY_CONCURRENCY:-1 8}; do
        $CAST bench --addr 127.0.0.1:50081 --policies ${PROFILE_POLICY:-cast} --concurrency $c --requests 2000 \
            --prompts ${PYSPY_PROMPTS:-humaneval} \
            --seconds ${PYSPY_SECONDS:-30} --max-new-tokens 128 --rstrip-prompts --warmup 1 --out "$OUT/bench_pyspy_c$c" \
            --title "under py-spy" > "$OUT/bench_pyspy_c$c.log" 2>&1 &
        BENCH=$!
        sleep 8  # past the warm-up
        # Sampled without stopping the process (--nonblocking): the services keep their timing; a sample may mix
        # two moments, which does not matter for proportions.
        for name in orchestrator.server:50081 draft_service.server:50082 verify_service.server:50083; do
            pid=$(pgrep -f "${name%%:*} .*--port ${name##*:}" | head -1)
            ${PYSPY:-py-spy} record -p $pid -d ${PYSPY_RECORD_S:-15} -r 500 --nonblocking -f raw \
                -o "$OUT/pyspy_${name%%.*}_c$c.txt" > /dev/null 2>&1 &
        done
        wait $BENCH
        grep -E "c=|step p50" "$OUT/bench_pyspy_c$c.log"
    done
    kill $STACK $SPIN; wait $STACK $SPIN 2>/dev/null
fi

if has orch_profile; then
    stage "the orchestrator under cProfile through ${PROFILE_POLICY:-cast} at batch 1, CPUs kept awake"
    export CAST_DRAFT_PROVIDER=${CAST_DRAFT_PROVIDER:-auto}
    python3 -m orchestrator.keep_awake --cpus ${KEEP_AWAKE_CPUS:-all} & SPIN=$!
    python3 -m draft_service.server --model $DRAFT --host 127.0.0.1 --port 50072 > "$OUT/profile_draft.log" 2>&1 &
    D=$!
    python3 -m verify_service.server --model "$WIDE" --host 127.0.0.1 --port 50073 > "$OUT/profile_verify.log" 2>&1 &
    V=$!
    python3 -m cProfile -o "$OUT/orchestrator.prof" -m orchestrator.server --tokenizer "$WIDE" --host 127.0.0.1 \
        --port 50071 --draft 127.0.0.1:50072 --verify 127.0.0.1:50073 > "$OUT/profile_orchestrator.log" 2>&1 &
    O=$!
    python3 -c "
import sys, time
from orchestrator.stack import is_serving
for _ in range(600):
    if all(is_serving(f'127.0.0.1:{p}') for p in (50071, 50072, 50073)): sys.exit(0)
    time.sleep(1)
sys.exit('not ready')"
    $CAST bench --addr 127.0.0.1:50071 --policies ${PROFILE_POLICY:-cast} --concurrency 1 --requests ${BENCH_REQUESTS:-16} \
        --seconds ${BENCH_SECONDS:-30} --max-new-tokens 128 --rstrip-prompts --warmup ${BENCH_WARMUP:-1} \
        --out "$OUT/bench_profiled" --title "orchestrator under cProfile" 2>&1 | grep -E "c=|step p50"
    kill -TERM $O; wait $O
    kill $D $V $SPIN; wait $D $V $SPIN 2>/dev/null
fi

if has baselines; then
    stage "transformers generate() and assisted generation on the $SHAPE-shaped target"
    python3 -m benchmarks.hf_baselines --target "$WIDE" --draft $DRAFT --prompts $PROMPTS --max-new-tokens 128 \
        --batch 1,8 --dtype bfloat16 --device cuda --out "$OUT/hf_baselines.json" --md "$OUT/hf_baselines.md"
fi

date -u
