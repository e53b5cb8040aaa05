"""Autograd: cuflash's forward and backward as one differentiable operation, for PyTorch and JAX.

PyTorch: two torch.library custom ops, cuflash::flash_fwd (q, k, v -> out, lse, rng_state) and
cuflash::flash_bwd (dout, q, k, v, out, lse, rng_state -> dq, dk, dv), each with a fake implementation
(shapes, dtypes, devices) so that torch.compile keeps it as one node of the graph, and an
autograd formula on flash_fwd that calls flash_bwd. They are registered on first use, or when
cuflash is imported after torch, so cuflash itself imports without torch.

JAX: a jax.custom_vjp over the same pair. Concrete arrays go through cuflash.forward and
cuflash.backward (DLPack, zero-copy). Under jax.jit, vmap and other tracing transformations the
arrays are tracers, and the kernels run inside jax.experimental.buffer_callback: XLA calls a
Python function at run time with its device buffers and its stream, and cuflash launches on that
stream, reading XLA's buffers in place; no array crosses the host.

Dropout: the forward's (seed, offset) travel to the backward with the residuals: torch's op
returns them as rng_state (a CPU int64 tensor, drawn from torch's CUDA generator at run time, so
compiled graphs draw a new mask per call); JAX carries its seed as a uint32 (lo, hi) operand.

Gradients flow from O. lse is returned for inspection: a gradient that reaches lse raises
NotImplementedError instead of being dropped.
"""
import contextlib
import functools
import math
import numbers
import sys
import threading

import numpy as np

from . import api, dropout, interop, validate

LSE_GRAD_MESSAGE = ("cuflash does not differentiate through lse yet: a gradient reached the lse output "
                    "(detach it, or use jax.lax.stop_gradient, if it only feeds a metric)")


def attention(q, k, v, softmax_scale, causal, deterministic, dropout_p=0.0, seed=None):
    """(o, lse) of flash_attn_func for torch tensors and JAX arrays, differentiable with respect
    to q, k and v; validated before anything is launched. CuPy arrays are not differentiable:
    they go to api.forward directly."""
    framework = interop.framework_of(q)
    if framework == "torch":
        return _torch_attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed)
    if framework == "jax":
        return _jax_attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed)
    if dropout_p > 0 and seed is None:
        seed = dropout.random_seed()
    return api.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p, seed=seed)


# --- PyTorch -------------------------------------------------------------------------------------

_torch_lock = threading.Lock()
_torch_registered = False


def register_torch_ops():
    """Register cuflash::flash_fwd and cuflash::flash_bwd with torch.library (once; imports torch).

    flash_fwd(q, k, v, float softmax_scale, bool causal, bool deterministic, float dropout_p, int? seed)
        -> (out, lse, rng_state)
    flash_bwd(dout, q, k, v, out, lse, float softmax_scale, bool causal, bool deterministic,
              float dropout_p, rng_state) -> (dq, dk, dv)
    softmax_scale is a resolved float (no None); deterministic is carried by flash_fwd for its
    backward; rng_state is the CPU int64 pair (seed, offset) the forward's dropout used (seed as a
    signed 64-bit value; torch's generator when seed is None). Returns True."""
    global _torch_registered
    if not _torch_registered:
        with _torch_lock:
            if not _torch_registered:
                import torch

                if not hasattr(torch.ops.cuflash, "flash_fwd"):  # a reloaded module: keep the ops there
                    _define_torch_ops()
                _torch_registered = True
    return True


# What torch.compiler.assume_constant_result(register_torch_ops) would set, without importing
# torch: Dynamo then calls the function for real while it traces instead of tracing into it, so
# a first call to flash_attn_func inside torch.compile registers the ops without a graph break.
register_torch_ops._dynamo_marked_constant = True


def _define_torch_ops():
    import torch

    @torch.library.custom_op(
        "cuflash::flash_fwd", mutates_args=(), device_types="cuda",
        schema="(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, bool deterministic,"
               " float dropout_p, int? seed) -> (Tensor, Tensor, Tensor)")
    def flash_fwd(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed):
        offset = 0
        if dropout_p > 0 and seed is None:
            seed, offset = dropout.torch_seed_offset(q.device.index)
        seed = 0 if seed is None else seed % 2**64
        out, lse = api.forward(q.detach(), k.detach(), v.detach(), softmax_scale=softmax_scale, causal=causal,
                               dropout_p=dropout_p, seed=seed, offset=offset)
        return out, lse, torch.tensor([_signed64(seed), offset], dtype=torch.int64)

    @flash_fwd.register_fake
    def _(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed):
        check_torch(q, k, v)
        batch, seqlen_q, nheads, _ = q.shape
        # out (batch, seqlen_q, nheads, d) like q, C-contiguous; lse float32 (batch, nheads, seqlen_q);
        # rng_state (seed, offset) on the host
        return (q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32),
                torch.empty((2,), dtype=torch.int64, device="cpu"))

    @torch.library.custom_op(
        "cuflash::flash_bwd", mutates_args=(), device_types="cuda",
        schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale,"
               " bool causal, bool deterministic, float dropout_p, Tensor rng_state) -> (Tensor, Tensor, Tensor)")
    def flash_bwd(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, dropout_p, rng_state):
        arrays = (x.detach() for x in (dout, q, k, v, out, lse))
        seed, offset = rng_state.tolist()
        return tuple(api.backward(*arrays, softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                                  dropout_p=dropout_p, seed=seed, offset=offset))

    @flash_bwd.register_fake
    def _(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, dropout_p, rng_state):
        # dq like q, dk and dv like k and v (summed over each GQA group), C-contiguous
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, softmax_scale, causal, deterministic, dropout_p, _ = inputs
        out, lse, rng_state = output
        ctx.save_for_backward(q, k, v, out, lse, rng_state)
        ctx.softmax_scale, ctx.causal, ctx.deterministic, ctx.dropout_p = softmax_scale, causal, deterministic, dropout_p
        # Unused outputs get None rather than zeros: a gradient on lse is then detectable.
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse, _):
        if dlse is not None:
            raise NotImplementedError(LSE_GRAD_MESSAGE)
        if dout is None:
            return (None,) * 8
        q, k, v, out, lse, rng_state = ctx.saved_tensors
        if dout.stride(-1) != 1:  # e.g. the stride-0 gradient of out.sum()
            dout = dout.contiguous()
        dq, dk, dv = torch.ops.cuflash.flash_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal,
                                                 ctx.deterministic, ctx.dropout_p, rng_state)
        # The kernel computes all three in one pass; autograd receives only those it asked for.
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None) + (None,) * 5

    flash_fwd.register_autograd(backward, setup_context=setup_context)


def check_torch(q, k, v):
    """validate.check_qkv on torch tensors' metadata only (no data pointer), so it also runs on
    the fake tensors torch.compile traces with; tensors on neither CUDA nor the meta device
    (shape inference) raise TypeError."""
    infos = []
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if interop.framework_of(x) != "torch":
            raise TypeError(f"{name} must be a torch tensor like q; got {type(x).__module__}.{type(x).__qualname__}")
        if x.device.type not in ("cuda", "meta"):
            raise TypeError(f"{name} must be a CUDA tensor; got a torch tensor on {x.device}")
        infos.append(interop.ArrayInfo("torch", tuple(x.shape), tuple(x.stride()),
                                       str(x.dtype).removeprefix("torch."), x.device.index, 0))
    validate.check_qkv(*infos)


def _torch_attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed):
    import torch

    register_torch_ops()
    if not torch.compiler.is_compiling():
        check_torch(q, k, v)  # while compiling, flash_fwd's fake implementation checks instead
    scale = validate.softmax_scale(softmax_scale, int(q.shape[-1]))
    if seed is not None:
        seed = validate.seed(seed, dropout_p)
        seed = _signed64(seed)  # the schema's int is signed 64-bit
    out, lse, _ = torch.ops.cuflash.flash_fwd(q, k, v, scale, causal, deterministic, dropout_p, seed)
    return out, lse


if "torch" in sys.modules:  # torch is there already: registering costs nothing more
    register_torch_ops()


# --- JAX -----------------------------------------------------------------------------------------

def _signed64(seed):
    """A seed in [0, 2^64) as the signed 64-bit int torch's schemas and int64 tensors hold."""
    return seed - 2**64 if seed >= 2**63 else seed


def _jax_attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed):
    infos = [_describe_jax(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    validate.check_qkv(*infos)
    scale = validate.softmax_scale(softmax_scale, infos[0].shape[3])
    seed = _jax_seed(seed, dropout_p)
    return tuple(_jax_custom_vjp()(q, k, v, seed, scale, causal, deterministic, dropout_p))


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
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
    def flash(q, k, v, seed, softmax_scale, causal, deterministic, dropout_p):
        return _jax_forward(q, k, v, seed, softmax_scale, causal, dropout_p)

    def flash_fwd(q, k, v, seed, softmax_scale, causal, deterministic, dropout_p):
        q, k, v, seed = (x.value for x in (q, k, v, seed))  # symbolic_zeros: primals come wrapped
        out, lse = _jax_forward(q, k, v, seed, softmax_scale, causal, dropout_p)
        return (out, lse), (q, k, v, seed, out, lse)

    def flash_bwd(softmax_scale, causal, deterministic, dropout_p, residuals, cotangents):
        dout, dlse = cotangents
        if not isinstance(dlse, SymbolicZero):
            raise NotImplementedError(LSE_GRAD_MESSAGE)
        q, k, v, seed, out, lse = residuals
        if isinstance(dout, SymbolicZero):
            return tuple(jax.numpy.zeros_like(x) for x in (q, k, v)) + (None,)
        return _jax_backward(dout.astype(q.dtype), q, k, v, seed, out, lse, softmax_scale, causal, deterministic,
                             dropout_p) + (None,)

    flash.defvjp(flash_fwd, flash_bwd, symbolic_zeros=True)
    return flash


def _jax_forward(q, k, v, seed, softmax_scale, causal, dropout_p):
    if not _is_tracer(q, k, v, seed):
        return api.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p,
                           seed=_seed_int(seed, dropout_p))
    import jax
    import jax.numpy as jnp

    batch, seqlen_q, nheads, _ = q.shape
    results = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, nheads, seqlen_q), jnp.float32))
    run = _buffer_callback(_forward_callback, results, softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p)
    return tuple(run(q, k, v, jnp.asarray(seed)))


def _jax_backward(dout, q, k, v, seed, out, lse, softmax_scale, causal, deterministic, dropout_p):
    if not _is_tracer(dout, q, k, v, seed, out, lse):
        return tuple(api.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                                  deterministic=deterministic, dropout_p=dropout_p, seed=_seed_int(seed, dropout_p)))
    import jax
    import jax.numpy as jnp

    results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    run = _buffer_callback(_backward_callback, results, softmax_scale=softmax_scale, causal=causal,
                           deterministic=deterministic, dropout_p=dropout_p)
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


def _forward_callback(ctx, results, q, k, v, seed, *, softmax_scale, causal, dropout_p):
    """Runs when XLA executes the forward: O is written into XLA's result buffer in place; lse
    is copied into its buffer on the same stream. A traced dropout seed is read on the host (a
    wait on XLA's stream)."""
    out, lse = results
    with _on_xla_stream(ctx, q):
        o_view, lse_view = _cupy_view(out), _cupy_view(lse)
        seed = _seed_int(_cupy_view(seed), dropout_p)
        _, lse_new = api.forward(*(_cupy_view(x) for x in (q, k, v)), softmax_scale=softmax_scale, causal=causal,
                                 out=o_view, dropout_p=dropout_p, seed=seed)
        lse_view[...] = lse_new


def _backward_callback(ctx, results, dout, q, k, v, seed, out, lse, *, softmax_scale, causal, deterministic,
                       dropout_p):
    """Runs when XLA executes the backward: dq, dk, dv are copied into XLA's result buffers on
    XLA's stream."""
    with _on_xla_stream(ctx, q):
        seed = _seed_int(_cupy_view(seed), dropout_p)
        grads = api.backward(*(_cupy_view(x) for x in (dout, q, k, v, out, lse)), softmax_scale=softmax_scale,
                             causal=causal, deterministic=deterministic, dropout_p=dropout_p, seed=seed)
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
