"""Verify service: the target model, a slotted KV cache, batched tree attention, lossless acceptance, gRPC server.

Read in this order: acceptance.py (the rule) and sampling.py (the target's token at each node: argmax, or a draw
from a (seed, position) stream), kv_cache.py and target.py (the model side), verifier.py (sessions, validation, one
step), then errors.py, servicer.py and server.py (gRPC), with config.py for the settings. profile.py measures the
cost table; bench_batch.py compares looped, padded and packed batch forwards (README.md has the numbers).
"""
