#!/usr/bin/env bash
# CPU A/B of the cascade (issue 26): two trees of this project, each benched on its own stack in the order base, new,
# new, base (benchmarks/cascade_report.py: ar, lookup, small, cascade; batch 1; edit and HumanEval; 2 rounds a run),
# so that a drift of the machine hits both alike. Each tree runs from its own directory (`python -m` puts it first on
# sys.path). SPARSE=none serves no sparse level (and runs no target-only stack); by default every level is served.
#   BASE=/path/to/main NEW=/path/to/branch bash benchmarks/cascade_cpu_ab.sh OUT
set -u
OUT=${1:?usage: BASE=DIR NEW=DIR bash benchmarks/cascade_cpu_ab.sh OUT}; BASE=${BASE:?}; NEW=${NEW:?}
PY=${PY:-$BASE/.venv/bin/python}
i=0
for who in base new new base; do
  i=$((i+1)); dir=$BASE; [[ $who == new ]] && dir=$NEW
  echo "== $i $who $(date -u +%T)"
  (cd $dir && PYTHONPATH=$dir:$dir/protos $PY -m benchmarks.cascade_report --out $OUT/$i-$who --sparse ${SPARSE:-sparse} \
     --rounds 2 --requests 8 --max-new-tokens 64 --sets edit,humaneval --concurrency 1 \
     --policies ar,lookup,small,cascade 2>&1 | grep -E "^round")
  rm -rf $OUT/$i-$who/logs-*
done
