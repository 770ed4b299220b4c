"""Draft service: ONNX export of the draft model, ONNX Runtime sessions, tree expansion, gRPC server."""
