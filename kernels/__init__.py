"""Compute kernels of the engine.

Each operation has a file holding its pure-torch reference (used on CPU and as
the oracle in kernel tests) and the public function the model calls; on CUDA
tensors that function runs the Triton kernel in the ``*_triton.py`` file
beside it (one kernel and its launcher per file; ``backend.py`` decides).
The model never picks an implementation itself. Paged attention is the
exception: its GPU kernels need the batch described as tensors, so
``worker/models/attention.py`` calls ``paged_decode_triton`` and
``paged_prefill_triton`` directly when the model runner supplies that
description, and the torch reference otherwise.
"""
