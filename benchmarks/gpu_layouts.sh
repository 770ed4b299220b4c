#!/usr/bin/env bash
# Draft and verifier on one shared GPU or on two (reports/layouts/), in one call on a two-GPU machine:
#   shared: draft (ONNX Runtime CUDA) and verifier on GPU 0;
#   split:  draft on GPU 0, verifier on GPU 1 (CUDA_VISIBLE_DEVICES per process);
# the orchestrator on the CPU, all over gRPC on loopback. Each layout profiles its services' cost tables at start-up
# on its own GPU (a cache directory per layout), then `cast bench` runs every policy at each concurrency while
# nvidia-smi samples each GPU's busy fraction (utilization.gpu: the share of time a kernel was running).
# Run from the repository root with the project importable:
#   PYTHONPATH=$PWD:$PWD/protos bash benchmarks/gpu_layouts.sh OUT_DIR
set -u
OUT=${1:-gpu-layouts}
mkdir -p "$OUT"
TARGET=${TARGET:-models/reference/target}
DRAFT=${DRAFT:-models/reference/draft}
LAYOUTS=${LAYOUTS:-shared split}
POLICIES=${POLICIES:-cast eagle2 chain ar}
LEVELS=${LEVELS:-1 8 32}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}

nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
date -u

wait_serving() {  # address...
    python3 - "$@" <<'EOF'
import sys, time
from orchestrator.stack import is_serving
deadline = time.time() + 600
for address in sys.argv[1:]:
    while not is_serving(address):
        if time.time() > deadline:
            sys.exit(f"{address} not serving after 600 s")
        time.sleep(0.5)
EOF
}

port=52051
for layout in $LAYOUTS; do
    if [ "$layout" = shared ]; then draft_gpu=0; verify_gpu=0; else draft_gpu=0; verify_gpu=1; fi
    dir="$OUT/$layout"; mkdir -p "$dir"
    export CAST_CACHE_DIR=/tmp/cast-cache-$layout  # a table per layout, profiled on the GPU it runs on
    mkdir -p "$CAST_CACHE_DIR" && cp -rn /tmp/cast-cache-*/onnx "$CAST_CACHE_DIR"/ 2>/dev/null  # the export is the same
    echo; echo "== layout $layout: draft on GPU $draft_gpu, verifier on GPU $verify_gpu ($(date -u +%T))"
    CUDA_VISIBLE_DEVICES=$draft_gpu python3 -m draft_service.server --model $DRAFT --port $((port + 1)) --provider cuda \
        > "$dir/draft.log" 2>&1 &
    DRAFT_PID=$!
    CUDA_VISIBLE_DEVICES=$verify_gpu python3 -m verify_service.server --model $TARGET --port $((port + 2)) \
        > "$dir/verify.log" 2>&1 &
    VERIFY_PID=$!
    wait_serving 127.0.0.1:$((port + 1)) 127.0.0.1:$((port + 2)) || { tail "$dir"/*.log; kill $DRAFT_PID $VERIFY_PID; continue; }
    CUDA_VISIBLE_DEVICES= python3 -m orchestrator.server --tokenizer $TARGET --port $port \
        --draft 127.0.0.1:$((port + 1)) --verify 127.0.0.1:$((port + 2)) > "$dir/orchestrator.log" 2>&1 &
    ORCH_PID=$!
    wait_serving 127.0.0.1:$port
    tail -n 2 "$dir/draft.log" "$dir/verify.log"
    cp "$CAST_CACHE_DIR"/cost-tables/*.json "$dir/" 2>/dev/null
    for policy in $POLICIES; do
        for c in $LEVELS; do
            requests=$(( c < 8 ? 8 : 2 * c )); [ $requests -gt 32 ] && requests=32
            nvidia-smi --query-gpu=timestamp,index,utilization.gpu --format=csv,noheader,nounits -lms 100 \
                > "$dir/util-$policy-$c.csv" &
            SAMPLER=$!
            python3 -m orchestrator.cli bench --addr 127.0.0.1:$port --policies $policy --concurrency $c \
                --requests $requests --seconds ${SECONDS_PER_LEVEL:-30} --max-new-tokens $MAX_NEW_TOKENS --rstrip-prompts \
                --out "$dir/bench-$policy-$c" --title "$layout: $policy c=$c" 2>&1 | grep -v '^\[transformers\]'
            kill $SAMPLER; wait $SAMPLER 2>/dev/null
        done
    done
    kill $ORCH_PID $DRAFT_PID $VERIFY_PID; wait $ORCH_PID $DRAFT_PID $VERIFY_PID 2>/dev/null
    port=$((port + 10))
done

# One table: layout, policy, concurrency, tokens/s, TPOT p50, each GPU's mean busy fraction during the level.
python3 - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for bench in sorted(out.glob("*/bench-*/bench.csv")):
    layout, (policy, c) = bench.parent.parent.name, bench.parent.name.removeprefix("bench-").rsplit("-", 1)
    row = next(csv.DictReader(bench.open()))
    busy = {}
    for line in (bench.parent.parent / f"util-{policy}-{c}.csv").read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[2].isdigit():
            busy.setdefault(parts[1], []).append(int(parts[2]))
    rows.append({"layout": layout, "policy": policy, "concurrency": int(c),
                 "tokens_per_s": round(float(row["tokens_per_s"]), 1), "tpot_p50_ms": round(float(row["tpot_p50_ms"]), 2),
                 "tokens_per_step": round(float(row["mean_accepted_length"]), 2),
                 **{f"gpu{i}_busy": round(sum(v) / len(v) / 100, 3) for i, v in sorted(busy.items())},
                 "step_ms_p50": round(float(row["step_ms_p50"]), 2), "draft_model_ms_p50": round(float(row["draft_model_ms_p50"]), 2),
                 "verify_model_ms_p50": round(float(row["verify_model_ms_p50"]), 2), "overhead_ms_p50": round(float(row["overhead_ms_p50"]), 2)})
rows.sort(key=lambda r: (r["policy"], r["concurrency"], r["layout"]))
with (out / "layouts.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
for r in rows:
    print(r)
EOF
date -u
