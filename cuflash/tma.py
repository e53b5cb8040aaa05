"""TMA tensor maps for the sm_90a kernels.

A CUtensorMap (128 opaque bytes, passed by value as a __grid_constant__ kernel parameter) tells
the copy engine how to read boxes of a tensor. Ours view a (batch, seqlen, heads, d) array as a
4-d tensor (d, seqlen, heads, batch) read in boxes of (64 columns, `rows` rows) with the 128-byte
swizzle, which is the shared-memory panel layout of cuda_src/warpgroup_gemm.cuh. Elements out of
bounds (rows past seqlen, columns past the caller's head dim) arrive as zeros. The driver's
cuTensorMapEncodeTiled encodes them; CuPy does not wrap it, so it is called through ctypes.
"""
import ctypes
import functools

from . import launch

_DATA_TYPE = {"float16": 6, "bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZERO = 0, 3, 3, 0
_MAX_STRIDE_BYTES = 2**40
PANEL = 64  # box width in elements: 128 bytes, the swizzle span


class TensorMap(ctypes.Structure):
    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


@functools.lru_cache(maxsize=None)
def driver_supported():
    """True if the driver has what the sm_90a launches need: cuTensorMapEncodeTiled (CUDA 12.0)
    and cuFuncGetParamInfo (12.4, for launch.py's parameter offsets)."""
    try:
        lib = launch.libcuda()
    except OSError:
        return False
    return all(hasattr(lib, name) for name in ("cuTensorMapEncodeTiled", "cuFuncGetParamInfo"))


@functools.lru_cache(maxsize=None)
def _encode_tiled():
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    function = launch.libcuda().cuTensorMapEncodeTiled
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.POINTER(TensorMap), ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                         u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return function


def _byte_strides(shape, strides):
    """Byte strides of the seqlen, heads and batch axes of a (batch, seqlen, heads, d) array of
    16-bit elements, or None where TMA cannot express them (a stride that is not a positive
    multiple of 16 bytes below 2^40 on an axis longer than 1). An axis of length 1 is never
    stepped, so any legal stride serves it."""
    batch, seqlen, heads, _ = shape
    byte_strides = []
    for size, stride in ((seqlen, strides[1]), (heads, strides[2]), (batch, strides[0])):
        stride_bytes = stride * 2
        if size == 1:
            stride_bytes = 16
        elif stride_bytes <= 0 or stride_bytes % 16 or stride_bytes >= _MAX_STRIDE_BYTES:
            return None
        byte_strides.append(stride_bytes)
    return byte_strides


def encodable(*infos):
    """True if every array can be read through a tensor map."""
    return all(_byte_strides(info.shape, info.strides) is not None and info.data_ptr % 16 == 0 for info in infos)


def tensor_map(info, rows):
    """The encoded map (bytes) of array `info` (an interop.ArrayInfo of shape (batch, seqlen,
    heads, d), 16-bit elements) for boxes of `rows` rows x PANEL columns."""
    return encode(info.data_ptr, info.shape, info.strides, info.dtype, rows)


# A map is a function of these values alone; remembering recent ones saves the driver call (a
# few microseconds per map) on the repeated shapes of a training loop.
@functools.lru_cache(maxsize=256)
def encode(data_ptr, shape, strides, dtype, rows):
    """tensor_map of the array at data_ptr with this shape, element strides and dtype."""
    batch, seqlen, heads, head_dim = shape
    steps = _byte_strides(shape, strides)
    if steps is None:
        raise ValueError(f"array with strides {strides} cannot be read through a TMA tensor map")
    dims = (ctypes.c_uint64 * 4)(head_dim, seqlen, heads, batch)
    byte_strides = (ctypes.c_uint64 * 3)(*steps)
    box = (ctypes.c_uint32 * 4)(PANEL, rows, 1, 1)
    element_strides = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    result = TensorMap()
    status = _encode_tiled()(ctypes.byref(result), _DATA_TYPE[dtype], 4, data_ptr, dims, byte_strides, box,
                             element_strides, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZERO)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {status} for shape {shape}, strides {strides}")
    return bytes(result)
