"""Developer tooling: proto generation (`make protos`)."""
