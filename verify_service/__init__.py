"""Verify service: the target model, a slotted KV store, batched tree attention, lossless acceptance, gRPC server.

Read in this order: acceptance.py (the rule) and sampling.py (the target's token at each node: argmax, or a draw
from a (seed, position) stream), kv_cache.py, target.py, fused_llama.py and static_forward.py (the model side),
verifier.py (sessions, validation, one step), then errors.py, servicer.py and server.py (gRPC), with config.py for
the settings and profile.py for the cost table.
"""
