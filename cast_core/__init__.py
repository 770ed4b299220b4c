"""Shared by every service: token trees, cost tables, the CAST selection rule, domain errors, gRPC options. Pure: no I/O."""
