"""The forward and backward on any framework's arrays: describe (interop), validate, plan, launch
on the caller's stream, hand results back. Each argument is validated once per call; a forward's
plan (forward_launch.ForwardPlan) is kept per signature, so a repeated shape is planned once.
The public entry points (api.py) and the autograd adapters (torch_ops.py, jax_ops.py) call these.
"""
import threading

from . import compile as compile_
from . import device, dropout, interop, validate, work_counters
from .backward_launch import launch_backward
from .forward_launch import launch_forward, plan_forward

PLAN_CACHE_SIZE = 1024  # signatures kept per cache; the oldest goes first past this
_plans = {}
_plans_lock = threading.Lock()
_plan_caches = [_plans]  # with the adapters' caches of plans by their own signatures


def keep_plans_in(cache):
    """Register an adapter's dict of plans, for remember_plan and clear_plan_cache."""
    _plan_caches.append(cache)
    return cache


def remember_plan(cache, key, value):
    """Store a plan in one of the caches, forgetting its oldest entry when it is full."""
    with _plans_lock:
        if len(cache) >= PLAN_CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[key] = value


def clear_plan_cache():
    """Forget every kept plan (they hold grids sized by the device's SM count)."""
    with _plans_lock:
        for cache in _plan_caches:
            cache.clear()


def forward_plan(q, k, v, o, softmax_scale, causal, dropout_p, tile=None, softcap=0.0):
    """The ForwardPlan of validated, aligned, non-empty arrays described by q, k, v, o (on q's
    device), from the cache when this signature was planned before."""
    key = (q.shape, q.strides, k.shape, k.strides, v.shape, v.strides, o.strides, q.dtype, q.device, softmax_scale,
           causal, dropout_p, tile, device.use_hopper(q.device), softcap)
    fplan = _plans.get(key)
    if fplan is None:
        fplan = plan_forward(q, k, v, o, softmax_scale, causal, dropout_p, q.device, tile, softcap)
        remember_plan(_plans, key, fplan)
    return fplan


def forward(q, k, v, softmax_scale=None, causal=False, out=None, tile=None, *, dropout_p=0.0, seed=None, offset=0,
            softcap=0.0):
    """api.forward (its docstring says what it computes), on any supported framework's arrays."""
    q_info, k_info, v_info = (interop.describe(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    validate.check_qkv(q_info, k_info, v_info)
    causal = validate.flag("causal", causal)
    dropout_p = validate.dropout_p(dropout_p)
    seed, offset = validate.seed(seed, dropout_p), validate.offset(offset)
    softcap = validate.softcap(softcap)
    batch, seqlen_q, nheads, head_dim = q_info.shape
    scale = validate.softmax_scale(softmax_scale, head_dim)
    if out is not None:
        out_info = interop.describe(out, "out")
        validate.check_out(out_info, q_info)
    validate.tile(tile, q_info.dtype, head_dim, causal, dropout_p > 0)

    compile_.check_supported(q_info.device)
    with interop.caller_stream(q_info) as stream:
        empty = interop.allocator(q_info)
        native_o, o_info = empty(q_info.shape, q_info.dtype) if out is None else (out, out_info)
        native_lse, lse_info = empty((batch, nheads, seqlen_q), "float32")
        if 0 in q_info.shape:
            pass
        elif k_info.shape[1] == 0:
            interop.fill(native_o, 0)
            interop.fill(native_lse, float("-inf"))
        else:
            operands = [interop.launchable(x, info) for x, info in ((q, q_info), (k, k_info), (v, v_info))]
            # cp.async and TMA move 16-byte rows: the rare view whose rows are not 16-byte aligned is copied.
            operands = [(x, info) if validate.is_aligned(info) else interop.contiguous_copy(x, info)
                        for x, info in operands]
            q_i, k_i, v_i = (info for _, info in operands)
            fplan = forward_plan(q_i, k_i, v_i, o_info, scale, causal, dropout_p, tile, softcap)
            counter = work_counters.take(q_info.device, stream) if fplan.maps else 0
            if fplan.maps and not counter:
                # A graph capture: the counter is zeroed here, in the graph. `keep` holds it until the
                # kernel is queued; the allocators reuse memory in stream order after that.
                keep, counter_info = empty((1,), "int32")
                interop.fill(keep, 0)
                counter = counter_info.data_ptr
            launch_forward(fplan, q_i.data_ptr, k_i.data_ptr, v_i.data_ptr, o_info.data_ptr, lse_info.data_ptr, stream,
                           seed, offset, counter)
    return interop.export(native_o, q_info.framework), interop.export(native_lse, q_info.framework)


def backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False, deterministic=False, tile=None, *,
             dropout_p=0.0, seed=None, offset=0, softcap=0.0):
    """api.backward (its docstring says what it computes), on any supported framework's arrays."""
    names = ("dout", "q", "k", "v", "out", "lse")
    arrays = (dout, q, k, v, out, lse)
    dout_info, q_info, k_info, v_info, out_info, lse_info = (interop.describe(x, n) for x, n in zip(arrays, names))
    validate.check_qkv(q_info, k_info, v_info)
    validate.check_like("dout", dout_info, q_info)
    validate.check_like("out", out_info, q_info)
    validate.check_lse(lse_info, q_info)
    causal = validate.flag("causal", causal)
    deterministic = validate.flag("deterministic", deterministic)
    dropout_p = validate.dropout_p(dropout_p)
    seed, offset = validate.seed(seed, dropout_p), validate.offset(offset)
    softcap = validate.softcap(softcap)
    scale = validate.softmax_scale(softmax_scale, q_info.shape[3])
    validate.tile(tile, q_info.dtype, q_info.shape[3], causal, dropout_p > 0, deterministic)

    compile_.check_supported(q_info.device)
    with interop.caller_stream(q_info) as stream:
        empty = interop.allocator(q_info)
        (native_dq, dq), (native_dk, dk), (native_dv, dv) = (
            empty(info.shape, info.dtype) for info in (q_info, k_info, v_info))
        if 0 in q_info.shape or 0 in k_info.shape:
            # No query or no key: every gradient that has elements is zero.
            for native in (native_dq, native_dk, native_dv):
                interop.fill(native, 0)
        else:
            operands = [interop.launchable(x, info) for x, info in zip(arrays, (dout_info, q_info, k_info, v_info, out_info))]
            operands = [(x, info) if validate.is_aligned(info) else interop.contiguous_copy(x, info) for x, info in operands]
            lse_array, lse_info = interop.launchable(lse, lse_info)
            if not validate.is_contiguous(lse_info):
                lse_array, lse_info = interop.contiguous_copy(lse_array, lse_info)
            dout_i, q_i, k_i, v_i, out_i = (info for _, info in operands)
            launch_backward(dout_i, q_i, k_i, v_i, out_i, lse_info, dq, dk, dv, scale, causal, deterministic, empty,
                            stream, tile, dropout_p, seed, offset, softcap)
    return tuple(interop.export(native, q_info.framework) for native in (native_dq, native_dk, native_dv))


def dropout_mask(q, k, dropout_p, seed, offset=0):
    """api.dropout_mask, on any supported framework's arrays."""
    q_info, k_info = interop.describe(q, "q"), interop.describe(k, "k")
    for name, info in (("q", q_info), ("k", k_info)):
        if len(info.shape) != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seqlen, nheads, headdim); got shape {info.shape}")
    validate.check_same_place("k", k_info, q_info)
    dropout_p = validate.dropout_p(dropout_p)
    seed, offset = validate.seed(seed, 1.0), validate.offset(offset)
    batch, seqlen_q, nheads, _ = q_info.shape
    shape = (batch, nheads, seqlen_q, k_info.shape[1])
    compile_.check_supported(q_info.device)
    with interop.caller_stream(q_info) as stream:
        mask, info = interop.allocator(q_info)(shape, "bool")
        if 0 not in shape:
            dropout.launch_dropout_mask(info, dropout_p, seed, offset, stream)
    return interop.export(mask, q_info.framework)
