#!/usr/bin/env bash
# Telemetry on against off on one machine (CPU): two stacks of this tree, "off" (no tracing, no metrics) and "on"
# (spans by OTLP to benchmarks/otlp_sink.py with the default sampler, metrics on --metrics-port, scraped every 15 s
# as Prometheus would), benched in the order off, on, on, off, off, on, so that a drift of the machine hits both alike.
#   POLICIES=cast CONCURRENCY="1 8" bash benchmarks/telemetry_ab.sh OUT
set -u
OUT=${1:?usage: bash benchmarks/telemetry_ab.sh OUT}
TREE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$TREE/.venv/bin/python}
mkdir -p "$OUT"
cd "$TREE"
read -r OFF ON SINK METRICS <<<"$($PY -c 'from orchestrator.stack import free_ports; print(*free_ports(4))')"
$PY -m benchmarks.otlp_sink --port "$SINK" > "$OUT/sink.log" 2>&1 &
SINK_PID=$!
env -u OTEL_EXPORTER_OTLP_ENDPOINT -u OTEL_TRACES_EXPORTER $PY -m orchestrator.cli up --port "$OFF" \
    --draft-port $((OFF + 1)) --verify-port $((OFF + 2)) --http-port -1 --metrics-port 0 --trace none \
    > "$OUT/stack_off.log" 2>&1 &
OFF_PID=$!
OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK $PY -m orchestrator.cli up --port "$ON" \
    --draft-port $((ON + 1)) --verify-port $((ON + 2)) --http-port -1 --metrics-port "$METRICS" \
    > "$OUT/stack_on.log" 2>&1 &
ON_PID=$!
(while sleep 15; do for p in 0 1 2; do curl -s "http://127.0.0.1:$((METRICS + p))/metrics" > /dev/null; done; done) &
SCRAPE_PID=$!
trap 'kill $OFF_PID $ON_PID $SCRAPE_PID 2>/dev/null; sleep 3; kill $SINK_PID 2>/dev/null; wait' EXIT
for _ in $(seq 1 300); do grep -q '^ready' "$OUT/stack_off.log" && grep -q '^ready' "$OUT/stack_on.log" && break; sleep 1; done
round=0
for who in off on on off off on; do
    round=$((round + 1)); port=$OFF; [[ $who == on ]] && port=$ON
    for c in ${CONCURRENCY:-1 8}; do
        $PY -m orchestrator.cli bench --addr 127.0.0.1:$port --policies ${POLICIES:-cast} --concurrency $c \
            --requests ${REQUESTS:-16} --seconds ${SECONDS_PER_LEVEL:-60} --max-new-tokens ${TOKENS:-64} \
            --rstrip-prompts --warmup 1 --out "$OUT/r${round}_${who}_c$c" > "$OUT/r${round}_${who}_c$c.log" 2>&1
        echo "round $round $who c=$c"; grep -E "c=|step p50" "$OUT/r${round}_${who}_c$c.log"
    done
done
