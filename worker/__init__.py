"""A kvmesh worker: one engine for one model behind a gRPC server."""
