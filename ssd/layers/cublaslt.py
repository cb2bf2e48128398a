"""cuBLASLt's own list of matmul algorithms for one problem, so that y = x W^T can run the fastest.

F.linear runs the first algorithm of cuBLAS's heuristic. For the draft's odd row counts that pick
is not always the fastest: the 1B draft's qkv product at 21 rows took 7.6 us, 5.3 with its rows
padded to 32 (H200). cublasLtMatmulAlgoGetHeuristic lists up to `count` algorithms for a problem
(8 at every draft shape); MeasuredLinear (ssd.layers.triton_linear) times them beside F.linear and
keeps the fastest per shape — qkv at 21 rows 8.0 -> 6.6 us, the LM head 4-6 % faster; for the
336-row products of the B = 16 tree none of the listed ones beat the first
(results/lt_gemm_sweep_h200.json).

The binding is ctypes over the libcublasLt that torch itself loaded (the same library, found in
the process's memory map), with one handle and one workspace per device. A call takes fixed
descriptors and a fixed workspace, so it is captured in CUDA graphs like any cuBLAS call.

Row-major y [M, N] = x [M, K] W^T (W [N, K]) is, in cuBLAS's column-major terms, D [N, M] =
op_T(A) op_N(B) with A = W seen as a [K, N] matrix (ld = W's row stride), B = x seen as [K, M]
(ld = x's row stride) and D = y seen as [N, M] (ld = N): `problem_layouts`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 32 << 20
LISTED_ALGORITHMS = 12   # how many of the heuristic's algorithms a shape's measurement times (0: none)
ALIGNMENT_BYTES = 16   # what every pointer handed to a call must be aligned to (asked of the heuristic)

_COMPUTE_32F = 68                      # cublasComputeType_t CUBLAS_COMPUTE_32F
_SCALE_32F = 0                         # cudaDataType_t CUDA_R_32F
_DATA_TYPES = {torch.bfloat16: 14, torch.float16: 2, torch.float32: 0}   # CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F
_DESC_TRANSA, _DESC_TRANSB = 3, 4      # cublasLtMatmulDescAttributes_t
_OP_N, _OP_T = 0, 1
_PREF_MAX_WORKSPACE_BYTES = 1          # cublasLtMatmulPreferenceAttributes_t
_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)     # ..._MIN_ALIGNMENT_{A,B,C,D}_BYTES


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@dataclass(frozen=True)
class Layout:
    """A column-major matrix as cuBLASLt describes it: rows x cols, leading dimension ld."""
    rows: int
    cols: int
    ld: int


def problem_layouts(rows: int, n: int, k: int, x_ld: int, w_ld: int) -> tuple[Layout, Layout, Layout]:
    """(A, B, D) of y [rows, n] = x [rows, k] W^T with A = W (transposed by the op), B = x: see the
    module docstring. Row-major [r, c] with row stride s is column-major [c, r] with ld s."""
    return Layout(k, n, w_ld), Layout(k, rows, x_ld), Layout(n, rows, n)


@dataclass(frozen=True, eq=False)   # identity: a key of the measured times
class LtAlgorithm:
    """Rank `rank` of the heuristic's list for one problem (rows, N, K, x's row stride, dtype)."""
    problem: "LtProblem"
    rank: int
    algo: _Algo
    workspace: int

    def __str__(self) -> str:
        return f"cublasLt#{self.rank}"


class LtProblem:
    """The descriptors of one problem, owned (destroyed with this object)."""

    def __init__(self, lib: ctypes.CDLL, rows: int, n: int, k: int, x_ld: int, w_ld: int, dtype: torch.dtype):
        self.key = (rows, n, k, x_ld, w_ld, dtype)
        data_type = _DATA_TYPES[dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _SCALE_32F), "MatmulDescCreate")
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            value = ctypes.c_int32(op)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
                   "MatmulDescSetAttribute")
        self.layouts = []
        for layout in problem_layouts(rows, n, k, x_ld, w_ld):
            handle = ctypes.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(handle), data_type, ctypes.c_uint64(layout.rows),
                                                  ctypes.c_uint64(layout.cols), ctypes.c_int64(layout.ld)),
                   "MatrixLayoutCreate")
            self.layouts.append(handle)
        weakref.finalize(self, _destroy, lib, self.desc, list(self.layouts))


def _destroy(lib: ctypes.CDLL, desc: ctypes.c_void_p, layouts: list[ctypes.c_void_p]) -> None:
    lib.cublasLtMatmulDescDestroy(desc)
    for layout in layouts:
        lib.cublasLtMatrixLayoutDestroy(layout)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cublasLt{what} failed with cublasStatus_t {status}")


class CublasLt:
    """One handle and one workspace on one CUDA device."""

    def __init__(self, device: torch.device):
        self.lib = _library()
        self.handle = ctypes.c_void_p()
        _check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "Create")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.preference = ctypes.c_void_p()
        _check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self.preference)), "MatmulPreferenceCreate")
        self._set_preference(_PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(WORKSPACE_BYTES))
        for attr in _PREF_MIN_ALIGNMENT:
            self._set_preference(attr, ctypes.c_uint32(ALIGNMENT_BYTES))
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        weakref.finalize(self, _release, self.lib, self.handle, self.preference)

    def _set_preference(self, attr: int, value) -> None:
        _check(self.lib.cublasLtMatmulPreferenceSetAttribute(self.preference, attr, ctypes.byref(value),
                                                             ctypes.sizeof(value)), "MatmulPreferenceSetAttribute")

    def algorithms(self, x2: torch.Tensor, weight: torch.Tensor, count: int) -> list[LtAlgorithm]:
        """Up to `count` algorithms for x2 [M, K] (row-major rows) times weight [N, K]^T, the heuristic's
        first choice first; only those it reports as runnable."""
        (rows, k), n = x2.shape, weight.shape[0]
        problem = LtProblem(self.lib, rows, n, k, x2.stride(0), weight.stride(0), x2.dtype)
        a, b, d = problem.layouts
        results = (_HeuristicResult * count)()
        returned = ctypes.c_int(0)
        status = self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, problem.desc, a, b, d, d, self.preference,
                                                         count, results, ctypes.byref(returned))
        if status != 0:
            log.debug("no cuBLASLt algorithm for %s (status %d)", problem.key, status)
            return []
        return [LtAlgorithm(problem, rank, results[rank].algo, results[rank].workspace_size)
                for rank in range(returned.value) if results[rank].state == 0]

    def apply(self, x: torch.Tensor, weight: torch.Tensor, algorithm: LtAlgorithm) -> torch.Tensor:
        """x [..., K] W^T with a measured algorithm; F.linear where this call's strides or pointer
        alignment are not those the algorithm was chosen for."""
        x2 = row_matrix(x)
        if (algorithm.problem.key != (x2.shape[0], weight.shape[0], x2.shape[1], x2.stride(0), weight.stride(0),
                                      x2.dtype) or not aligned(x2, weight)):
            return F.linear(x, weight)
        return self.linear(x2, weight, algorithm).view(*x.shape[:-1], weight.shape[0])

    def linear(self, x2: torch.Tensor, weight: torch.Tensor, algorithm: LtAlgorithm) -> torch.Tensor:
        """x2 [M, K] @ weight^T with `algorithm` (made for this shape, strides and dtype) on the
        current stream; [M, N]."""
        y = torch.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype, device=x2.device)
        problem = algorithm.problem
        a, b, d = problem.layouts
        stream = torch.cuda.current_stream(x2.device).cuda_stream
        _check(self.lib.cublasLtMatmul(
            self.handle, problem.desc, ctypes.byref(self.alpha), ctypes.c_void_p(weight.data_ptr()), a,
            ctypes.c_void_p(x2.data_ptr()), b, ctypes.byref(self.beta), ctypes.c_void_p(y.data_ptr()), d,
            ctypes.c_void_p(y.data_ptr()), d, ctypes.byref(algorithm.algo),
            ctypes.c_void_p(self.workspace.data_ptr()), ctypes.c_size_t(WORKSPACE_BYTES), ctypes.c_void_p(stream)),
            "Matmul")
        return y


def _release(lib: ctypes.CDLL, handle: ctypes.c_void_p, preference: ctypes.c_void_p) -> None:
    lib.cublasLtMatmulPreferenceDestroy(preference)
    lib.cublasLtDestroy(handle)


def aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % ALIGNMENT_BYTES == 0 for t in tensors)


def row_matrix(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the [M, K] matrix a problem describes (rows contiguous, ld = K)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 and x2.stride(0) == x2.shape[1] else x2.contiguous()


_P, _I32, _U64, _I64, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
_SIGNATURES = {   # cublasLt.h; handles, descriptors and device pointers as void*
    "cublasLtCreate": [_P], "cublasLtDestroy": [_P],
    "cublasLtMatmulDescCreate": [_P, _I32, _I32], "cublasLtMatmulDescDestroy": [_P],
    "cublasLtMatmulDescSetAttribute": [_P, _I32, _P, _SIZE],
    "cublasLtMatrixLayoutCreate": [_P, _I32, _U64, _U64, _I64], "cublasLtMatrixLayoutDestroy": [_P],
    "cublasLtMatmulPreferenceCreate": [_P], "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _I32, _P, _SIZE],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _I32, _P, _P],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _SIZE, _P],
}


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    """The libcublasLt torch loaded (its CUDA build links it): the process's memory map names it."""
    torch.cuda.init()
    path = None
    with open("/proc/self/maps") as maps:
        path = next((line.split()[-1] for line in maps if "libcublasLt.so" in line), None)
    path = path or ctypes.util.find_library("cublasLt")
    if path is None:
        raise OSError("libcublasLt is not loaded in this process and not on the library path")
    lib = ctypes.CDLL(path)
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    log.info("cuBLASLt from %s", path)
    return lib
