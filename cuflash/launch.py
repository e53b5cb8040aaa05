"""Kernel launch with every argument packed into one parameter buffer.

cuLaunchKernel accepts the kernel's parameters as a single buffer laid out like its parameter
space (CU_LAUNCH_PARAM_BUFFER_POINTER). Packing it with `struct` costs a few microseconds, where
CuPy's per-argument marshalling of our 20-40 scalars costs tens: at seqlen 2k that difference
is several percent of a forward. Signature codes: Q = pointer, q = int64, i = int32, I = uint32,
f = float32, Ns = an N-byte blob (a TMA tensor map). Scalars alone are laid out with C alignment
('@'), which is the layout of a CUDA kernel's parameter space; a kernel with 64-byte aligned
blobs (__grid_constant__ CUtensorMap) has its parameters placed so that the blobs' absolute
addresses in the constant bank are aligned, so their offsets are read from the driver
(cuFuncGetParamInfo) and the buffer padded to match.
"""
import ctypes
import functools
import re
import struct

_BUFFER_POINTER, _BUFFER_SIZE, _END = 1, 2, 0
_FIELD = re.compile(r"(\d*)([QqiIfs])")


def fields(signature):
    """The struct code of each parameter of a signature: "2Q128s" -> ["Q", "Q", "128s"]."""
    if "".join(count + code for count, code in _FIELD.findall(signature)) != signature:
        raise ValueError(f"bad launch signature {signature!r}")
    out = []
    for count, code in _FIELD.findall(signature):
        out += [f"{count}s"] if code == "s" else [code] * int(count or 1)
    return out


def padded_format(field_codes, offsets):
    """A struct format placing each field at its byte offset (explicit pad bytes, no alignment)."""
    fmt, cursor = "<", 0
    for code, offset in zip(field_codes, offsets):
        if offset < cursor:
            raise ValueError(f"parameter offsets {offsets} overlap for fields {field_codes}")
        fmt += f"{offset - cursor}x{code}" if offset > cursor else code
        cursor = offset + struct.calcsize("<" + code)
    return fmt


@functools.lru_cache(maxsize=None)
def libcuda():
    """The CUDA driver library, for the entry points CuPy does not wrap."""
    return ctypes.CDLL("libcuda.so.1")


@functools.lru_cache(maxsize=None)
def _param_offsets(function_ptr, count):
    get_info = libcuda().cuFuncGetParamInfo
    get_info.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    get_info.restype = ctypes.c_int
    offsets = []
    for index in range(count):
        offset, size = ctypes.c_size_t(), ctypes.c_size_t()
        status = get_info(function_ptr, index, ctypes.byref(offset), ctypes.byref(size))
        if status != 0:
            raise RuntimeError(f"cuFuncGetParamInfo failed with CUresult {status} for parameter {index}")
        offsets.append(offset.value)
    return tuple(offsets)


@functools.lru_cache(maxsize=None)
def _layout(function_ptr, signature):
    if "s" in signature:
        codes = fields(signature)
        layout = struct.Struct(padded_format(codes, _param_offsets(function_ptr, len(codes))))
    else:
        layout = struct.Struct("@" + signature)
    return layout, ctypes.c_size_t(layout.size)


def allow_dynamic_smem(function, nbytes):
    """Let a compiled kernel (from compile.get_function) take `nbytes` of dynamic shared memory
    per block (above 48 KB it must be asked for)."""
    from cupy.cuda import driver

    driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)


def launch(function, grid, block, shared_mem, stream, signature, *args):
    """Launch a compiled kernel (from compile.get_function) on `stream` (a raw CUDA stream)."""
    from cupy.cuda import driver

    layout, size = _layout(function.ptr, signature)
    params = ctypes.create_string_buffer(layout.pack(*args), layout.size)
    extra = (ctypes.c_void_p * 5)(_BUFFER_POINTER, ctypes.addressof(params), _BUFFER_SIZE, ctypes.addressof(size), _END)
    driver.launchKernel(function.ptr, grid, 1, 1, block, 1, 1, shared_mem, stream, 0, ctypes.addressof(extra))
