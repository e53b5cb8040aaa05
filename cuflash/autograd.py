"""Autograd: cuflash's forward and backward as one differentiable operation, for PyTorch and JAX.

PyTorch: two torch.library custom ops, cuflash::flash_fwd (q, k, v -> out, lse) and
cuflash::flash_bwd (dout, q, k, v, out, lse -> dq, dk, dv), each with a fake implementation
(shapes, dtypes, devices) so that torch.compile keeps it as one node of the graph, and an
autograd formula on flash_fwd that calls flash_bwd. They are registered on first use, or when
cuflash is imported after torch, so cuflash itself imports without torch.

JAX: a jax.custom_vjp over the same pair. Concrete arrays go through cuflash.forward and
cuflash.backward (DLPack, zero-copy). Under jax.jit, vmap and other tracing transformations the
arrays are tracers, and the kernels run inside jax.experimental.buffer_callback: XLA calls a
Python function at run time with its device buffers and its stream, and cuflash launches on that
stream, reading XLA's buffers in place; no array crosses the host.

Gradients flow from O. lse is returned for inspection: a gradient that reaches lse raises
NotImplementedError instead of being dropped.
"""
import contextlib
import functools
import math
import sys
import threading

from . import api, interop, validate

LSE_GRAD_MESSAGE = ("cuflash does not differentiate through lse yet: a gradient reached the lse output "
                    "(detach it, or use jax.lax.stop_gradient, if it only feeds a metric)")


def attention(q, k, v, softmax_scale, causal, deterministic):
    """(o, lse) of flash_attn_func for torch tensors and JAX arrays, differentiable with respect
    to q, k and v; validated before anything is launched. CuPy arrays are not differentiable:
    they go to api.forward directly."""
    framework = interop._framework(q)
    if framework == "torch":
        return _torch_attention(q, k, v, softmax_scale, causal, deterministic)
    if framework == "jax":
        return _jax_attention(q, k, v, softmax_scale, causal, deterministic)
    return api.forward(q, k, v, softmax_scale=softmax_scale, causal=causal)


# --- PyTorch -------------------------------------------------------------------------------------

_torch_lock = threading.Lock()
_torch_registered = False


def register_torch_ops():
    """Register cuflash::flash_fwd and cuflash::flash_bwd with torch.library (once; imports torch).

    flash_fwd(q, k, v, float softmax_scale, bool causal, bool deterministic) -> (out, lse)
    flash_bwd(dout, q, k, v, out, lse, float softmax_scale, bool causal, bool deterministic)
        -> (dq, dk, dv)
    softmax_scale is a resolved float (no None); deterministic is carried by flash_fwd for its
    backward. Returns True."""
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
        schema="(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, bool deterministic)"
               " -> (Tensor, Tensor)")
    def flash_fwd(q, k, v, softmax_scale, causal, deterministic):
        return api.forward(q.detach(), k.detach(), v.detach(), softmax_scale=softmax_scale, causal=causal)

    @flash_fwd.register_fake
    def _(q, k, v, softmax_scale, causal, deterministic):
        check_torch(q, k, v)
        batch, seqlen_q, nheads, _ = q.shape
        # out (batch, seqlen_q, nheads, d) like q, C-contiguous; lse float32 (batch, nheads, seqlen_q)
        return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)

    @torch.library.custom_op(
        "cuflash::flash_bwd", mutates_args=(), device_types="cuda",
        schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale,"
               " bool causal, bool deterministic) -> (Tensor, Tensor, Tensor)")
    def flash_bwd(dout, q, k, v, out, lse, softmax_scale, causal, deterministic):
        arrays = (x.detach() for x in (dout, q, k, v, out, lse))
        return tuple(api.backward(*arrays, softmax_scale=softmax_scale, causal=causal, deterministic=deterministic))

    @flash_bwd.register_fake
    def _(dout, q, k, v, out, lse, softmax_scale, causal, deterministic):
        # dq like q, dk and dv like k and v (summed over each GQA group), C-contiguous
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, softmax_scale, causal, deterministic = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal, ctx.deterministic = softmax_scale, causal, deterministic
        # Unused outputs get None rather than zeros: a gradient on lse is then detectable.
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        if dlse is not None:
            raise NotImplementedError(LSE_GRAD_MESSAGE)
        if dout is None:
            return None, None, None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:  # e.g. the stride-0 gradient of out.sum()
            dout = dout.contiguous()
        dq, dk, dv = torch.ops.cuflash.flash_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal,
                                                 ctx.deterministic)
        # The kernel computes all three in one pass; autograd receives only those it asked for.
        needs = ctx.needs_input_grad
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None

    flash_fwd.register_autograd(backward, setup_context=setup_context)


def check_torch(q, k, v):
    """validate.check_qkv on torch tensors' metadata only (no data pointer), so it also runs on
    the fake tensors torch.compile traces with; tensors on neither CUDA nor the meta device
    (shape inference) raise TypeError."""
    infos = []
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if x.device.type not in ("cuda", "meta"):
            raise TypeError(f"{name} must be a CUDA tensor; got a torch tensor on {x.device}")
        infos.append(interop.ArrayInfo("torch", tuple(x.shape), tuple(x.stride()),
                                       str(x.dtype).removeprefix("torch."), x.device.index, 0))
    validate.check_qkv(*infos)


def _torch_attention(q, k, v, softmax_scale, causal, deterministic):
    import torch

    register_torch_ops()
    if not torch.compiler.is_compiling():
        check_torch(q, k, v)  # while compiling, flash_fwd's fake implementation checks instead
    scale = validate.softmax_scale(softmax_scale, int(q.shape[-1]))
    return torch.ops.cuflash.flash_fwd(q, k, v, scale, causal, deterministic)


if "torch" in sys.modules:  # torch is there already: registering costs nothing more
    register_torch_ops()


# --- JAX -----------------------------------------------------------------------------------------

def _jax_attention(q, k, v, softmax_scale, causal, deterministic):
    infos = [_describe_jax(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    validate.check_qkv(*infos)
    scale = validate.softmax_scale(softmax_scale, infos[0].shape[3])
    return tuple(_jax_custom_vjp()(q, k, v, scale, causal, deterministic))


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

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
    def flash(q, k, v, softmax_scale, causal, deterministic):
        return _jax_forward(q, k, v, softmax_scale, causal)

    def flash_fwd(q, k, v, softmax_scale, causal, deterministic):
        q, k, v = (x.value for x in (q, k, v))  # symbolic_zeros: primals come wrapped
        out, lse = _jax_forward(q, k, v, softmax_scale, causal)
        return (out, lse), (q, k, v, out, lse)

    def flash_bwd(softmax_scale, causal, deterministic, residuals, cotangents):
        dout, dlse = cotangents
        if not isinstance(dlse, SymbolicZero):
            raise NotImplementedError(LSE_GRAD_MESSAGE)
        q, k, v, out, lse = residuals
        if isinstance(dout, SymbolicZero):
            return tuple(jax.numpy.zeros_like(x) for x in (q, k, v))
        return _jax_backward(dout.astype(q.dtype), q, k, v, out, lse, softmax_scale, causal, deterministic)

    flash.defvjp(flash_fwd, flash_bwd, symbolic_zeros=True)
    return flash


def _jax_forward(q, k, v, softmax_scale, causal):
    if not _is_tracer(q, k, v):
        return api.forward(q, k, v, softmax_scale=softmax_scale, causal=causal)
    import jax
    import jax.numpy as jnp

    batch, seqlen_q, nheads, _ = q.shape
    results = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, nheads, seqlen_q), jnp.float32))
    return tuple(_buffer_callback(_forward_callback, results, softmax_scale=softmax_scale, causal=causal)(q, k, v))


def _jax_backward(dout, q, k, v, out, lse, softmax_scale, causal, deterministic):
    if not _is_tracer(dout, q, k, v, out, lse):
        return tuple(api.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                                  deterministic=deterministic))
    import jax

    results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    run = _buffer_callback(_backward_callback, results, softmax_scale=softmax_scale, causal=causal,
                           deterministic=deterministic)
    return tuple(run(dout, q, k, v, out, lse))


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


def _forward_callback(ctx, results, q, k, v, *, softmax_scale, causal):
    """Runs when XLA executes the forward: O is written into XLA's result buffer in place; lse
    is copied into its buffer on the same stream."""
    out, lse = results
    with _on_xla_stream(ctx, q):
        o_view, lse_view = _cupy_view(out), _cupy_view(lse)
        _, lse_new = api.forward(*(_cupy_view(x) for x in (q, k, v)), softmax_scale=softmax_scale, causal=causal,
                                 out=o_view)
        lse_view[...] = lse_new


def _backward_callback(ctx, results, dout, q, k, v, out, lse, *, softmax_scale, causal, deterministic):
    """Runs when XLA executes the backward: dq, dk, dv are copied into XLA's result buffers on
    XLA's stream."""
    with _on_xla_stream(ctx, q):
        grads = api.backward(*(_cupy_view(x) for x in (dout, q, k, v, out, lse)), softmax_scale=softmax_scale,
                             causal=causal, deterministic=deterministic)
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
