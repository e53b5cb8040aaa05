"""PyTorch adapter: flash_attn_func on torch tensors, differentiable, eager and under torch.compile.

Under torch.compile the attention is two torch.library custom ops, cuflash::flash_fwd (q, k, v ->
out, lse, rng_state) and cuflash::flash_bwd (dout, q, k, v, out, lse, rng_state -> dq, dk, dv),
each with a fake implementation (shapes, dtypes, devices) so that the graph keeps it as one node,
and an autograd formula on flash_fwd that calls flash_bwd. They are registered on first use, or
when cuflash is imported after torch, so cuflash itself imports without torch.

Eager calls skip the dispatcher, whose Python custom-op layer costs ~100 us a call: a tensor
signature (shapes, strides, dtypes, devices, flags) seen before maps to its validated
ForwardPlan, so such a call allocates O and lse and launches (EagerAttention, a
torch.autograd.Function, when a gradient is wanted). Both paths share the autograd formula
(_gradients) and reach the kernels through cuflash/ops.py.

Dropout: the forward's (seed, offset) travel to the backward with the residuals (rng_state, a
CPU int64 tensor under torch.compile, drawn from torch's CUDA generator at run time so compiled
graphs draw a new mask per call). Gradients flow from O; a gradient that reaches lse raises
NotImplementedError instead of being dropped.
"""
import sys
import threading

from . import dropout, interop, ops, validate, work_counters
from .forward_launch import launch_forward

def attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap=0.0):
    """(o, lse) of flash_attn_func for torch tensors (flags validated by the caller)."""
    if not _torch_registered:
        register_torch_ops()
    torch = sys.modules["torch"]
    if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        check_torch(q, k, v)  # a TypeError that names the argument
    if torch.compiler.is_compiling():  # flash_fwd's fake implementation checks the tensors
        scale = validate.softmax_scale(softmax_scale, int(q.shape[-1]))
        seed = None if seed is None else _signed64(validate.seed(seed, dropout_p))  # the schema's int is signed
        out, lse, _ = torch.ops.cuflash.flash_fwd(q, k, v, scale, causal, deterministic, dropout_p, seed, softcap)
        return out, lse
    if (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled():
        return EagerAttention.apply(q, k, v, (softmax_scale, causal, deterministic, dropout_p, seed, softcap))
    out, lse, _ = _forward(q, k, v, softmax_scale, causal, dropout_p, seed, softcap)
    return out, lse


# --- eager ---------------------------------------------------------------------------------------

_signatures = ops.keep_plans_in({})  # tensor signature -> (ForwardPlan, device index, O and lse templates), validated


def _forward(q, k, v, softmax_scale, causal, dropout_p, seed, softcap):
    """(out, lse, (seed, offset)) of an eager call: a known signature with 16-byte aligned
    tensors on the current device is launched straight from its plan; anything else goes
    through ops.forward, which validates it (and raises for bad input) and plans it."""
    offset = 0
    if seed is not None:
        seed = validate.seed(seed, dropout_p)
    elif dropout_p > 0:
        seed, offset = dropout.torch_seed_offset(q.device.index)
    else:
        seed = 0
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device,
           v.device, softmax_scale, causal, dropout_p, softcap)  # all a plan depends on, read without validating
    known = _signatures.get(key)
    ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr())
    if known is not None and not (ptrs[0] | ptrs[1] | ptrs[2]) & 15:
        torch = sys.modules["torch"]
        fplan, index, out_like, lse_like = known
        if index == torch._C._cuda_getDevice():
            out, lse = torch.empty_like(out_like), torch.empty_like(lse_like)
            stream = torch._C._cuda_getCurrentRawStream(index)
            counter = 0
            if fplan.maps:
                counter = work_counters.take(index, stream)
                if not counter:  # a graph capture: zeroed in the graph
                    counter = torch.zeros(1, dtype=torch.int32, device=q.device).data_ptr()
            launch_forward(fplan, *ptrs, out.data_ptr(), lse.data_ptr(), stream, seed, offset, counter)
            return out, lse, (seed, offset)
    out, lse = ops.forward(q.detach(), k.detach(), v.detach(), softmax_scale=softmax_scale, causal=causal,
                           dropout_p=dropout_p, seed=seed, offset=offset, softcap=softcap)
    if not (ptrs[0] | ptrs[1] | ptrs[2]) & 15:
        _remember(key, q, k, v, out, softmax_scale, causal, dropout_p, softcap)
    return out, lse, (seed, offset)


def _remember(key, q, k, v, out, softmax_scale, causal, dropout_p, softcap):
    """Keep the plan of a validated, non-empty, 16-byte aligned call for its signature."""
    if 0 in q.shape or 0 in k.shape:
        return
    infos = [interop.describe(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"), (out, "out"))]
    if not all(validate.is_aligned(info) for info in infos):
        return
    scale = validate.softmax_scale(softmax_scale, infos[0].shape[3])
    fplan = ops.forward_plan(*infos, scale, causal, dropout_p, softcap=validate.softcap(softcap))
    batch, seqlen_q, nheads, _ = q.shape
    # Templates of O and lse: stride-0 views of 4 bytes, whose empty_like is C-contiguous memory of
    # their shape and dtype, allocated in half the host time of new_empty(shape, dtype=...).
    out_like = out.new_empty((1,)).expand(q.shape)
    lse_like = out.new_empty((1,), dtype=sys.modules["torch"].float32).expand(batch, nheads, seqlen_q)
    ops.remember_plan(_signatures, key, (fplan, q.device.index, out_like, lse_like))


def _eager_class():
    import torch

    class EagerAttention(torch.autograd.Function):
        """flash_attn_func's autograd node in eager mode: the forward of _forward, the
        backward of _gradients."""

        @staticmethod
        def forward(ctx, q, k, v, flags):  # flags in one argument: apply's cost grows with their count
            softmax_scale, causal, deterministic, dropout_p, seed, softcap = flags
            out, lse, rng = _forward(q, k, v, softmax_scale, causal, dropout_p, seed, softcap)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.flags, ctx.rng = flags, rng
            ctx.set_materialize_grads(False)
            return out, lse

        @staticmethod
        def backward(ctx, dout, dlse):
            softmax_scale, causal, deterministic, dropout_p, _, softcap = ctx.flags

            def run(dout, q, k, v, out, lse):
                return ops.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                                    deterministic=deterministic, dropout_p=dropout_p, seed=ctx.rng[0],
                                    offset=ctx.rng[1], softcap=softcap)

            return _gradients(ctx, dout, dlse, ctx.saved_tensors, run) + (None,)

    return EagerAttention


def _gradients(ctx, dout, dlse, saved, run):
    """(dq, dk, dv) of the autograd formula shared by both paths: `run(dout, q, k, v, out, lse)`
    computes the three in one pass; autograd receives only those it asked for."""
    if dlse is not None:
        raise NotImplementedError(validate.LSE_GRAD_MESSAGE)
    if dout is None:
        return (None,) * 3
    q, k, v, out, lse = saved[:5]
    if dout.stride(-1) != 1:  # e.g. the stride-0 gradient of out.sum()
        dout = dout.contiguous()
    dq, dk, dv = run(dout, q, k, v, out, lse)
    needs = ctx.needs_input_grad
    return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None


# --- torch.compile -------------------------------------------------------------------------------

_torch_lock = threading.Lock()
_torch_registered = False
EagerAttention = None


def register_torch_ops():
    """Register cuflash::flash_fwd and cuflash::flash_bwd with torch.library, and build the eager
    autograd node (once; imports torch).

    flash_fwd(q, k, v, float softmax_scale, bool causal, bool deterministic, float dropout_p, int? seed,
              float softcap=0.0) -> (out, lse, rng_state)
    flash_bwd(dout, q, k, v, out, lse, float softmax_scale, bool causal, bool deterministic,
              float dropout_p, rng_state, float softcap=0.0) -> (dq, dk, dv)
    softmax_scale is a resolved float (no None); deterministic is carried by flash_fwd for its
    backward; rng_state is the CPU int64 pair (seed, offset) the forward's dropout used (seed as a
    signed 64-bit value; torch's generator when seed is None). Returns True."""
    global _torch_registered, EagerAttention
    if not _torch_registered:
        with _torch_lock:
            if not _torch_registered:
                import torch

                if not hasattr(torch.ops.cuflash, "flash_fwd"):  # a reloaded module: keep the ops there
                    _define_torch_ops()
                EagerAttention = _eager_class()
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
               " float dropout_p, int? seed, float softcap=0.0) -> (Tensor, Tensor, Tensor)")
    def flash_fwd(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap=0.0):
        offset = 0
        if dropout_p > 0 and seed is None:
            seed, offset = dropout.torch_seed_offset(q.device.index)
        seed = 0 if seed is None else seed % 2**64
        out, lse = ops.forward(q.detach(), k.detach(), v.detach(), softmax_scale=softmax_scale, causal=causal,
                               dropout_p=dropout_p, seed=seed, offset=offset, softcap=softcap)
        return out, lse, torch.tensor([_signed64(seed), offset], dtype=torch.int64)

    @flash_fwd.register_fake
    def _(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap=0.0):
        check_torch(q, k, v)
        batch, seqlen_q, nheads, _ = q.shape
        # out (batch, seqlen_q, nheads, d) like q, C-contiguous; lse float32 (batch, nheads, seqlen_q);
        # rng_state (seed, offset) on the host
        return (q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32),
                torch.empty((2,), dtype=torch.int64, device="cpu"))

    @torch.library.custom_op(
        "cuflash::flash_bwd", mutates_args=(), device_types="cuda",
        schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale,"
               " bool causal, bool deterministic, float dropout_p, Tensor rng_state, float softcap=0.0)"
               " -> (Tensor, Tensor, Tensor)")
    def flash_bwd(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, dropout_p, rng_state, softcap=0.0):
        arrays = (x.detach() for x in (dout, q, k, v, out, lse))
        seed, offset = rng_state.tolist()
        return tuple(ops.backward(*arrays, softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                                  dropout_p=dropout_p, seed=seed, offset=offset, softcap=softcap))

    @flash_bwd.register_fake
    def _(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, dropout_p, rng_state, softcap=0.0):
        # dq like q, dk and dv like k and v (summed over each GQA group), C-contiguous
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, softmax_scale, causal, deterministic, dropout_p, _, softcap = inputs
        out, lse, rng_state = output
        ctx.save_for_backward(q, k, v, out, lse, rng_state)
        ctx.flags = (softmax_scale, causal, deterministic, dropout_p)
        ctx.softcap = softcap
        # Unused outputs get None rather than zeros: a gradient on lse is then detectable.
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse, _):
        saved = ctx.saved_tensors

        def run(dout, q, k, v, out, lse):
            return torch.ops.cuflash.flash_bwd(dout, q, k, v, out, lse, *ctx.flags, saved[5], ctx.softcap)

        return _gradients(ctx, dout, dlse, saved, run) + (None,) * 6

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


def _signed64(seed):
    """A seed in [0, 2^64) as the signed 64-bit int torch's schemas and int64 tensors hold."""
    return seed - 2**64 if seed >= 2**63 else seed


if "torch" in sys.modules:  # torch is there already: registering costs nothing more
    register_torch_ops()
