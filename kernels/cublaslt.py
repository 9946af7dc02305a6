"""cuBLASLt matmuls with a chosen algorithm: ``x @ weight.T`` through ``cublasLtMatmul``.

PyTorch's ``F.linear`` asks cuBLAS's heuristics for one algorithm per shape and
runs it. At a full decode batch (~256 rows of a Llama-3-8B layer) the product sits
at the H100's ridge point, where the heuristic's pick is not always the fastest
(docs/PERFORMANCE.md: at 128 rows cuBLASLt's down projection ran 45.1 against
cuBLAS's 53.1 µs). This module asks cuBLASLt for *all* its candidate algorithms of
a shape (``candidates``), so a caller can time them once and run the fastest
(``LtMatmul.run``), as TensorRT-LLM's GEMM profiler does. It binds the library
PyTorch already loaded (ctypes, no build step); CUDA only.

Layouts: cuBLASLt is column-major, and a row-major matrix is its transpose in
column-major terms. So the row-major ``y[M, N] = x[M, K] @ w[N, K].T`` is computed
as the column-major ``y.T (N x M) = w (N x K) @ x.T (K x M)``: ``D = op(A) @ B`` with
``A`` = ``w``'s memory read as a column-major ``K x N`` matrix and transposed, ``B`` =
``x``'s memory as ``K x M``, ``D`` = ``y``'s memory as ``N x M`` (leading dimension
``N``) -- the call PyTorch makes for ``F.linear``.

Algorithms are chosen for 256-byte-aligned operands (the heuristic's default
assumption); ``kernels/linear_tuning.py`` runs them on nothing else.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

# cuBLAS / CUDA enums (cublasLt.h, library_types.h)
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F = 68
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_PREF_MAX_WORKSPACE_BYTES = 1
_ALGO_CONFIG_ID, _ALGO_CONFIG_TILE_ID, _ALGO_CONFIG_SPLITK_NUM = 0, 1, 2
_ALGO_CONFIG_REDUCTION_SCHEME, _ALGO_CONFIG_CTA_SWIZZLING = 3, 4
_ALGO_CONFIG_STAGES_ID, _ALGO_CONFIG_CLUSTER_SHAPE_ID = 6, 8
_CAP_TILE_IDS, _CAP_STAGES_IDS = 6, 13
CLUSTER_SHAPES = tuple(range(0, 17))
"""cublasLtClusterShape_t values tried by ``search`` (0 = auto, then 1x1x1 ... 1x16x1)."""
_REDUCTION_COMPUTE_TYPE = 2  # split-K partial sums reduced in the compute type, in the workspace
_DTYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F}

WORKSPACE_BYTES = 32 << 20  # what PyTorch gives cuBLAS on Hopper


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    pass


_lock = threading.Lock()
_state: dict = {}


def _library() -> ctypes.CDLL:
    """The libcublasLt PyTorch itself loaded (found in this process's mappings after a
    cuBLAS call), so both use one copy of the library."""
    with _lock:
        if "lib" not in _state:
            torch.mm(torch.ones(8, 8, device="cuda"), torch.ones(8, 8, device="cuda"))  # loads cuBLAS(Lt)
            path = None
            with open("/proc/self/maps") as maps:
                for line in maps:
                    if "libcublasLt.so" in line:
                        path = line.split()[-1]
                        break
            lib = ctypes.CDLL(path or "libcublasLt.so")
            _declare(lib)
            handle = ctypes.c_void_p()
            _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
            _state["lib"], _state["handle"] = lib, handle
        return _state["lib"]


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types, so ctypes passes 64-bit sizes and pointers as the ABI wants."""
    p, i, u64, i64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    for name, args in {
        "cublasLtCreate": [p],
        "cublasLtMatmulDescCreate": [p, i, i],
        "cublasLtMatmulDescSetAttribute": [p, i, p, sz],
        "cublasLtMatrixLayoutCreate": [p, i, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [p],
        "cublasLtMatmulPreferenceDestroy": [p],
        "cublasLtMatmulPreferenceSetAttribute": [p, i, p, sz],
        "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, p, p],
        "cublasLtMatmulAlgoConfigGetAttribute": [p, i, p, sz, p],
        "cublasLtMatmulAlgoConfigSetAttribute": [p, i, p, sz],
        "cublasLtMatmulAlgoCheck": [p, p, p, p, p, p, p, p],
        "cublasLtMatmulAlgoGetIds": [p, i, i, i, i, i, i, i, p, p],
        "cublasLtMatmulAlgoInit": [p, i, i, i, i, i, i, i, p],
        "cublasLtMatmulAlgoCapGetAttribute": [p, i, p, sz, p],
        "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, sz, p],
        "cublasLtMatrixLayoutDestroy": [p],
        "cublasLtMatmulDescDestroy": [p],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.cublasLtGetVersion.argtypes, lib.cublasLtGetVersion.restype = [], ctypes.c_size_t


def library_version() -> int:
    """The loaded cuBLASLt's version (e.g. 130100): an algorithm's opaque bytes and its
    timings hold for this version only."""
    return int(_library().cublasLtGetVersion())


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"{what} failed with cublasStatus {status}")


@dataclass(frozen=True)
class Candidate:
    """One algorithm cuBLASLt offers for a shape; ``index`` is its heuristic rank
    (0 is what ``F.linear`` would run, give or take PyTorch's own preferences)."""

    index: int
    algo: bytes  # the opaque 64-byte cublasLtMatmulAlgo_t
    workspace: int
    config: tuple  # (algo id, tile id, split-k, reduction, swizzle, stages id, cluster id), for reports


class LtMatmul:
    """The descriptors of one ``[M, K] @ [N, K].T`` shape, built once; ``run`` launches
    on PyTorch's current stream (so it can be captured in a CUDA graph)."""

    def __init__(self, m: int, n: int, k: int, dtype: torch.dtype) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(str(d) for d in _DTYPES)}, got {dtype}")
        self.lib = _library()
        self.m, self.n, self.k, self.dtype = m, n, k, dtype
        lib, t = self.lib, _DTYPES[dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _CUDA_R_32F), "MatmulDescCreate")
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            value = ctypes.c_int32(op)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), 4), "DescSetAttribute")
        self.a, self.b, self.d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        for layout, rows, cols in ((self.a, k, n), (self.b, k, m), (self.d, n, m)):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), t, ctypes.c_uint64(rows),
                                                  ctypes.c_uint64(cols), ctypes.c_int64(rows)), "LayoutCreate")
        self.alpha, self.beta, self.one = ctypes.c_float(1.0), ctypes.c_float(0.0), ctypes.c_float(1.0)

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None or not hasattr(self, "d"):
            return
        for layout in (self.a, self.b, self.d):
            lib.cublasLtMatrixLayoutDestroy(layout)
        lib.cublasLtMatmulDescDestroy(self.desc)

    def candidates(self, count: int = 64) -> list[Candidate]:
        """Up to ``count`` algorithms by cuBLASLt's heuristic, best-predicted first."""
        lib = self.lib
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        try:
            ws = ctypes.c_uint64(WORKSPACE_BYTES)
            _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
                   "PreferenceSetAttribute")
            results = (_Heuristic * count)()
            found = ctypes.c_int(0)
            _check(lib.cublasLtMatmulAlgoGetHeuristic(_state["handle"], self.desc, self.a, self.b, self.d, self.d,
                                                      pref, count, results, ctypes.byref(found)), "AlgoGetHeuristic")
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        out = []
        for i in range(found.value):
            r = results[i]
            if r.state != 0:
                continue
            out.append(Candidate(i, bytes(r.algo), int(r.workspace_size), self._config(r.algo)))
        return out

    def variant(self, candidate: Candidate, splits: int = 1, swizzle: int | None = None) -> Candidate | None:
        """``candidate`` with its K dimension split ``splits`` ways (partial sums reduced in
        float32 in the workspace) and/or its CTA swizzling set, if cuBLASLt accepts that
        for this shape; else None. The heuristic rarely offers split-K, yet a product with
        few output tiles (a decode batch's narrow projections) may fill the GPU only when
        split; swizzling orders the output tiles for L2 reuse of the operands."""
        algo = _Algo.from_buffer_copy(candidate.algo)
        settings = [(_ALGO_CONFIG_SPLITK_NUM, splits),
                    (_ALGO_CONFIG_REDUCTION_SCHEME, _REDUCTION_COMPUTE_TYPE if splits > 1 else 0)]
        if swizzle is not None:
            settings.append((_ALGO_CONFIG_CTA_SWIZZLING, swizzle))
        for attr, value in settings:
            v = ctypes.c_uint32(value)
            if self.lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), 4) != 0:
                return None
        return self._check_algo(algo, candidate.index)

    def restore(self, algo: bytes, index: int = -1) -> Candidate | None:
        """The candidate whose opaque algorithm bytes are ``algo`` (``Candidate.algo``, e.g.
        kept from an earlier run), if cuBLASLt accepts it for this shape; else None."""
        if len(algo) != ctypes.sizeof(_Algo):
            return None
        return self._check_algo(_Algo.from_buffer_copy(algo), index)

    def _check_algo(self, algo: _Algo, index: int) -> Candidate | None:
        result = _Heuristic()
        status = self.lib.cublasLtMatmulAlgoCheck(_state["handle"], self.desc, self.a, self.b, self.d, self.d,
                                                  ctypes.byref(algo), ctypes.byref(result))
        if status != 0 or result.state != 0 or result.workspace_size > WORKSPACE_BYTES:
            return None
        return Candidate(index, bytes(algo), int(result.workspace_size), self._config(algo))

    def _cap_list(self, algo: _Algo, attr: int) -> list[int]:
        written = ctypes.c_size_t(0)
        if self.lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, 0, ctypes.byref(written)) != 0:
            return []
        count = written.value // 4
        values = (ctypes.c_uint32 * max(count, 1))()
        if self.lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, values, 4 * count,
                                                      ctypes.byref(written)) != 0:
            return []
        return list(values[:count])

    def search(self, ids: set[int] | None = None, limit: int = 256) -> list[Candidate]:
        """Beyond the heuristic: for each algorithm id cuBLASLt has for these types (or
        those of ``ids``), each tile and stage count it supports and each cluster shape of
        ``CLUSTER_SHAPES`` that ``cublasLtMatmulAlgoCheck`` accepts for this shape; at most
        ``limit`` of them, spread evenly over what was accepted. Thousands of checks, no
        launches; timing them all is an offline exploration, not start-up work."""
        lib, t, wanted = self.lib, _DTYPES[self.dtype], ids
        ids = (ctypes.c_int * 256)()
        found = ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetIds(_state["handle"], _COMPUTE_32F, _CUDA_R_32F, t, t, t, t, 256, ids,
                                            ctypes.byref(found)), "AlgoGetIds")
        out = []
        for algo_id in ids[: found.value]:
            if wanted is not None and algo_id not in wanted:
                continue
            base = _Algo()
            if lib.cublasLtMatmulAlgoInit(_state["handle"], _COMPUTE_32F, _CUDA_R_32F, t, t, t, t, algo_id,
                                          ctypes.byref(base)) != 0:
                continue
            for tile in self._cap_list(base, _CAP_TILE_IDS) or [0]:
                for stages in self._cap_list(base, _CAP_STAGES_IDS) or [0]:
                    for cluster in CLUSTER_SHAPES:
                        algo = _Algo.from_buffer_copy(bytes(base))
                        ok = True
                        for attr, value, kind in ((_ALGO_CONFIG_TILE_ID, tile, ctypes.c_uint32),
                                                  (_ALGO_CONFIG_STAGES_ID, stages, ctypes.c_uint32),
                                                  (_ALGO_CONFIG_CLUSTER_SHAPE_ID, cluster, ctypes.c_uint16)):
                            v = kind(value)
                            ok = ok and lib.cublasLtMatmulAlgoConfigSetAttribute(
                                ctypes.byref(algo), attr, ctypes.byref(v), ctypes.sizeof(v)) == 0
                        if ok and (cand := self._check_algo(algo, -1)) is not None:
                            out.append(cand)
        return out[:: -(-len(out) // limit)] if out else out

    def variants(self, candidates: list[Candidate], splits=(2, 4)) -> list[Candidate]:
        """The accepted split-K variants of ``candidates`` and their other swizzling, without
        duplicates of each other or of ``candidates``."""
        seen = {c.algo for c in candidates}
        out = []
        for c in candidates:
            flipped = self.variant(c, max(1, c.config[2]), swizzle=1 - min(c.config[4], 1))  # its own split-K
            for v in [self.variant(c, s) for s in splits] + [flipped]:
                if v is not None and v.algo not in seen:
                    seen.add(v.algo)
                    out.append(v)
        return out

    def _config(self, algo: _Algo) -> tuple:
        values = []
        for attr, kind in ((_ALGO_CONFIG_ID, ctypes.c_int32), (_ALGO_CONFIG_TILE_ID, ctypes.c_uint32),
                           (_ALGO_CONFIG_SPLITK_NUM, ctypes.c_uint32), (_ALGO_CONFIG_REDUCTION_SCHEME, ctypes.c_uint32),
                           (_ALGO_CONFIG_CTA_SWIZZLING, ctypes.c_uint32), (_ALGO_CONFIG_STAGES_ID, ctypes.c_uint32),
                           (_ALGO_CONFIG_CLUSTER_SHAPE_ID, ctypes.c_uint16)):
            value, written = kind(0), ctypes.c_size_t(0)
            status = self.lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value),
                                                                   ctypes.sizeof(value), ctypes.byref(written))
            values.append(int(value.value) if status == 0 else -1)
        return tuple(values)

    def run(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, candidate: Candidate,
            workspace: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        """``out = x @ weight.T`` (``out += x @ weight.T`` with ``accumulate``: beta 1, C
        and D the same matrix) with ``candidate``'s algorithm (shapes as built; the caller
        checks them: this is the hot path)."""
        algo = _Algo.from_buffer_copy(candidate.algo)
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        _check(self.lib.cublasLtMatmul(
            _state["handle"], self.desc, ctypes.byref(self.alpha),
            ctypes.c_void_p(weight.data_ptr()), self.a, ctypes.c_void_p(x.data_ptr()), self.b,
            ctypes.byref(self.one if accumulate else self.beta), ctypes.c_void_p(out.data_ptr()), self.d,
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.byref(algo),
            ctypes.c_void_p(workspace.data_ptr()), ctypes.c_size_t(workspace.numel()), stream), "cublasLtMatmul")
        return out
