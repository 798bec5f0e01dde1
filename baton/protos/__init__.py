"""Generated protobuf and gRPC modules (see baton/protos/README)."""
