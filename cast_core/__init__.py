"""Shared by every service: token trees, cost tables, the CAST selection rule, domain errors, the one-call-at-a-time
domain worker. Pure but for the worker: no I/O."""
