"""How a GPU engine's memory budget comes out, without transformers in the process.

Builds Llama-3-8B-shaped engines with random weights (``load_format="dummy"``: from a
config.json alone) one after another in one process and prints the runner's own memory
lines: what the device holds once warm, the step's and sampling's activation peaks, what
the trial capture measured for the CUDA graphs, the KV pool, and what the real capture then
took. ``gpu_bench.py`` builds its engines after a transformers model has run in the same
process, which leaves memory behind; this shows the budget of a worker process.

Usage: python benchmarks/gpu_engine_memory.py [--engines 2] [--layers 32] [--utilization 0.9]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
from pathlib import Path

import torch

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                 torch_dtype="bfloat16")
MEMORY_LINES = ("GPU memory:", "KV pool:", "CUDA graphs hold", "captured")


class _Lines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(MEMORY_LINES):
            print(f"  {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=2, help="engines built one after another")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--utilization", type=float, default=0.9)
    args = parser.parse_args()
    logging.getLogger("worker").setLevel(logging.INFO)
    logging.getLogger("worker").addHandler(_Lines())
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": args.layers}))
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for i in range(args.engines):
        print(f"engine {i}:", flush=True)
        engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", device="cuda", max_num_seqs=256,
                                        max_num_batched_tokens=8192, max_model_len=4096,
                                        gpu_memory_utilization=args.utilization))
        print(f"  {engine.runner.num_blocks} KV blocks", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
