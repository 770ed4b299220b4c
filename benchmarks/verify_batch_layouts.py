"""Time one Verify forward in three batch layouts: looped (one forward per sequence) vs padded (one batched forward
over the slots, the service's) vs packed (all trees in one row, block-diagonal mask over the concatenated prefixes).

    python -m benchmarks.verify_batch_layouts [--model models/reference/target] [--context 256] [--repeats 15]

Packed is timed without, then with, the gather that builds its one-row prefix (the concatenation of every
sequence's KV, which a packed layout needs whenever the batch changes). Interleaved repeats, medians.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cast_core.tree import TokenTree
from verify_service.kv_cache import KVStore, SequenceKV
from verify_service.profile import profile_tree
from verify_service.static_forward import StaticForward, static_store
from verify_service.target import TargetModel


def ragged_tree(rng: np.random.Generator, n: int, vocab_size: int) -> TokenTree:
    tree = profile_tree(n)
    return TokenTree(rng.integers(0, vocab_size, n), tree.parents, tree.depths, tree.values)


def pack_prefixes(kvs: list[SequenceKV], capacity: int) -> SequenceKV:
    """A one-slot store holding the committed entries of kvs back to back: the gather a packed layout needs."""
    source = kvs[0].store.keys_all  # [L, S, H_kv, C, D]
    layers, _, kv_heads, _, head_dim = source.shape
    row = KVStore(layers, 1, kv_heads, capacity, head_dim, source.dtype, source.device).allocate()
    at = 0
    for kv in kvs:
        row.store.keys_all[:, 0, :, at : at + kv.length] = kv.store.keys_all[:, kv.slot, :, : kv.length]
        row.store.values_all[:, 0, :, at : at + kv.length] = kv.store.values_all[:, kv.slot, :, : kv.length]
        at += kv.length
    row.length = at
    return row


@torch.no_grad()
def packed_forward(target: TargetModel, row: SequenceKV, lengths: list[int], trees: list[TokenTree]) -> torch.Tensor:
    """row: one slot holding the B prefixes back to back (lengths[b] each). One forward over sum N_b nodes."""
    starts = np.cumsum([0, *lengths])  # prefix b is columns [starts[b], starts[b + 1])
    total_p, sizes = int(starts[-1]), [len(t) for t in trees]
    total_n = sum(sizes)
    visible = np.zeros((1, total_n, total_p + total_n), dtype=bool)  # [1, sum N, sum P + sum N]
    ids, positions, at = [], [], 0
    for b, tree in enumerate(trees):
        rows = slice(at, at + len(tree))
        visible[0, rows, starts[b] : starts[b + 1]] = True
        visible[0, rows, total_p + at : total_p + at + len(tree)] = tree.ancestor_mask()
        ids.append(tree.tokens)
        positions.append(lengths[b] + tree.depths)
        at += len(tree)
    mask = torch.zeros(visible.shape, dtype=target.dtype).masked_fill_(~torch.from_numpy(visible), torch.finfo(target.dtype).min)
    store = row.store
    store.begin_prefill([row], total_n)  # new entries at sum P: one row, as a prefill writes
    try:
        return target.forward(store, torch.from_numpy(np.concatenate(ids))[None],
                              torch.from_numpy(np.concatenate(positions))[None], mask[:, None])
    finally:
        store.end_forward()


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/reference/target")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--ragged", action="store_true", help="contexts in [c/4, c], tree sizes in [1, n]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # 1 keeps timings sane while other processes share the cores
    target = TargetModel.load(args.model, dtype=args.dtype, device="cpu")
    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}, {args.model} {args.dtype}, context {args.context}"
          f"{' ragged' if args.ragged else ''}; ms per Verify forward (median of {args.repeats})")
    print(f"{'n':>3} {'B':>3} {'looped':>8} {'padded':>8} {'packed':>8} {'+gather':>8} {'padded/B=1':>10}")
    for n in (1, 16):
        base = None
        for batch in (1, 2, 4, 8):
            lengths = [int(rng.integers(args.context // 4, args.context + 1)) if args.ragged else args.context
                       for _ in range(batch)]
            sizes = [int(rng.integers(1, n + 1)) if args.ragged else n for _ in range(batch)]
            store = static_store(target, batch, n)
            forward = StaticForward(target, store, n)
            kvs = [store.allocate() for _ in range(batch)]
            prompts = [rng.integers(0, target.vocab_size, p).tolist() for p in lengths]
            target.prefill(kvs, prompts)
            trees = [ragged_tree(rng, s, target.vocab_size) for s in sizes]
            row = pack_prefixes(kvs, sum(lengths) + sum(sizes))
            alone = []  # looped: each sequence in a one-slot store of its own, so no forward has dummy rows
            for prompt in prompts:
                own = StaticForward(target, static_store(target, 1, n), n)
                alone.append((own, own.store.allocate()))
                target.prefill([alone[-1][1]], [prompt])
            runs = {
                "looped": lambda: [own.tree_logits([kv], [t]) for (own, kv), t in zip(alone, trees)],
                "padded": lambda: forward.tree_logits(kvs, trees),
                "packed": lambda: packed_forward(target, row, lengths, trees),
                "packed+gather": lambda: packed_forward(target, pack_prefixes(kvs, row.store.context_capacity),
                                                        lengths, trees),
            }
            for fn in runs.values():
                fn()  # warm-up
            times = {name: [] for name in runs}
            for _ in range(args.repeats):  # interleaved: a noisy machine slows all three alike
                for name, fn in runs.items():
                    times[name].append(median_ms(fn, 1))
            ms = {name: float(np.median(t)) for name, t in times.items()}
            base = base or ms["padded"]
            print(f"{n:>3} {batch:>3} {ms['looped']:>8.2f} {ms['padded']:>8.2f} {ms['packed']:>8.2f} {ms['packed+gather']:>8.2f} "
                  f"{ms['padded'] / base:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
