"""Engine against Hugging Face transformers ``generate``, same weights, same run.

Measures output tokens/s of the kvmesh engine (in-process, no gRPC) and of
transformers at batch 1 and at a batch of 16 chat prompts of different
lengths, each producing exactly ``--max-new-tokens`` tokens (EOS ignored on
both sides). Engine and transformers runs alternate, ``--repeats`` times, and
the medians and their ratio are printed as a table (and written as JSON with
``--json``). Wall time includes prefill on both sides.

Usage: python benchmarks/engine_vs_transformers.py [--model smollm2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a five year old.",
    "List three prime numbers and explain why they are prime.",
    "hi",
    "Translate 'good morning' into Spanish, French and German.",
    "What is 12 times 12?",
    "Describe the water cycle in a few sentences.",
    "Name a famous painter from the Netherlands.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a CPU do?",
    "Summarise the plot of Romeo and Juliet.",
    "How many legs does a spider have?",
    "Write a limerick about a cat who loves to code in Python every night.",
    "What is the boiling point of water at sea level?",
]


def build_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(list(ids if isinstance(ids, list) else ids["input_ids"]))
    return out


def run_engine(engine, prompts: list[list[int]], max_new: int, tag: str) -> float:
    from worker.engine.types import EngineRequest, SamplingOptions

    opts = SamplingOptions(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"{tag}-{i}", tuple(p), opts))
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    elapsed = time.perf_counter() - start
    assert produced == max_new * len(prompts), produced
    return produced / elapsed


def run_transformers(model, tokenizer, prompts: list[list[int]], max_new: int) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new,
            min_new_tokens=max_new, do_sample=False, pad_token_id=pad,
        )
    elapsed = time.perf_counter() - start
    produced = (out.shape[1] - width) * len(prompts)
    assert produced == max_new * len(prompts), produced
    return produced / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model name or HF directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.models.hub import resolve_model

    model_dir = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=args.device, dtype=args.dtype))

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = build_prompts(tokenizer, batch)
        run_engine(engine, prompts[:2], 4, "warm")  # warm-up, excluded
        run_transformers(hf, tokenizer, prompts[:2], 4)
        eng, ref = [], []
        for r in range(args.repeats):
            # a fresh namespace of ids each time; the prefix cache stays warm as in serving
            eng.append(run_engine(engine, prompts, args.max_new_tokens, f"b{batch}r{r}"))
            ref.append(run_transformers(hf, tokenizer, prompts, args.max_new_tokens))
        e, t = statistics.median(eng), statistics.median(ref)
        rows.append({"batch": batch, "engine_tok_s": e, "transformers_tok_s": t, "ratio": e / t,
                     "engine_runs": eng, "transformers_runs": ref,
                     "prompt_lens": [len(p) for p in prompts]})

    info = {
        "model": str(model_dir), "device": args.device, "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
    }
    import transformers

    info["transformers"] = transformers.__version__
    print(f"# {info}")
    print(f"{'batch':>5} | {'engine tok/s':>12} | {'transformers tok/s':>18} | {'ratio':>6}")
    for row in rows:
        print(f"{row['batch']:>5} | {row['engine_tok_s']:>12.1f} | {row['transformers_tok_s']:>18.1f} | {row['ratio']:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
