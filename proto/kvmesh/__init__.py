"""Generated gRPC stubs of kvmesh's wire contracts (package kvmesh.v1)."""
