"""What the services share at run time beside cast_core's pure domain: proto conversion, sessions, model identity,
cost-table files, the profiling loop and the cache directory. May do I/O; imports no service."""
