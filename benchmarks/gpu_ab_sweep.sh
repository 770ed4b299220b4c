#!/usr/bin/env bash
# A/B of a branch against this tree on the GPU machine, in one device call: issue 21's sweep on the 1B shape with
# this tree (`cast` and the fixed shapes that were oracles or the best single shape in round 2), then the branch's
# `cast` on a second stack with two of the same fixed shapes as anchors (they show how much the host drifted between
# the stacks). Both stacks share the cost-table cache, so both price steps from the same tables. ~8 minutes.
#   here:       rm -rf alt && mkdir alt && git archive BRANCH -- . ':!models' | tar -x -C alt
#   GPU (ORT as /work/shared/device/ORT_GPU.md says):  bash benchmarks/gpu_ab_sweep.sh "$OUT"
# alt/ is untracked and not ignored, so it travels with the working tree (models/ stays in the root: alt links to it).
# Results: OUT/r/{main,alt}/1b/{heldout,humaneval}/sweep.md and the whole of OUT/r in OUT/ab.tar.gz.
set -u
OUT=${1:?usage: bash benchmarks/gpu_ab_sweep.sh OUT_DIR}
export CAST_CACHE_DIR=${CAST_CACHE_DIR:-/tmp/cast-cache}
R=$OUT/r; mkdir -p "$R"
ROOT=$PWD
[[ -d alt/orchestrator ]] || { echo "no alt/: see the header"; exit 2; }
export PYTHONPATH=/tmp/ortsite:/tmp/site:$ROOT:$ROOT/protos
SHAPES=1b SETS="heldout humaneval" ROUNDS=2 DEADLINE=200 \
  POLICIES="cast,tree:4x5/32,tree:8x5/32,tree:2x5/8,tree:2x7/32,tree:4x5/16" \
  timeout 330 bash benchmarks/gpu_sweep.sh "$R/main" > "$R/main_stdout.txt" 2>&1
echo "this tree's sweep: rc $? at $SECONDS s"
rm -f "$R/main/gpu_sweep.tar.gz"
# `python -m` puts the working directory first on sys.path: run the branch from inside alt/.
cd "$ROOT/alt" && ln -sfn "$ROOT/models" models
export PYTHONPATH=/tmp/ortsite:/tmp/site:$ROOT/alt:$ROOT/alt/protos
SHAPES=1b SETS="heldout humaneval" ROUNDS=2 DEADLINE=150 PORT=50171 POLICIES="cast,tree:4x5/32,tree:2x5/8" \
  timeout $((575 - SECONDS)) bash benchmarks/gpu_sweep.sh "$R/alt" > "$R/alt_stdout.txt" 2>&1
echo "the branch's sweep: rc $? at $SECONDS s"
rm -f "$R/alt/gpu_sweep.tar.gz"
tar -czf "$OUT/ab.tar.gz" -C "$R" .
