"""Shared by every service: token trees, cost tables, the CAST selection rule, domain errors. Pure: no I/O."""
