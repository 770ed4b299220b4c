#!/usr/bin/env bash
# GPU A/B of ./alt (e.g. `git archive BRANCH -- . ":!models" ":!reports" ":!tests" | tar -x -C alt`) against this tree:
# issue 21's held-out c = 32 cell on the 1B shape (round 10's cell), each code on its own stack, in ORDER; ~6 min.
set -u
OUT=${1:?out}; mkdir -p "$OUT"; R=/tmp/r; rm -rf $R; mkdir -p $R
ROOT=$PWD
export CAST_CACHE_DIR=/tmp/cast-cache CAST_HUMANEVAL=$PWD/.dev/HumanEval.jsonl.gz
[[ -d /tmp/site/fastapi ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl
ln -sfn "$ROOT/models" alt/models
i=0
for name in ${ORDER:-main alt alt main main alt}; do
  i=$((i+1)); dir=$ROOT; [[ $name != main ]] && dir=$ROOT/$name
  echo "== $i $name $(date -u +%T) at $SECONDS s"
  (cd $dir && PYTHONPATH=/tmp/ortsite:/tmp/site:$dir:$dir/protos SHAPES=1b SETS=heldout CONCURRENCY=32 REQUESTS=32 \
    ROUNDS=2 DEADLINE=200 PORT=$((50101 + 10 * i)) POLICIES="${POLICIES:-cast,tree:4x5/32,tree:2x5/8,tree:4x5/16}" \
    timeout ${LIMIT:-150} bash benchmarks/gpu_sweep.sh $R/$i-$name > $R/$i-$name.stdout 2>&1)
  rm -f $R/$i-$name/gpu_sweep.tar.gz
  grep -h "captured" $R/$i-$name/1b/stack.log | sed 's/^/   /'
  sed -n '1,14p' $R/$i-$name/1b/heldout/sweep.md 2>/dev/null | grep -E "cast|oracle|4x5/16" | head -4
done
tar -czf $OUT/ab.tar.gz -C $R .
date -u
