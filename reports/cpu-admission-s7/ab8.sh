#!/bin/bash
# CPU A/B: a4a0b4b (/tmp/base2, a git archive of it) vs 0ac5410 (the working tree then), cast and eagle2 at c=8, rounds base new new base base new
PY=/work/main/.venv/bin/python
OUT=/tmp/ab8/out; rm -rf $OUT; mkdir -p $OUT
(cd /tmp/base2 && PYTHONPATH=/tmp/base2:/tmp/base2/protos $PY -m orchestrator.cli up --port 53051 --draft-port 53052 --verify-port 53053 > $OUT/stack_base.log 2>&1 &)
(cd /work/main && $PY -m orchestrator.cli up --port 54051 --draft-port 54052 --verify-port 54053 > $OUT/stack_new.log 2>&1 &)
for _ in $(seq 1 300); do grep -q '^ready' $OUT/stack_base.log && grep -q '^ready' $OUT/stack_new.log && break; sleep 1; done
cd /work/main
r=0
for who in base new new base base new; do
  r=$((r+1)); port=53051; [ $who = new ] && port=54051
  for c in 8; do
    $PY -m orchestrator.cli bench --addr 127.0.0.1:$port --policies cast,eagle2 --concurrency $c --requests 16 --seconds 60 \
      --max-new-tokens 64 --rstrip-prompts --warmup 1 --out $OUT/r${r}_${who}_c$c > $OUT/r${r}_${who}_c$c.log 2>&1
    echo "round $r $who c=$c"; grep -E "c=|step p50" $OUT/r${r}_${who}_c$c.log
  done
done
pkill -f "orchestrator.cli up --port 5[34]051"
