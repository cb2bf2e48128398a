"""Every configuration cuBLASLt accepts for one problem, beyond its heuristic's short list.

The heuristic lists ~8 algorithms per problem. For the B = 16 tree's 336-row products with narrow
outputs (qkv N = 3072, o / down N = 2048 at the 1B draft) all of them leave SMs idle: 3 x 32 output
tiles on 132 SMs. cuBLASLt also exposes its algorithm ids with their capabilities (tile shapes,
stage counts, split-K, CTA swizzling); a configuration is one choice of each, and
cublasLtMatmulAlgoCheck says whether it runs this problem and how many waves of CTAs it makes.
`configurations` enumerates them, keeps the ones that check, and returns the best few by wave
efficiency (waves / ceil(waves)) for the caller to time.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import math

from ssd.layers.cublaslt import _COMPUTE_32F, _DATA_TYPES, _SCALE_32F, CublasLt, LtAlgorithm, _Algo, _HeuristicResult

log = logging.getLogger(__name__)

_CAP_SPLITK_SUPPORT, _CAP_REDUCTION_MASK, _CAP_SWIZZLING_SUPPORT, _CAP_TILE_IDS, _CAP_STAGES_IDS = 0, 1, 2, 6, 13
_CONFIG_TILE, _CONFIG_SPLITK, _CONFIG_REDUCTION, _CONFIG_SWIZZLING, _CONFIG_STAGES = 1, 2, 3, 4, 6
_REDUCTION_NONE, _REDUCTION_COMPUTE_TYPE, _REDUCTION_OUTPUT_TYPE = 0, 2, 4
SPLITS = (1, 2, 3, 4, 6, 8)
MAX_IDS = 256
MAX_CHECKS = 50_000   # cublasLtMatmulAlgoCheck calls per problem (host calls of a few microseconds)


def _cap_array(lib: ctypes.CDLL, algo: _Algo, attr: int) -> list[int]:
    """A capability that is an array of uint32 (tile or stage ids)."""
    written = ctypes.c_size_t(0)
    if lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, 0, ctypes.byref(written)) != 0:
        return []
    values = (ctypes.c_uint32 * (written.value // 4))()
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, values, ctypes.sizeof(values),
                                          ctypes.byref(written))
    return list(values)


def _cap_scalar(lib: ctypes.CDLL, algo: _Algo, attr: int) -> int:
    value, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value), 4, ctypes.byref(written))
    return value.value


def _set(lib: ctypes.CDLL, algo: _Algo, attr: int, value: int) -> bool:
    v = ctypes.c_uint32(value)
    return lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), 4) == 0


def algorithm_ids(lt: CublasLt, dtype) -> list[int]:
    t = _DATA_TYPES[dtype]
    ids, returned = (ctypes.c_int * MAX_IDS)(), ctypes.c_int(0)
    status = lt.lib.cublasLtMatmulAlgoGetIds(lt.handle, _COMPUTE_32F, _SCALE_32F, t, t, t, t, MAX_IDS, ids,
                                             ctypes.byref(returned))
    return list(ids[:returned.value]) if status == 0 else []


def configurations(lt: CublasLt, x2, weight, limit: int = 24) -> list[LtAlgorithm]:
    """Up to `limit` checked configurations for x2 [M, K] times weight [N, K]^T, the highest wave
    efficiency first (fewer splits first among equals)."""
    lib, problem = lt.lib, lt.problem(x2, weight)
    a, b, d = problem.layouts
    t = _DATA_TYPES[x2.dtype]
    checked, checks = [], 0
    for algo_id in algorithm_ids(lt, x2.dtype):
        base = _Algo()
        if lib.cublasLtMatmulAlgoInit(lt.handle, _COMPUTE_32F, _SCALE_32F, t, t, t, t, algo_id,
                                      ctypes.byref(base)) != 0:
            continue
        tiles = _cap_array(lib, base, _CAP_TILE_IDS) or [0]
        stages = _cap_array(lib, base, _CAP_STAGES_IDS) or [0]
        reductions = _cap_scalar(lib, base, _CAP_REDUCTION_MASK)
        reduction = next((r for r in (_REDUCTION_COMPUTE_TYPE, _REDUCTION_OUTPUT_TYPE, 1) if reductions & r), 0)
        splits = SPLITS if _cap_scalar(lib, base, _CAP_SPLITK_SUPPORT) and reduction else (1,)
        swizzles = (0, 1) if _cap_scalar(lib, base, _CAP_SWIZZLING_SUPPORT) else (0,)
        for tile, stage, split, swizzle in itertools.product(tiles, stages, splits, swizzles):
            checks += 1
            if checks > MAX_CHECKS:
                break
            algo = _Algo()
            ctypes.memmove(ctypes.byref(algo), ctypes.byref(base), ctypes.sizeof(algo))
            ok = (_set(lib, algo, _CONFIG_TILE, tile) and _set(lib, algo, _CONFIG_STAGES, stage)
                  and _set(lib, algo, _CONFIG_SPLITK, split) and _set(lib, algo, _CONFIG_SWIZZLING, swizzle)
                  and _set(lib, algo, _CONFIG_REDUCTION, reduction if split > 1 else _REDUCTION_NONE))
            result = _HeuristicResult()
            if not ok or lib.cublasLtMatmulAlgoCheck(lt.handle, problem.desc, a, b, d, d, ctypes.byref(algo),
                                                     ctypes.byref(result)) != 0:
                continue
            if result.workspace_size > lt.workspace.numel() or result.waves_count <= 0:
                continue
            efficiency = result.waves_count / math.ceil(result.waves_count)
            label = f"lt-id{algo_id}-tile{tile}-stages{stage}-split{split}-swizzle{swizzle}"
            checked.append((-efficiency, split, label, algo, result.workspace_size, result.waves_count))
    checked.sort(key=lambda c: c[:2])
    log.info("cuBLASLt configurations for %s: %d of %d checks passed", problem.key, len(checked), min(checks, MAX_CHECKS))
    return [LtAlgorithm(problem, rank, algo, workspace, f"{label}-waves{waves:.2f}")
            for rank, (_, _, label, algo, workspace, waves) in enumerate(checked[:limit])]
