#!/usr/bin/env bash
# CPU round 11: bursts on two stacks (BASE_TREE: an export of the commit before; this tree), burst_ab.py between them.
#   BASE_TREE=/tmp/base bash reports/cast-vs-fixed/cpu11/run.sh OUT [burst_ab.py flags]
set -u
OUT=${1:?usage: BASE_TREE=DIR bash run.sh OUT}; shift
source "$(dirname "$0")/two_stacks.sh"
cd "$NEW_TREE" && PYTHONPATH=$NEW_TREE:$NEW_TREE/protos $PY reports/cast-vs-fixed/cpu11/burst_ab.py 127.0.0.1:53051 127.0.0.1:54051 "$@"
