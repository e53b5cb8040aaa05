"""Interop: CuPy, PyTorch and JAX arrays in without a copy, results out in the caller's type.

Every array is first described (framework, shape, element strides, dtype, device, pointer)
without touching its memory, so validation runs before any launch. Kernels take pointers and
strides, so CuPy arrays and torch tensors are launched on as they are, on the caller's stream
(torch's own pointer API costs a few microseconds where a DLPack round trip costs tens). JAX
arrays, and results for JAX callers, cross through DLPack, whose stream handshake orders JAX's
asynchronous work with ours.
"""
import contextlib
from dataclasses import dataclass

from . import device


@dataclass(frozen=True)
class ArrayInfo:
    framework: str  # "cupy", "torch" or "jax"
    shape: tuple
    strides: tuple  # in elements
    dtype: str      # "float16", "bfloat16", ...
    device: int     # CUDA ordinal
    data_ptr: int


_FRAMEWORKS = {"cupy": "cupy", "torch": "torch", "jax": "jax", "jaxlib": "jax"}
_framework_of_type = {}


def framework_of(x):
    """The framework an array comes from, by its type's package: "cupy", "torch", "jax" or None."""
    kind = type(x)
    framework = _framework_of_type.get(kind, False)
    if framework is False:
        framework = _framework_of_type[kind] = _FRAMEWORKS.get(kind.__module__.split(".")[0])
    return framework


def _c_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def describe(x, name):
    """ArrayInfo of a CUDA array, or TypeError naming `name` if x is not one."""
    framework = framework_of(x)
    if framework == "cupy":
        itemsize = x.dtype.itemsize
        return ArrayInfo("cupy", tuple(x.shape), tuple(s // itemsize for s in x.strides),
                         x.dtype.name, x.device.id, x.data.ptr)
    if framework == "torch":
        if not x.is_cuda:
            raise TypeError(f"{name} must be a CUDA tensor; got a torch tensor on {x.device}")
        return ArrayInfo("torch", tuple(x.shape), tuple(x.stride()), str(x.dtype).removeprefix("torch."),
                         x.device.index, x.data_ptr())
    if framework == "jax" and hasattr(x, "devices"):
        devices = x.devices()
        if len(devices) != 1:
            raise TypeError(f"{name} must live on one GPU; got a JAX array sharded over {len(devices)} devices")
        device = next(iter(devices))
        if device.platform not in ("gpu", "cuda"):
            raise TypeError(f"{name} must be a CUDA array; got a JAX array on {device.platform}")
        return ArrayInfo("jax", tuple(x.shape), _c_strides(x.shape), x.dtype.name,
                         device.local_hardware_id, x.unsafe_buffer_pointer())
    kind = f"{type(x).__module__}.{type(x).__qualname__}"
    where = " (a host array)" if kind.startswith("numpy.") else ""
    raise TypeError(f"{name} must be a CUDA array from CuPy, PyTorch or JAX; got {kind}{where}")


@contextlib.contextmanager
def caller_stream(info):
    """Make the caller's device CuPy's current one and yield the caller's stream (a raw CUDA
    stream): torch's current stream for torch callers, CuPy's current stream otherwise (JAX
    orders its side through the DLPack exchange)."""
    cupy = device.cupy_module()
    with cupy.cuda.Device(info.device):
        if info.framework == "torch":
            import torch

            yield torch.cuda.current_stream(info.device).cuda_stream
        else:
            yield cupy.cuda.get_current_stream().ptr


def launchable(x, info):
    """(array, info) whose memory the current stream may read: JAX arrays are imported through
    DLPack (which waits for JAX's producer on CuPy's current stream), the rest are used as is."""
    if info.framework != "jax":
        return x, info
    import cupy

    view = cupy.from_dlpack(x)
    return view, describe(view, "array")


def contiguous_copy(x, info):
    """A C-contiguous copy of a launchable array, made on the current stream."""
    copy = x.contiguous() if info.framework == "torch" else x.copy()
    return copy, describe(copy, "array")


def cupy_dtype(name):
    import numpy

    if name == "bfloat16":
        import ml_dtypes

        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(name)


def allocator(info):
    """empty(shape, dtype_name) -> (array, its info) for results of a caller like `info`.

    Torch callers get torch-allocated buffers, so torch's caching allocator sees the memory and
    its stream; the others get CuPy's pool (JAX results are exported at the end)."""
    if info.framework == "torch":
        import torch

        def empty(shape, dtype):
            native = torch.empty(shape, dtype=getattr(torch, dtype), device=f"cuda:{info.device}")
            return native, describe(native, "result")
    else:
        import cupy

        def empty(shape, dtype):
            native = cupy.empty(shape, dtype=cupy_dtype(dtype))
            return native, describe(native, "result")
    return empty


def fill(native, value):
    """Fill a result array (torch tensor or CuPy array) with value on the current stream."""
    if hasattr(native, "fill_"):
        native.fill_(value)
    else:
        native.fill(value)


def pad_last(x, width):
    """x with `width` zeros appended to its last axis, in its own framework (differentiable
    where the framework differentiates)."""
    framework = framework_of(x)
    if framework == "torch":
        import torch

        return torch.nn.functional.pad(x, (0, width))
    pad = [(0, 0)] * (len(x.shape) - 1) + [(0, width)]
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.pad(x, pad)
    import cupy

    return cupy.pad(x, pad)


def export(native, framework):
    """A result in the caller's framework; JAX takes CuPy's buffer through DLPack, which orders
    JAX's stream after CuPy's current one."""
    if framework == "jax":
        import jax

        return jax.dlpack.from_dlpack(native)
    return native
