"""Compile layer: CUDA sources -> cached cupy.RawModule functions, one per (device, variant).

Sources are flattened here (local #include "x.cuh" inlined, with #line markers so NVRTC errors
name the real file and line) because CuPy's on-disk cache key covers the source string it is
given, not headers it would read from disk: an edited header must change the key.
"""
import functools
import re
import threading
from pathlib import Path

from . import plan

_HERE = Path(__file__).resolve().parent
# Installed: cuda_src ships inside the package; in a source checkout it sits beside it.
SRC_DIR = next((p for p in (_HERE / "cuda_src", _HERE.parent / "cuda_src") if p.is_dir()), _HERE / "cuda_src")
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


def flatten_source(name, _seen=None):
    """The text of cuda_src/<name> with every local include inlined once."""
    seen = set() if _seen is None else _seen
    seen.add(name)
    out = [f'#line 1 "cuda_src/{name}"']
    for lineno, line in enumerate((SRC_DIR / name).read_text().splitlines(), start=1):
        match = _INCLUDE.match(line)
        if match is None:
            out.append(line)
            continue
        if match.group(1) not in seen:
            out.append(flatten_source(match.group(1), seen))
        out.append(f'#line {lineno + 1} "cuda_src/{name}"')
    return "\n".join(out)


def _program(file, variant, names, **defines):
    """(source, options, names) of `file` specialised for `variant` by compile-time constants;
    the caller adds -arch."""
    tile = variant.tile
    defines = {"HEAD_DIM": variant.head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
               "NWARPS": tile.threads // 32, "IS_CAUSAL": int(variant.causal), "IS_DROPOUT": int(variant.dropout),
               "IS_BF16": int(variant.dtype == "bfloat16"), **defines}
    options = ("--std=c++17",) + tuple(f"-D{key}={value}" for key, value in defines.items())
    return flatten_source(file), options, names


# wgmma and setmaxnreg exist only in sm_90a code. Given in the options, it overrides the -arch=sm_90
# that CuPy adds for an H100.
HOPPER_ARCH_OPTION = "-arch=sm_90a"


@functools.lru_cache(maxsize=None)
def forward_program(variant):
    """(source, options, kernel name) of a forward variant."""
    if plan.is_hopper(variant):
        source, options, name = _program("flash_fwd_sm90.cu", variant, "flash_fwd_sm90", STAGES=variant.tile.stages,
                                         O_STAGED=int(variant.tile.o_staged))
        return source, options + (HOPPER_ARCH_OPTION,), name
    return _program("flash_fwd.cu", variant, "flash_fwd", STAGES=variant.tile.stages)


_cache = {}
_lock = threading.Lock()


def get_function(program, device_id, name=None):
    """Kernel `name` (default: the program's only one) of `program`, a (source, options, names)
    triple, compiled for device_id.

    Modules are memoised per device and program; CuPy keeps binaries in its disk cache too.
    """
    source, options, names = program
    key = (device_id, program, name)
    function = _cache.get(key)
    if function is None:
        import cupy

        with _lock:
            module = _cache.get((device_id, program))
            if module is None:
                with cupy.cuda.Device(device_id):
                    module = cupy.RawModule(code=source, options=options)
                _cache[(device_id, program)] = module
            with cupy.cuda.Device(device_id):
                function = module.get_function(names if name is None else name)
            _cache[key] = function
    return function


DROPOUT_MASK_PROGRAM = (flatten_source("dropout_mask.cu"), ("--std=c++17",), "dropout_mask")


@functools.lru_cache(maxsize=None)
def backward_program(variant):
    """(source, options, kernel names) of a backward variant: the row passes and the dK/dV
    kernel of its family, and the deterministic dQ kernel of the portable one."""
    tile = variant.tile
    if plan.is_hopper(variant):
        names = ("flash_bwd_preprocess", "flash_bwd_dkdv_sm90", "flash_bwd_convert_dq_tiles")
        source, options, names = _program("flash_bwd_sm90.cu", variant, names, STAGES=tile.stages, DQ_ATOMIC=1,
                                           DQ_TILED=1)
        return source, options + (HOPPER_ARCH_OPTION,), names
    names = ("flash_bwd_preprocess", "flash_bwd_dkdv", "flash_bwd_convert_dq", "flash_bwd_dq")
    return _program("flash_bwd.cu", variant, names, DQ_BLOCK_N=tile.dq_block_n, SDP_WM=tile.sdp_wm,
                    KV_WM=tile.kv_wm, DQ_WM=tile.dq_wm, DQ_ATOMIC=int(not variant.deterministic), DQ_TILED=0)
