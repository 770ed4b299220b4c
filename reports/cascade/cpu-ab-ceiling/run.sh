#!/usr/bin/env bash
# The probe-ceiling A/B (reports/cascade/README.md): two trees of this project, each benched on its own stack in the
# order base, new, new, base (cascade_report: ar, lookup, small, cascade; batch 1; edit and HumanEval; every level served: small, sparse, lookup).
#   BASE=/path/to/main NEW=/path/to/branch bash reports/cascade/cpu-ab-ceiling/run.sh OUT
set -u
OUT=${1:?usage: BASE=DIR NEW=DIR bash run.sh OUT}; BASE=${BASE:?}; NEW=${NEW:?}
PY=${PY:-$BASE/.venv/bin/python}
i=0
for who in base new new base; do
  i=$((i+1)); dir=$BASE; [[ $who == new ]] && dir=$NEW
  echo "== $i $who $(date -u +%T)"
  (cd $dir && PYTHONPATH=$dir:$dir/protos $PY -m benchmarks.cascade_report --out $OUT/$i-$who \
     --rounds 2 --requests 8 --max-new-tokens 64 --sets edit,humaneval --concurrency 1 \
     --policies ar,lookup,small,cascade 2>&1 | grep -E "^round")
  rm -rf $OUT/$i-$who/logs-*
done
