#!/usr/bin/env bash
# Issue 19's two-orchestrator measurement on the GPU machine (one H100/H200, 16 cores), where the CPU contention of
# the 2-core development box is gone: two orchestrators at c=4 each sharing one draft replica (ONNX Runtime's CUDA
# provider) and one verify replica (torch on CUDA) against one orchestrator at c=8, reference pair, 24 HumanEval
# requests of 96 new tokens, policy cast, two rounds (benchmarks/two_orchestrators_ab.sh), each with the draft
# service's Expand merging on and off (CAST_DRAFT_MERGE, for measuring only: the CPU could not tell them apart).
# About 3 minutes.
#   PYTHONPATH=$PWD:$PWD/protos:<onnxruntime-gpu> bash benchmarks/gpu_replicas.sh OUT
# Everything lands in OUT: summary.txt (versions, per-cell lines, the ratios), ab.csv, each cell's bench.csv, logs.
set -u
OUT=${1:?usage: bash benchmarks/gpu_replicas.sh OUT}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/summary.txt") 2>&1
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}  # the draft's export and both cost tables, made once
export CAST_DRAFT_PROVIDER=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import torch, onnxruntime; print('torch', torch.__version__, torch.cuda.is_available(), 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
date -u
# --draft-levels=: the small draft alone (what `cast` drafts with); the verifier's dtype is cast up's default.
PY=python3 UP_ARGS="--draft-levels= ${UP_ARGS:-}" SETTINGS=${SETTINGS:-CAST_DRAFT_MERGE=1 CAST_DRAFT_MERGE=0} \
    ROUNDS=${ROUNDS:-2} bash benchmarks/two_orchestrators_ab.sh "$OUT"
grep -h "c=[48] " "$OUT"/r*_c[48].log
date -u
