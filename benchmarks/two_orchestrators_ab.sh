#!/usr/bin/env bash
# Two orchestrators sharing one draft and one verify replica (issue 19), A/B of service settings. Per setting one
# stack (`cast up`, reference pair, 1 + 1 replicas; ports P0 + 20 i) and a second orchestrator on its replicas, all
# started first; then per round, each setting in turn (order reversed in even rounds): one orchestrator at c=8, then
# both at c=4 each together. Prints, and writes to OUT/ab.csv, the two orchestrators' summed tokens/s over the
# one's, per setting and round. Adapted from window_ab.sh (git show c1b3679).
#   SETTINGS="- CAST_ORCH_PIPELINE=on" bash benchmarks/two_orchestrators_ab.sh OUT
# A setting is a comma-separated list of environment assignments for the services (e.g. A=1,B=2); - for none.
# (ROUNDS=2 REQUESTS=24 TOKENS=96 POLICY=cast P0=52461 PY=.venv/bin/python; UP_ARGS: more `cast up` flags)
set -u
OUT=${1:?usage: bash benchmarks/two_orchestrators_ab.sh OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
REQUESTS=${REQUESTS:-24}; TOKENS=${TOKENS:-96}; POLICY=${POLICY:-cast}; ROUNDS=${ROUNDS:-2}; P0=${P0:-52461}
SETTINGS=${SETTINGS:--}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); cd "$ROOT"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait' EXIT

label() { if [[ $1 == - ]]; then echo default; else echo "$1" | tr ',=' '__'; fi; }

bench() {  # bench ADDR CONCURRENCY NAME
    $PY -m orchestrator.cli bench --addr "$1" --policies "$POLICY" --concurrency "$2" --requests "$REQUESTS" \
        --seconds 120 --max-new-tokens "$TOKENS" --rstrip-prompts --warmup 1 --out "$OUT/$3" > "$OUT/$3.log" 2>&1
}

wait_for() {  # wait_for FILE PATTERN PID: until the process's log says PATTERN; exit if it dies or takes 900 s
    for _ in $(seq 1 900); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || break
        sleep 1
    done
    echo "$1: no '$2'"; tail -5 "$1"; exit 1
}

i=0
for setting in $SETTINGS; do  # stacks in turn (each profiles or reads its cost tables alone), metrics off
    port=$((P0 + 20 * i)); name=$(label "$setting")
    env $([[ $setting == - ]] || echo "$setting" | tr ',' ' ') $PY -m orchestrator.cli up --port $port \
        --draft-port $((port + 1)) --verify-port $((port + 2)) --http-port -1 --metrics-port 0 ${UP_ARGS:-} \
        > "$OUT/stack_$name.log" 2>&1 &
    PIDS+=($!)
    wait_for "$OUT/stack_$name.log" '^ready' $!
    $PY -m orchestrator.server --tokenizer models/reference/target --port $((port + 10)) \
        --draft 127.0.0.1:$((port + 1)) --verify 127.0.0.1:$((port + 2)) > "$OUT/orchestrator2_$name.log" 2>&1 &
    PIDS+=($!)
    wait_for "$OUT/orchestrator2_$name.log" "orchestrator serving" $!
    i=$((i + 1))
done

for round in $(seq 1 "$ROUNDS"); do
    i=0; order=""
    for setting in $SETTINGS; do order="$order $i:$setting"; i=$((i + 1)); done
    [[ $((round % 2)) == 0 ]] && order=$(echo $order | tr ' ' '\n' | tac | tr '\n' ' ')
    for entry in $order; do
        port=$((P0 + 20 * ${entry%%:*})); name="r${round}_$(label "${entry#*:}")"
        bench 127.0.0.1:$port 8 "${name}_one_c8"
        bench 127.0.0.1:$port 4 "${name}_two_a_c4" & A=$!
        bench 127.0.0.1:$((port + 10)) 4 "${name}_two_b_c4"
        wait $A
        echo "$name: one $(grep -h "c=8 " "$OUT/${name}_one_c8.log" | awk '{print $3}') tok/s," \
             "two $(grep -h "c=4 " "$OUT/${name}"_two_*_c4.log | awk '{print $3}' | tr '\n' ' ')tok/s"
    done
done

$PY - "$OUT" "$ROUNDS" $SETTINGS <<'EOF'
import csv, sys
from pathlib import Path
out, rounds, settings = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
fields = ["tokens_per_s", "mean_accepted_length", "draft_ms_per_step", "draft_model_ms_p50", "verify_model_ms_p50",
          "step_ms_p50"]
rows, ratios = [], {}
for r in range(1, rounds + 1):
    for s in settings:
        name = f"r{r}_" + ("default" if s == "-" else s.replace(",", "_").replace("=", "_"))
        cells = {}
        for cell in ("one_c8", "two_a_c4", "two_b_c4"):
            path = out / f"{name}_{cell}" / "bench.csv"
            if not path.is_file():
                continue
            [row] = list(csv.DictReader(path.open()))
            cells[cell] = row
            rows.append({"setting": s, "round": r, "cell": cell, **{f: round(float(row[f]), 2) for f in fields}})
        if len(cells) == 3:
            two = float(cells["two_a_c4"]["tokens_per_s"]) + float(cells["two_b_c4"]["tokens_per_s"])
            ratios[s, r] = two / float(cells["one_c8"]["tokens_per_s"])
if rows:
    with (out / "ab.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
print("two orchestrators / one, per round:")
for s in settings:
    print(f"  {s}: " + "  ".join(f"r{r} {ratios[s, r]:.2f}" if (s, r) in ratios else f"r{r} -"
                                  for r in range(1, rounds + 1)))
EOF
