"""The paged-KV continuous-batching engine (pure PyTorch, CPU and CUDA)."""
