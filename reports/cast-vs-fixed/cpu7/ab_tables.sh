#!/usr/bin/env bash
# A/B: the same code (main ea1ef38), stack A with the cost tables cast up cached before the start-up lock (profiled
# beside the other service's start-up, 2026-12-06 20:37), stack B with the tables it profiles now (one at a time).
set -u
cd /work/main
OUT=/work/runs/ab2
PY=.venv/bin/python
rm -rf /tmp/ccA /tmp/ccB
CAST_CACHE_DIR=/tmp/ccB $PY -m orchestrator.cli up --port 56051 --draft-port 56052 --verify-port 56053 --metrics-port 0 --http-port -1 > $OUT/stack_B.log 2>&1 &
B=$!
for i in $(seq 1 300); do grep -q "^ready" $OUT/stack_B.log && break; sleep 1; done
cp -r /tmp/ccB /tmp/ccA
cp /root/.cache/cast-serve/cost-tables/verify-target-d9e59d0e7e545b90.json /tmp/ccA/cost-tables/$(basename /tmp/ccB/cost-tables/verify-*.json)
cp /root/.cache/cast-serve/cost-tables/draft-draft-c1eedf5443661075.json /tmp/ccA/cost-tables/$(basename /tmp/ccB/cost-tables/draft-*.json)
CAST_CACHE_DIR=/tmp/ccA $PY -m orchestrator.cli up --port 57051 --draft-port 57052 --verify-port 57053 --metrics-port 0 --http-port -1 > $OUT/stack_A.log 2>&1 &
A=$!
trap 'kill $A $B 2>/dev/null; wait' EXIT
for i in $(seq 1 300); do grep -q "^ready" $OUT/stack_A.log && break; sleep 1; done
grep "cost table" $OUT/stack_A.log $OUT/stack_B.log
r=0
for who in A B B A A B B A; do
  r=$((r+1)); port=56051; [[ $who == A ]] && port=57051
  $PY -m orchestrator.cli sweep --addr 127.0.0.1:$port --policies ar,cast,chain:5,tree:2x5/8 --concurrency 1,8,32 \
      --requests 8,16,32 --max-new-tokens 48 --rounds 2 --rstrip-prompts --out $OUT/r${r}_$who > $OUT/r${r}_$who.log 2>&1
  echo "round $r $who"; sed -n 3,9p $OUT/r${r}_$who/sweep.md
done
date -u
