"""JAX adapter: flash_attn_func on JAX arrays as a jax.custom_vjp, differentiable under jax.grad.

Concrete arrays go through cuflash/ops.py (DLPack, zero-copy). Under jax.jit, vmap and other
tracing transformations the arrays are tracers, and the kernels run inside
jax.experimental.buffer_callback: XLA calls a Python function at run time with its device buffers
and its stream, and cuflash launches on that stream, reading XLA's buffers in place; no array
crosses the host. The dropout seed travels as a uint32 (lo, hi) operand. Gradients flow from O; a
gradient that reaches lse raises NotImplementedError instead of being dropped.
"""
import contextlib
import functools
import math
import numbers

import numpy as np

from . import interop, ops, validate

def attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap=0.0):
    infos = [_describe_jax(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    validate.check_qkv(*infos)
    scale = validate.softmax_scale(softmax_scale, infos[0].shape[3])
    seed = _jax_seed(seed, dropout_p)
    return tuple(_jax_custom_vjp()(q, k, v, seed, scale, causal, deterministic, dropout_p, softcap))


def _jax_seed(seed, dropout_p):
    """The dropout seed as a uint32 (lo, hi) array (a tracer under jit): from an int, or from an
    integer JAX array of shape () or (2,), or a typed PRNG key (its key data)."""
    import jax
    import jax.numpy as jnp

    if seed is None:
        if dropout_p > 0:
            raise ValueError("seed: JAX callers must pass a seed with dropout_p > 0 "
                             "(an int, or an integer array such as jax.random.key_data(key))")
        return np.zeros(2, np.uint32)
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = validate.seed(seed, dropout_p)
        return np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
    if not hasattr(seed, "dtype") or not hasattr(seed, "shape"):
        raise TypeError(f"seed must be an int or an integer JAX array; got {type(seed).__name__}")
    if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        seed = jax.random.key_data(seed).reshape(-1)[-2:]
    if not jnp.issubdtype(seed.dtype, jnp.integer) or seed.shape not in ((), (2,)):
        raise TypeError(f"seed must be an integer array of shape () or (2,); got {seed.dtype} {seed.shape}")
    seed = jnp.asarray(seed).astype(jnp.uint32)
    return jnp.stack([seed, jnp.zeros((), jnp.uint32)]) if seed.shape == () else seed


def _seed_int(seed, dropout_p):
    """The int of a concrete uint32 (lo, hi) seed array (NumPy, JAX or CuPy: read on the host), or
    None without dropout, where the seed is unused and not worth a wait for the device."""
    if dropout_p == 0:
        return None
    lo, hi = (int(x) for x in (seed.get() if hasattr(seed, "get") else np.asarray(seed)))
    return lo | hi << 32


def _describe_jax(x, name):
    """interop.describe, or for a tracer its abstract shape and dtype (device and pointer are
    only known when XLA runs the computation)."""
    if _is_tracer(x):
        return interop.ArrayInfo("jax", tuple(x.shape), interop._c_strides(x.shape), x.dtype.name, 0, 0)
    return interop.describe(x, name)


def _is_tracer(*arrays):
    import jax

    return any(isinstance(x, jax.core.Tracer) for x in arrays)


@functools.lru_cache(maxsize=None)
def _jax_custom_vjp():
    import jax
    from jax.custom_derivatives import SymbolicZero

    # seed is an integer operand: its cotangent is None
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
    def flash(q, k, v, seed, softmax_scale, causal, deterministic, dropout_p, softcap):
        return _jax_forward(q, k, v, seed, softmax_scale, causal, dropout_p, softcap)

    def flash_fwd(q, k, v, seed, softmax_scale, causal, deterministic, dropout_p, softcap):
        q, k, v, seed = (x.value for x in (q, k, v, seed))  # symbolic_zeros: primals come wrapped
        out, lse = _jax_forward(q, k, v, seed, softmax_scale, causal, dropout_p, softcap)
        return (out, lse), (q, k, v, seed, out, lse)

    def flash_bwd(softmax_scale, causal, deterministic, dropout_p, softcap, residuals, cotangents):
        dout, dlse = cotangents
        if not isinstance(dlse, SymbolicZero):
            raise NotImplementedError(validate.LSE_GRAD_MESSAGE)
        q, k, v, seed, out, lse = residuals
        if isinstance(dout, SymbolicZero):
            return tuple(jax.numpy.zeros_like(x) for x in (q, k, v)) + (None,)
        return _jax_backward(dout.astype(q.dtype), q, k, v, seed, out, lse, softmax_scale, causal, deterministic,
                             dropout_p, softcap) + (None,)

    flash.defvjp(flash_fwd, flash_bwd, symbolic_zeros=True)
    return flash


def _jax_forward(q, k, v, seed, softmax_scale, causal, dropout_p, softcap):
    if not _is_tracer(q, k, v, seed):
        return ops.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p,
                           seed=_seed_int(seed, dropout_p), softcap=softcap)
    import jax
    import jax.numpy as jnp

    batch, seqlen_q, nheads, _ = q.shape
    results = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, nheads, seqlen_q), jnp.float32))
    run = _buffer_callback(_forward_callback, results, softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p,
                           softcap=softcap)
    return tuple(run(q, k, v, jnp.asarray(seed)))


def _jax_backward(dout, q, k, v, seed, out, lse, softmax_scale, causal, deterministic, dropout_p, softcap):
    if not _is_tracer(dout, q, k, v, seed, out, lse):
        return tuple(ops.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                                  deterministic=deterministic, dropout_p=dropout_p, seed=_seed_int(seed, dropout_p),
                                  softcap=softcap))
    import jax
    import jax.numpy as jnp

    results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    run = _buffer_callback(_backward_callback, results, softmax_scale=softmax_scale, causal=causal,
                           deterministic=deterministic, dropout_p=dropout_p, softcap=softcap)
    return tuple(run(dout, q, k, v, jnp.asarray(seed), out, lse))


def _buffer_callback(callback, results, **params):
    """jax.experimental.buffer_callback of `callback` with `params` bound, returning `results`
    (ShapeDtypeStructs); under vmap it runs once per batch element."""
    from jax.experimental.buffer_callback import buffer_callback

    return buffer_callback(_bound(callback, **params), results, vmap_method="sequential")


@functools.lru_cache(maxsize=None)
def _bound(callback, **params):
    """One partial per (callback, params), so that equal traces hold equal callbacks (JAX's
    caches compare them)."""
    return functools.partial(callback, **params)


def _forward_callback(ctx, results, q, k, v, seed, *, softmax_scale, causal, dropout_p, softcap):
    """Runs when XLA executes the forward: O is written into XLA's result buffer in place; lse
    is copied into its buffer on the same stream. A traced dropout seed is read on the host (a
    wait on XLA's stream)."""
    out, lse = results
    with _on_xla_stream(ctx, q):
        o_view, lse_view = _cupy_view(out), _cupy_view(lse)
        seed = _seed_int(_cupy_view(seed), dropout_p)
        _, lse_new = ops.forward(*(_cupy_view(x) for x in (q, k, v)), softmax_scale=softmax_scale, causal=causal,
                                 out=o_view, dropout_p=dropout_p, seed=seed, softcap=softcap)
        lse_view[...] = lse_new


def _backward_callback(ctx, results, dout, q, k, v, seed, out, lse, *, softmax_scale, causal, deterministic,
                       dropout_p, softcap):
    """Runs when XLA executes the backward: dq, dk, dv are copied into XLA's result buffers on
    XLA's stream."""
    with _on_xla_stream(ctx, q):
        seed = _seed_int(_cupy_view(seed), dropout_p)
        grads = ops.backward(*(_cupy_view(x) for x in (dout, q, k, v, out, lse)), softmax_scale=softmax_scale,
                             causal=causal, deterministic=deterministic, dropout_p=dropout_p, seed=seed,
                             softcap=softcap)
        for buffer, grad in zip(results, grads):
            _cupy_view(buffer)[...] = grad


KDLCUDA = 2  # DLPack's device type of CUDA memory


@functools.lru_cache(maxsize=64)
def _external_stream(ptr):
    import cupy

    class XlaStream:
        def __cuda_stream__(self):  # the CUDA stream protocol: (version, cudaStream_t)
            return (0, ptr)

    return cupy.cuda.Stream.from_external(XlaStream())


@contextlib.contextmanager
def _on_xla_stream(ctx, buffer):
    """Make the buffer's device and XLA's compute stream CuPy's current ones, so that cuflash's
    launches and allocations follow XLA's earlier work on the buffers and precede its later work."""
    import cupy

    kind, device = buffer.__dlpack_device__()
    if kind != KDLCUDA:
        raise TypeError(f"cuflash runs on CUDA arrays; under jax.jit its inputs are on DLPack device type {kind}")
    stream = ctx.stream  # a property (JAX 0.10); a method in some versions
    with cupy.cuda.Device(device), _external_stream(stream() if callable(stream) else stream):
        yield


def _cupy_view(buffer):
    """A CuPy array over an XLA buffer (C-contiguous, on the current device), without a copy."""
    import cupy

    shape = tuple(buffer.shape)
    dtype = buffer.dtype
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return cupy.empty(shape, dtype)
    ptr = buffer.__cuda_array_interface__["data"][0]
    memory = cupy.cuda.UnownedMemory(ptr, nbytes, buffer, cupy.cuda.get_device_id())
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))
