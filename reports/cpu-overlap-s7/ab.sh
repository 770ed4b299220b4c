#!/bin/bash
# CPU A/B: d6cc85c (/tmp/base) vs the working tree (/work/main), cast at c=1 and c=8, rounds base new new base base new
PY=/work/main/.venv/bin/python
OUT=/tmp/ab7/out; rm -rf $OUT; mkdir -p $OUT
(cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/base/protos $PY -m orchestrator.cli up --port 53051 --draft-port 53052 --verify-port 53053 > $OUT/stack_base.log 2>&1 &)
(cd /work/main && $PY -m orchestrator.cli up --port 54051 --draft-port 54052 --verify-port 54053 > $OUT/stack_new.log 2>&1 &)
for _ in $(seq 1 300); do grep -q '^ready' $OUT/stack_base.log && grep -q '^ready' $OUT/stack_new.log && break; sleep 1; done
cd /work/main
r=0
for who in base new new base base new; do
  r=$((r+1)); port=53051; [ $who = new ] && port=54051
  for c in 1 8; do
    $PY -m orchestrator.cli bench --addr 127.0.0.1:$port --policies cast --concurrency $c --requests 16 --seconds 60 \
      --max-new-tokens 64 --rstrip-prompts --warmup 1 --out $OUT/r${r}_${who}_c$c > $OUT/r${r}_${who}_c$c.log 2>&1
    echo "round $r $who c=$c"; grep -E "c=|step p50" $OUT/r${r}_${who}_c$c.log
  done
done
pkill -f "orchestrator.cli up --port 5[34]051"
