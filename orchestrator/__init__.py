"""Orchestrator: the public Generate API, the decoding loop, policies, routing, CLI."""
