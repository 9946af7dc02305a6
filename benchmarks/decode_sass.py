"""Static instruction counts, registers and occupancy of the attention kernels, compiled for Hopper without a GPU.

Triton compiles for any target it has a backend for: with the target given
(``sm_90``) and the integer arguments' divisibility by 16 stated, as the JIT
specialises them on a real launch, ``triton.compile`` runs its passes, ptxas
and nvdisasm on a machine with no GPU. The SASS then shows what a change does
to the instruction stream: the fp8 kernel's byte-wise shared-memory reads of V
(``LDS.U8``) and the 64-bit gather arithmetic were found this way, and the
instruction counts quoted in docs/PERFORMANCE.md come from this script.

Needs a Triton with its NVIDIA backend (ptxas, nvdisasm), e.g. the wheel that
CUDA builds of torch install; the CPU build of torch does not bring one.

Usage: python benchmarks/decode_sass.py [--kernel decode|prefill [--unpacked [--long]]|gate_up [--rows N]] [--cache bf16|fp8]
       [--batch 256] [--tuning 64/4/2[+h]] [--maxnreg N (prefill)] [--offsets-i64] [--no-v-words] [--sass out.sass]

Besides the instruction counts it prints the registers a thread holds, spill
instructions and the programs an H100 SM can hold at once (the occupancy ncu
reports as the limit).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from kernels.paged_decode_triton import (
    DecodeTuning,
    decode_tuning,
    _paged_decode_kernel,
    format_decode_tuning,
    parse_decode_tuning,
)
from kernels.gate_up_silu_triton import FUSED_HALF, _gate_up_silu_kernel, tuning_for_rows
from kernels.paged_prefill_triton import LONG_QUERY, PrefillTuning, _paged_prefill_kernel, default_prefill_tuning

POINTERS = {"q_ptr": "*bf16", "bt_ptr": "*i32", "ctx_ptr": "*i32", "rows_ptr": "*i32", "order_ptr": "*i32", "out_ptr": "*bf16",
            "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "lock_ptr": "*i32"}
FLOATS = ("scale_log2", "v_scale")
NOT_MULTIPLE_OF_16 = ("bt_sb", "n_q_heads", "n_kv_heads")
"""Integer arguments not assumed divisible by 16 (everything else, strides and pointers, is at
Llama-3-8B shapes, and the engine aligns its step metadata so that it stays so)."""


def compile_for_sm90(kernel, types: dict, constexprs: dict, aligned, warps: int, stages: int,
                     maxnreg: int | None = None):
    """``kernel`` compiled for sm_90 with no GPU: ``constexprs`` fixed, arguments typed by
    ``types`` (Triton signature strings: ``*bf16``, ``fp32``, ``tensordesc<...>``), every other
    argument an int32, the ``aligned`` ones stated divisible by 16 as the JIT specialises them
    on a launch. The one place the benchmarks' sm_90 compiles are built."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_sm90(kernel, constexprs: dict, pointers: dict, cache: str, warps: int, stages: int,
                 maxnreg: int | None = None):
    """An attention kernel compiled for sm_90: ``pointers`` typed (the KV cache's by
    ``cache``), every other argument an int32 divisible by 16 except ``NOT_MULTIPLE_OF_16``."""
    cache_type = "*fp8e4nv" if cache == "fp8" else "*bf16"
    types = {**pointers, "kc_ptr": cache_type, "vc_ptr": cache_type, **{n: "fp32" for n in FLOATS}}
    aligned = [n for n in inspect.signature(kernel.fn).parameters
               if n not in constexprs and n not in FLOATS and n not in NOT_MULTIPLE_OF_16]
    return compile_for_sm90(kernel, types, constexprs, aligned, warps, stages, maxnreg)


def compile_decode(cache: str, tuning: DecodeTuning, offsets_i32: bool, v_words: bool):
    """The decode kernel at Llama-3-8B's decode shape (32/8 heads, d 128, 16-token blocks, one
    split), constexprs as ``paged_decode_attention`` sets them."""
    fp8 = cache == "fp8"
    constexprs = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=tuning.block_n,
                      NUM_SPLITS=1, PRECISION="tf32", KV_FP8=fp8, USE_PDL=False, OFFSETS_I32=offsets_i32,
                      V_WORDS=fp8 and v_words, ORDERED=True, HEADS_INNER=tuning.heads_inner)
    return compile_sm90(_paged_decode_kernel, constexprs, POINTERS, cache, tuning.num_warps, tuning.num_stages)


def compile_prefill(cache: str, tuning: PrefillTuning, maxnreg: int | None = None):
    """The prefill kernel at Llama-3-8B's shape (32/8 heads, d 128, 16-token blocks), GQA packing
    as ``paged_prefill_attention`` decides it for that group of 4."""
    pack = tuning.pack_gqa and tuning.block_m >= 16 * 4
    constexprs = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_M=tuning.block_m,
                      BLOCK_N=tuning.block_n, PRECISION="tf32", KV_FP8=cache == "fp8", HEAVY_FIRST=tuning.heavy_first,
                      PACK_GQA=pack, GROUP_P=4)
    pointers = {"q_ptr": "*bf16", "bt_ptr": "*i32", "qs_ptr": "*i32", "ql_ptr": "*i32", "ctx_ptr": "*i32",
                "out_ptr": "*bf16"}
    return compile_sm90(_paged_prefill_kernel, constexprs, pointers, cache, tuning.num_warps, tuning.num_stages,
                        maxnreg)


def compile_gate_up(rows: int):
    """The fused gate/up + SiLU kernel at Llama-3-8B's MLP (hidden 4096, FFN 14336), bf16, with
    the tuning a batch of ``rows`` takes (``gate_up_silu_triton.tuning_for_rows``)."""
    t = tuning_for_rows(rows)
    block_n = 2 * FUSED_HALF
    descriptors = {"x_desc": f"tensordesc<bf16[{t.block_m}, {t.block_k}]>",
                   "w_desc": f"tensordesc<bf16[{block_n}, {t.block_k}]>",
                   "out_desc": f"tensordesc<bf16[{t.block_m}, {FUSED_HALF}]>"}
    constexprs = dict(BLOCK_M=t.block_m, BLOCK_N=block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m)
    # M is not specialised
    return t, compile_for_sm90(_gate_up_silu_kernel, descriptors, constexprs, ("N2", "K"), t.num_warps, t.num_stages)


def registers(cubin: bytes) -> int:
    """Registers a thread of the kernel holds (``cuobjdump --dump-resource-usage``)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


def programs_per_sm(regs: int, shared: int, warps: int) -> int:
    """Resident programs an H100 SM holds: 64k registers in four 16k quarters, one a
    scheduler, a warp's registers (8 at a time a thread) all in one quarter; 228 KB of
    shared memory (1 KB of it reserved a program); at most 64 warps. (ncu agrees: a
    one-warp program of 193 registers, 8 an SM.)"""
    by_regs = 4 * (16384 // (-(-regs // 8) * 8 * 32)) // warps
    by_shared = (228 << 10) // (shared + 1024)
    return min(by_regs, by_shared, 64 // warps)


def sass(cubin: bytes) -> str:
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def histogram(text: str) -> collections.Counter:
    """Instructions by opcode (modifiers dropped, predicates skipped)."""
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text, flags=re.M)
    return collections.Counter(ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=("decode", "prefill", "gate_up"), default="decode")
    parser.add_argument("--rows", type=int, default=256, help="gate_up: the batch size whose tuning is compiled")
    parser.add_argument("--long", action="store_true",
                        help="prefill, with --unpacked: the long-prompt tuning (else the short one)")
    parser.add_argument("--unpacked", action="store_true",
                        help="prefill: a model's tunings without GQA packing (else Llama-3-8B's packed one)")
    parser.add_argument("--cache", choices=("bf16", "fp8"), default="fp8")
    parser.add_argument("--tuning", default=None, metavar="BN/W/ST[+h]",
                        help="decode: e.g. 32/2/2+h (kernels.paged_decode_triton.parse_decode_tuning); "
                             "default: the cache's default tuning")
    parser.add_argument("--batch", type=int, default=256,
                        help="decode: the batch size whose default tuning is compiled (an fp8 cache's depends on it)")
    parser.add_argument("--offsets-i64", action="store_true", help="64-bit gather offsets (a cache over 2**31 elements)")
    parser.add_argument("--no-v-words", action="store_true", help="fp8: convert V after its shared-memory read")
    parser.add_argument("--maxnreg", type=int, default=None, help="prefill: cap the registers a thread may hold")
    parser.add_argument("--sass", default=None, help="also write the SASS here")
    args = parser.parse_args()
    if args.kernel == "gate_up":
        tuning, compiled = compile_gate_up(args.rows)
        report(compiled, f"gate/up + SiLU, {args.rows} rows, {tuning}", tuning.num_warps, args.sass)
        return
    if args.kernel == "prefill":
        prefill = default_prefill_tuning(torch.bfloat16, args.cache == "fp8", 128, LONG_QUERY if args.long else 1,
                                         group=1 if args.unpacked else 4)
        compiled = compile_prefill(args.cache, prefill, args.maxnreg)
        report(compiled, f"prefill, {args.cache} cache, {prefill}", prefill.num_warps, args.sass)
        return
    tuning = decode_tuning(args.batch, torch.float8_e4m3fn if args.cache == "fp8" else torch.bfloat16)
    if args.tuning:
        tuning = parse_decode_tuning(args.tuning, tuning)
    compiled = compile_decode(args.cache, tuning, not args.offsets_i64, not args.no_v_words)
    report(compiled, f"{args.cache} cache, tuning {format_decode_tuning(tuning)}, "
           f"{'64' if args.offsets_i64 else '32'}-bit offsets", tuning.num_warps, args.sass)


def report(compiled, label: str, warps: int, sass_path: str | None) -> None:
    text = sass(compiled.asm["cubin"])
    if sass_path:
        Path(sass_path).write_text(text)
    counts = histogram(text)
    shared_loads = collections.Counter(re.findall(r"\b(LDS(?:\.[A-Z0-9]+)*|LDSM(?:\.[A-Z0-9]+)*)\b", text))
    regs = registers(compiled.asm["cubin"])
    spills = len(re.findall(r"\b(?:LDL|STL)\b", text))
    print(f"{label}: {sum(counts.values())} instructions, {compiled.metadata.shared} bytes of shared memory, "
          f"{regs} registers, {spills} spill instructions: {programs_per_sm(regs, compiled.metadata.shared, warps)} "
          "programs an SM")
    print("  " + ", ".join(f"{op} {n}" for op, n in counts.most_common(12)))
    print("  shared-memory reads: " + ", ".join(f"{op} {n}" for op, n in sorted(shared_loads.items())))


if __name__ == "__main__":
    main()
