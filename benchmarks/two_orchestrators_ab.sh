#!/usr/bin/env bash
# Two orchestrators sharing one draft and one verify replica (issue 19), A/B of service settings: per round, each
# setting in turn (order reversed in even rounds) on a fresh `cast up` (reference pair, 1 + 1 replicas), one
# orchestrator at c=8, then two at c=4 each together. Prints, and writes to OUT/ab.csv, the two orchestrators'
# summed tokens/s over the one's, per setting and round. Adapted from window_ab.sh (git show c1b3679).
#   SETTINGS="CAST_DRAFT_MERGE=1 CAST_DRAFT_MERGE=0" bash benchmarks/two_orchestrators_ab.sh OUT
# A setting is a comma-separated list of environment assignments for the services (e.g. A=1,B=2); - for none.
# (ROUNDS=2 REQUESTS=24 TOKENS=96 POLICY=cast P0=52461; UP_ARGS: more `cast up` flags, e.g. for a GPU)
set -u
OUT=${1:?usage: bash benchmarks/two_orchestrators_ab.sh OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
REQUESTS=${REQUESTS:-24}; TOKENS=${TOKENS:-96}; POLICY=${POLICY:-cast}; ROUNDS=${ROUNDS:-2}; P0=${P0:-52461}
SETTINGS=${SETTINGS:-CAST_DRAFT_MERGE=1 CAST_DRAFT_MERGE=0}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); cd "$ROOT"

bench() {  # bench ADDR CONCURRENCY NAME
    $PY -m orchestrator.cli bench --addr "$1" --policies "$POLICY" --concurrency "$2" --requests "$REQUESTS" \
        --seconds 120 --max-new-tokens "$TOKENS" --rstrip-prompts --warmup 1 --out "$OUT/$3" > "$OUT/$3.log" 2>&1
}

label() { if [[ $1 == - ]]; then echo default; else echo "$1" | tr ',=' '__'; fi; }

up() {  # up NAME SETTING: a stack on P0.. with the setting's environment (metrics off: fixed ports clash)
    env $([[ $2 == - ]] || echo "$2" | tr ',' ' ') $PY -m orchestrator.cli up --port $P0 --draft-port $((P0+1)) --verify-port $((P0+2)) \
        --http-port -1 --metrics-port 0 ${UP_ARGS:-} > "$OUT/stack_$1.log" 2>&1 &
    UP_PID=$!
    for _ in $(seq 1 600); do grep -q '^ready' "$OUT/stack_$1.log" && return 0; sleep 1; done
    echo "stack $1 not ready"; return 1
}

for round in $(seq 1 "$ROUNDS"); do
    order=$SETTINGS; [[ $((round % 2)) == 0 ]] && order=$(echo $SETTINGS | tr ' ' '\n' | tac | tr '\n' ' ')
    for setting in $order; do
        name="r${round}_$(label "$setting")"
        up "$name" "$setting" || exit 1
        bench 127.0.0.1:$P0 8 "${name}_one_c8"
        $PY -m orchestrator.server --tokenizer models/reference/target --port $((P0+10)) --draft 127.0.0.1:$((P0+1)) \
            --verify 127.0.0.1:$((P0+2)) > "$OUT/orchestrator2_$name.log" 2>&1 &
        SECOND=$!
        for _ in $(seq 1 300); do grep -q "orchestrator serving" "$OUT/orchestrator2_$name.log" && break; sleep 1; done
        bench 127.0.0.1:$P0 4 "${name}_two_a_c4" & A=$!
        bench 127.0.0.1:$((P0+10)) 4 "${name}_two_b_c4"
        wait $A
        kill -TERM "$SECOND"; wait "$SECOND" 2>/dev/null
        kill -TERM "$UP_PID"; wait "$UP_PID" 2>/dev/null; sleep 2
    done
done

$PY - "$OUT" "$ROUNDS" $SETTINGS <<'EOF'
import csv, sys
from pathlib import Path
out, rounds, settings = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
fields = ["tokens_per_s", "mean_accepted_length", "draft_ms_per_step", "draft_model_ms_p50", "verify_model_ms_p50", "step_ms_p50"]
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
            rows.append({"setting": s, "round": r, "cell": cell, **{f: row[f] for f in fields}})
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
