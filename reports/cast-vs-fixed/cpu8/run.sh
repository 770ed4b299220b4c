#!/usr/bin/env bash
# CPU round 8 (and 11): steady state (an untimed 16-token wave before each cell), 9 fixed shapes + ar, both prompt sets on one stack.
set -u
cd "$(dirname "$0")/../../.."
OUT=${1:-/work/runs/sweep8}
PY=.venv/bin/python
$PY -m orchestrator.cli up --port 58051 --draft-port 58052 --verify-port 58053 --metrics-port 0 --http-port -1 > $OUT/stack.log 2>&1 &
S=$!
trap 'kill $S 2>/dev/null; wait' EXIT
for i in $(seq 1 300); do grep -q "^ready" $OUT/stack.log && break; sleep 1; done
for set in humaneval heldout; do
  prompts=humaneval; [[ $set == heldout ]] && prompts=benchmarks/prompts/heldout.jsonl
  $PY -m orchestrator.cli sweep --addr 127.0.0.1:58051 --prompts $prompts \
      --policies ar,cast,chain:3,chain:5,chain:7,tree:2x3/8,tree:2x5/8,tree:4x5/16,tree:4x5/32,tree:2x7/16 \
      --concurrency 1,8,32 --requests 8,16,32 --max-new-tokens 48 --rounds 2 --warmup-tokens 16 --rstrip-prompts \
      --title "cast sweep: 2-core CPU, reference pair, $set prompts, steady state" --out $OUT/$set > $OUT/$set.log 2>&1
  echo "$set done $(date -u +%T)"; sed -n 3,9p $OUT/$set/sweep.md
done
