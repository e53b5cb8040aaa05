"""Public entry points: validate, bring arrays in (zero-copy), launch, hand results back."""
import itertools
import os
import time

from . import autograd, dropout, interop, plan, validate
from .backward import launch_backward
from .forward import launch_forward


def forward(q, k, v, softmax_scale=None, causal=False, out=None, tile=None, *, dropout_p=0.0, seed=None, offset=0):
    """Exact attention O = softmax(Q K^T * scale [+ causal mask]) V and its log-sum-exp.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), with
    nheads a multiple of nheads_k (MQA/GQA). CuPy, PyTorch or JAX CUDA arrays in float16 or
    bfloat16; only the last dimension must be contiguous. causal=True aligns the mask to the
    bottom-right corner: query i sees key j iff j <= i + seqlen_k - seqlen_q.

    Returns (o, lse) in the caller's framework: o like q, lse float32 (batch, nheads, seqlen_q)
    in natural log; a query row that sees no key gets o = 0 and lse = -inf. `out` receives O if
    given. `tile` overrides the tile table, for tuning: a plan.FwdTile runs the portable kernel, a
    plan.HopperFwdTile the sm_90a one (which compute capability 9.0 gets by default; the
    environment variable CUFLASH_PORTABLE=1 turns that off). No autograd is recorded:
    flash_attn_func is the differentiable entry.

    dropout_p in [0, 1) drops entries of P with the keep mask of (seed, offset) (an int seed is
    then required; dropout_mask materialises the same mask) and scales the kept ones by
    1 / (1 - dropout_p); lse stays that of the undropped P. backward needs the same three values.
    """
    q_info, k_info, v_info = (interop.describe(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    validate.check_qkv(q_info, k_info, v_info)
    causal = validate.flag("causal", causal)
    dropout_p = validate.dropout_p(dropout_p)
    seed, offset = validate.seed(seed, dropout_p), validate.offset(offset)
    batch, seqlen_q, nheads, head_dim = q_info.shape
    scale = validate.softmax_scale(softmax_scale, head_dim)
    if out is not None:
        out_info = interop.describe(out, "out")
        validate.check_out(out_info, q_info)
    plan.forward_variant(q_info.dtype, head_dim, causal, tile, dropout=dropout_p > 0)  # a bad `tile` raises here

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
            # cp.async moves 16-byte rows: the rare view whose rows are not 16-byte aligned is copied.
            operands = [(x, info) if validate.is_aligned(info) else interop.contiguous_copy(x, info)
                        for x, info in operands]
            launch_forward(*(info for _, info in operands), o_info, lse_info, scale, causal, empty, stream, tile,
                           dropout_p, seed, offset)
    return interop.export(native_o, q_info.framework), interop.export(native_lse, q_info.framework)


def backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False, deterministic=False, tile=None, *,
             dropout_p=0.0, seed=None, offset=0):
    """Gradients (dq, dk, dv) of attention, from the forward's inputs, output and lse.

    dout and out are shaped like q; lse is the forward's float32 (batch, nheads, seqlen_q).
    dk and dv are summed over each group of query heads that shares a kv head (MQA/GQA).
    deterministic=True uses no floating-point atomics, so repeated calls give bitwise-equal
    gradients (dQ then takes a second pass over K and V). `tile` (a plan.BwdTile) overrides the
    tile table. dropout_p, seed and offset must be the forward's: the kernels regenerate its
    keep mask. Results come back in the caller's framework.
    """
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
    batch, seqlen_q, nheads, head_dim = q_info.shape
    scale = validate.softmax_scale(softmax_scale, head_dim)
    plan.backward_variant(q_info.dtype, head_dim, causal, deterministic, tile, dropout=dropout_p > 0)

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
                            stream, tile, dropout_p, seed, offset)
    return tuple(interop.export(native, q_info.framework) for native in (native_dq, native_dk, native_dv))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_lse=False,
                    deterministic=False, seed=None):
    """flash-attn 2 compatible entry: returns O, or (O, lse) with return_lse=True.

    Differentiable with respect to q, k and v for torch tensors (torch.autograd, torch.compile)
    and JAX arrays (jax.grad, jax.jit); lse is not differentiable (a gradient reaching it raises).
    deterministic=True makes the backward bitwise reproducible. CuPy arrays get the forward only.

    Dropout (dropout_p > 0) draws its mask from `seed`, or without one: for torch tensors from
    torch's CUDA generator (so torch.manual_seed reproduces a run and each call draws a new
    mask), for CuPy arrays from a fresh random seed. JAX callers pass the seed: an int, or an
    integer JAX array of shape () or (2,) (e.g. jax.random.key_data(key)), traced under jit.
    """
    dropout_p = validate.dropout_p(dropout_p)
    causal = validate.flag("causal", causal)
    deterministic = validate.flag("deterministic", deterministic)
    o, lse = autograd.attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed)
    return (o, lse) if return_lse else o


def dropout_mask(q, k, dropout_p, seed, offset=0):
    """The keep mask that forward/backward with these (dropout_p, seed, offset) apply, as a bool
    (batch, nheads, seqlen_q, seqlen_k) array in q's framework and on its device: entry
    (b, h, i, j) is True iff P[b, h, i, j] is kept. For tests and debugging (it is seqlen_q x
    seqlen_k, what attention itself never stores); q and k give the shapes and the device."""
    q_info, k_info = interop.describe(q, "q"), interop.describe(k, "k")
    for name, info in (("q", q_info), ("k", k_info)):
        if len(info.shape) != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seqlen, nheads, headdim); got shape {info.shape}")
    validate.check_same_place("k", k_info, q_info)
    dropout_p = validate.dropout_p(dropout_p)
    seed, offset = validate.seed(seed, 1.0), validate.offset(offset)
    batch, seqlen_q, nheads, _ = q_info.shape
    shape = (batch, nheads, seqlen_q, k_info.shape[1])
    with interop.caller_stream(q_info) as stream:
        mask, info = interop.allocator(q_info)(shape, "bool")
        if 0 not in shape:
            dropout.launch_dropout_mask(info, dropout_p, seed, offset, stream)
    return interop.export(mask, q_info.framework)


def warmup(dtypes=plan.DTYPES, head_dims=plan.HEAD_DIM_BUCKETS, causal=(False, True), device=None, *,
           backward=False, dropout=False):
    """Compile, ahead of the first call, the kernels that calls with these dtypes, head dims and
    causal flags get on `device` (default: the current one): the forwards, and with
    backward=True the backwards (deterministic=False) too; dropout=True adds the dropout
    variants. NVRTC runs in one thread per CPU core; compiled kernels go to the kernel cache
    (cuflash.cache_dir()), so later processes load them in milliseconds. Returns the seconds it
    took."""
    from concurrent.futures import ThreadPoolExecutor

    from . import compile as compile_
    from . import device as device_

    device_id = device_.current() if device is None else int(device)
    start = time.perf_counter()
    device_.check_supported(device_id)
    limit, hopper = device_.smem_limit(device_id), device_.use_hopper(device_id)
    programs = set()
    for dtype, head_dim, is_causal, drop in itertools.product(dtypes, head_dims, causal, {False, bool(dropout)}):
        variant = plan.forward_variant(dtype, head_dim, is_causal, smem_limit=limit, dropout=drop, hopper=hopper)
        programs.add(compile_.forward_program(variant))
        if backward:
            try:
                variant = plan.backward_variant(dtype, head_dim, is_causal, False, smem_limit=limit, dropout=drop,
                                                hopper=hopper)
            except ValueError:  # a head dim whose backward does not fit this GPU (d > 192 on 99 KB)
                continue
            programs.add(compile_.backward_program(variant))
    capability = device_.compute_capability(device_id)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda p: compile_.binary(p, compile_.arch_for(p, capability)), programs))
    for program in programs:
        for name in program.names:
            compile_.get_function(program, device_id, name)
    return time.perf_counter() - start
