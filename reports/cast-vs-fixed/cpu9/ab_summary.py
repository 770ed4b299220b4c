"""Per stack (B = main, N = branch) and concurrency: cast's and ar's tokens/s in each sweep, their means, and cast's
step shape (means over sweeps)."""
import csv, glob, statistics as st, sys
rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/r*_*/sweep.csv")):
    who = f.split("/")[-2].split("_")[1]
    for r in csv.DictReader(open(f)):
        key = (r["policy"], who, int(r["concurrency"]))
        rows.setdefault(key, []).append(r)
for key in sorted(rows):
    v = rows[key]
    tps = [float(r["tokens_per_s"]) for r in v]
    m = lambda c: st.mean(float(r[c]) for r in v)
    print(f"{key[0]:5s} {key[1]} c={key[2]:2d} tok/s {' '.join(f'{x:6.1f}' for x in tps)}  mean {st.mean(tps):6.1f}"
          f"  tok/step {m('tokens_per_step'):.2f} expanded {m('expanded_nodes_per_step'):.0f} verified {m('verified_nodes_per_step'):.1f} step ms {m('step_ms_p50'):.1f} differ {sum(int(r['differ_from_ar']) for r in v)}")
for c in sorted({k[2] for k in rows}):
    try:
        b = st.mean(float(r["tokens_per_s"]) for r in rows[("cast", "B", c)]) / st.mean(float(r["tokens_per_s"]) for r in rows[("ar", "B", c)])
        n = st.mean(float(r["tokens_per_s"]) for r in rows[("cast", "N", c)]) / st.mean(float(r["tokens_per_s"]) for r in rows[("ar", "N", c)])
        print(f"c={c}: cast / ar  B {b:.3f}  N {n:.3f};  cast N / cast B {st.mean(float(r['tokens_per_s']) for r in rows[('cast','N',c)]) / st.mean(float(r['tokens_per_s']) for r in rows[('cast','B',c)]):.3f}")
    except KeyError:
        pass
