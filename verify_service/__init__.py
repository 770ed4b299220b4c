"""Verify service: the target model, per-sequence KV caches, tree attention, lossless acceptance, gRPC server."""
