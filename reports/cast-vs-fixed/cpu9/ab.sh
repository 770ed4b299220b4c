#!/usr/bin/env bash
# CPU round 9 A/B: main (B, /work/main) against a branch's worktree (N = NEW_TREE), one set of cost tables for both
# (profiled by N's start-up, then copied for B), `cast sweep` of ar and cast alternating B N N B B N N B.
#   OUT=DIR NEW_TREE=/work/wt/BRANCH SET=humaneval|/path/heldout.jsonl bash ab.sh
set -u
OUT=${OUT:?where the sweeps go}
NEW_TREE=${NEW_TREE:?a worktree of the branch}
PY=/work/main/.venv/bin/python
SET=${SET:-humaneval}
mkdir -p $OUT
rm -rf /tmp/ccN /tmp/ccB
(cd $NEW_TREE && CAST_CACHE_DIR=/tmp/ccN PYTHONPATH=$PWD:$PWD/protos exec $PY -m orchestrator.cli up --port 56051 --draft-port 56052 --verify-port 56053 --metrics-port 0 --http-port -1) > $OUT/stack_N.log 2>&1 &
N=$!
for i in $(seq 1 300); do grep -q "^ready" $OUT/stack_N.log && break; sleep 1; done
cp -r /tmp/ccN /tmp/ccB
(cd /work/main && CAST_CACHE_DIR=/tmp/ccB PYTHONPATH=$PWD:$PWD/protos exec $PY -m orchestrator.cli up --port 57051 --draft-port 57052 --verify-port 57053 --metrics-port 0 --http-port -1) > $OUT/stack_B.log 2>&1 &
B=$!
trap 'kill $N $B 2>/dev/null; wait' EXIT
for i in $(seq 1 300); do grep -q "^ready" $OUT/stack_B.log && break; sleep 1; done
grep -h "cost table" $OUT/stack_N.log $OUT/stack_B.log | head
r=0
for who in ${ORDER:-B N N B B N N B}; do
  r=$((r+1)); port=56051; [[ $who == B ]] && port=57051
  $PY -m orchestrator.cli sweep --addr 127.0.0.1:$port --policies ${POLICIES:-ar,cast} --concurrency ${CONC:-1,8,32} \
      --requests ${REQS:-8,16,32} --max-new-tokens 48 --rounds ${ROUNDS:-2} --warmup-tokens 16 --prompts $SET --rstrip-prompts --out $OUT/r${r}_$who > $OUT/r${r}_$who.log 2>&1
  echo "round $r $who"; sed -n 3,9p $OUT/r${r}_$who/sweep.md
done
date -u
