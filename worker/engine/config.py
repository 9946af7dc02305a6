"""Engine settings: one frozen dataclass, every field documented and bounded."""

from __future__ import annotations

import math
from dataclasses import dataclass

LOAD_FORMATS = ("auto", "dummy")
"""How weights are loaded: "auto" reads the checkpoint's *.safetensors; "dummy"
builds the model from config.json alone with seeded random weights."""

FP8_KV_CACHE_DTYPES = ("fp8_e4m3", "fp8")
KV_CACHE_DTYPES = ("auto", *FP8_KV_CACHE_DTYPES)
"""What the KV cache stores: "auto" the model's dtype; "fp8_e4m3" (or its alias
"fp8", as vLLM and SGLang spell it) float8_e4m3fn with ``kv_cache_scale``."""


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """Path of a Hugging Face layout directory (config.json, *.safetensors, tokenizer)."""

    load_format: str = "auto"
    """One of LOAD_FORMATS: "auto" loads ``model``'s *.safetensors; "dummy" needs only
    its config.json and draws random weights from ``seed`` on the engine's device
    in its dtype (benchmarks of the serving path; vLLM's ``--load-format dummy``)."""

    served_name: str | None = None
    """Name the model is served under; default: the directory's name."""

    device: str = "auto"
    """"cpu", "cuda", "cuda:N" or "auto" (CUDA when available)."""

    dtype: str = "auto"
    """"float32", "bfloat16", "float16" or "auto" (float32 on CPU, bfloat16 on CUDA)."""

    block_size: int = 16
    """Tokens per KV-cache block; also the granularity of prefix-cache hashing."""

    kv_cache_memory_bytes: int | None = None
    """Memory budget of the KV pool; default 1 GiB on CPU (the GPU path sizes it
    from ``gpu_memory_utilization``). Ignored when ``num_kv_blocks`` is set."""

    kv_cache_dtype: str = "auto"
    """One of KV_CACHE_DTYPES. "fp8_e4m3" stores K and V as float8_e4m3fn: half the
    bytes of a 16-bit cache, so twice the blocks in the same memory and half the
    bytes decode attention reads; values are saturated to +-448 * kv_cache_scale
    and keep 3 mantissa bits (``kernels/kv_quant.py``)."""

    kv_cache_scale: float = 1.0
    """Scale of an fp8 cache, one for keys and values of every layer: the cache
    stores ``value / kv_cache_scale`` and reads ``stored * kv_cache_scale``.
    1.0 (vLLM's default without calibrated scales) fits K/V within +-448; only
    an fp8 cache takes another value."""

    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's total memory the engine may use: weights, the profiled
    activation peak and CUDA graphs first, the KV pool gets the rest."""

    async_scheduling: bool | None = None
    """Schedule and launch step N+1 before reading step N's tokens, so the host's work
    between steps overlaps the GPU's (``engine.py``). None: on with a CUDA model runner."""

    enforce_eager: bool = False
    """On CUDA, run decode steps eagerly instead of replaying CUDA graphs."""

    prefill_cuda_graphs: bool = True
    """On CUDA (graphs on), also replay captured graphs for a step that prefills one sequence
    alone (up to 512 tokens): a lone short prompt's first token then waits on the GPU, not
    on ~320 Python launches (128-token prompt of an 8B model on an H100: 18-38 ms -> 7.2 ms).
    Replays equal eager prefills bit for bit on SmolLM2 (``tests/test_engine_gpu.py::
    test_lone_prefills_replay_graphs_equal_to_eager``, H100). The graphs share the decode
    graphs' memory pool and need no more than a decode graph of the step's token limit."""

    dense_prefill: bool = True
    """On an sm_90+ datacenter GPU with 16-bit activations, a step of over 512 tokens sends
    its prompts that have no cached prefix to ``kernels/prefill_dense_triton.py``: they
    attend to the step's own rotated keys and values through TMA instead of reading them
    back from the paged cache (no gathers; over an fp8 cache no conversions, and the prompt
    sees its own keys and values unquantized, as vLLM's prefill does). Chunks after a
    cached prefix keep the paged kernel. H100, a 16,384-token step's 27 prompts, Llama-3-8B
    layer: 362 us against 468 (fp8 cache) and 447 (bf16 cache), session 19."""

    tune_matmuls: bool = True
    """On CUDA, time cuBLASLt's candidate algorithms for the matmuls of a full decode batch
    (each captured graph size over 16 rows) and of the largest step at start, and run the
    fastest where it beats ``F.linear`` by 2 % (``kernels/linear_tuning.py``). Costs 7-15 s
    of start-up for a Llama-3-8B-shaped model on an H100."""

    fused_gate_up: bool = True
    """On CUDA (sm_90+, 16-bit weights), keep the MLP's gate/up weight rows interleaved so that
    batches of 128 rows or more (``FUSED_MIN_ROWS``) run the gate/up matmul and the SiLU gate as one Triton kernel
    (``kernels/gate_up_silu_triton.py``) instead of cuBLAS then ``silu_and_mul``."""

    matmul_tuning_cache: bool = True
    """Keep the tuning's outcomes in ``$KVMESH_CACHE_DIR/matmul-tuning-v1.json`` (default
    ``~/.cache/kvmesh``), per GPU model and cuBLASLt/torch version, and restore them at the
    next start instead of timing (``kernels/tuning_cache.py``)."""

    num_kv_blocks: int | None = None
    """Exact number of KV blocks (tests use small pools to force preemption)."""

    max_num_seqs: int = 64
    """Most requests in one running batch."""

    max_num_batched_tokens: int = 2048
    """Per-step token budget; prompts longer than what is left are prefilled in chunks."""

    max_model_len: int | None = None
    """Context window; default and upper bound: the model's max_position_embeddings."""

    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes (chained block hashes)."""

    seed: int = 0
    """Seed of the generator used by requests that give no seed of their own, and
    of the random weights of load_format "dummy"."""

    @property
    def kv_cache_fp8(self) -> bool:
        """The cache stores float8_e4m3fn (one byte an element)."""
        return self.kv_cache_dtype in FP8_KV_CACHE_DTYPES

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if not (math.isfinite(self.kv_cache_scale) and self.kv_cache_scale > 0):
            raise ValueError(f"kv_cache_scale must be a finite number > 0, got {self.kv_cache_scale}")
        if self.kv_cache_scale != 1.0 and not self.kv_cache_fp8:
            raise ValueError(
                f"kv_cache_scale {self.kv_cache_scale} applies only to an fp8 cache; set kv_cache_dtype "
                "fp8_e4m3 or leave kv_cache_scale at 1.0"
            )
