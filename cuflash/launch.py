"""Kernel launch with the kernel's parameters handed over as one buffer.

cuLaunchKernel accepts the parameters as a single buffer laid out like the kernel's parameter
space (CU_LAUNCH_PARAM_BUFFER_POINTER). Every cuflash kernel takes one parameter struct
(cuflash/params.py packs it), so the buffer is that struct's bytes; the sm_90a kernels take a
second one, their 64-byte aligned TMA maps, which ptxas places so that their absolute address in
the constant bank is aligned: its offset is read from the driver (cuFuncGetParamInfo) and the
buffer padded to match.
"""
import ctypes
import functools
import threading

_BUFFER_POINTER, _BUFFER_SIZE, _END = 1, 2, 0


@functools.lru_cache(maxsize=None)
def libcuda():
    """The CUDA driver library, for the entry points CuPy does not wrap."""
    return ctypes.CDLL("libcuda.so.1")


@functools.lru_cache(maxsize=None)
def param_offsets(function_ptr, count):
    """Byte offsets of a kernel's first `count` parameters in its parameter buffer. A lone
    parameter starts the buffer, so a one-struct kernel needs no driver query (nor CUDA 12.4)."""
    if count == 1:
        return (0,)
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


def param_buffer(offsets, parts):
    """The parameter buffer holding each part's bytes at its offset (zero padding between)."""
    if len(parts) == 1:
        return parts[0]
    out = bytearray()
    for offset, part in zip(offsets, parts):
        if offset < len(out):
            raise ValueError(f"parameter offsets {offsets} overlap parts of {[len(p) for p in parts]} bytes")
        out += bytes(offset - len(out)) + part
    return bytes(out)


def allow_dynamic_smem(function, nbytes):
    """Let a compiled kernel (from compile.get_function) take `nbytes` of dynamic shared memory
    per block (above 48 KB it must be asked for)."""
    from cupy.cuda import driver

    driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)


class KernelLaunch:
    """A kernel's launch configuration with its parameter buffer built once, for launches that
    differ only in a few fields: write them in place (`buffer`, e.g. with struct.pack_into at an
    offset from params.Layout.run; `offsets` gives where each struct starts), then call with the
    stream. Hold `lock` from the first write to the launch when other threads may launch it
    too (the driver copies the buffer at the launch)."""

    def __init__(self, function, grid, block, shared_mem, *parts):
        from cupy.cuda import driver

        self.offsets = param_offsets(function.ptr, len(parts))
        blob = param_buffer(self.offsets, parts)
        self.buffer = ctypes.create_string_buffer(blob, len(blob))
        self._size = ctypes.c_size_t(len(blob))
        self._extra = (ctypes.c_void_p * 5)(_BUFFER_POINTER, ctypes.addressof(self.buffer), _BUFFER_SIZE,
                                            ctypes.addressof(self._size), _END)
        self._launch_kernel = driver.launchKernel
        self._config = (function.ptr, grid, 1, 1, block, 1, 1, shared_mem)
        self._extra_ptr = ctypes.addressof(self._extra)
        self.lock = threading.Lock()

    def __call__(self, stream):
        self._launch_kernel(*self._config, stream, 0, self._extra_ptr)


def launch(function, grid, block, shared_mem, stream, *parts):
    """Launch a compiled kernel (from compile.get_function) once on `stream` (a raw CUDA
    stream) with its parameters, each the bytes of one parameter struct (params.Layout.pack)."""
    KernelLaunch(function, grid, block, shared_mem, *parts)(stream)
