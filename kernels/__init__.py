"""Compute kernels of the engine.

Each file holds one operation: its pure-torch reference (used on CPU and as
the oracle in kernel tests) and, on CUDA, the Triton kernel that replaces it.
The model calls the functions exported here and never picks an implementation
itself.
"""
