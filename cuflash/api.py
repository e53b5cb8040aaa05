"""Public entry points. Each validates its flags and hands the arrays to cuflash/ops.py (any
framework, no autograd) or to the autograd adapter of the caller's framework (torch_ops.py,
jax_ops.py)."""
import itertools
import os
import time

from . import compile as compile_
from . import device as device_
from . import dropout, interop, jax_ops, ops, plan, torch_ops, validate


def forward(q, k, v, softmax_scale=None, causal=False, out=None, tile=None, *, dropout_p=0.0, seed=None, offset=0,
            softcap=0.0):
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

    softcap > 0 caps the scores as Gemma 2 does: S = Q K^T * scale becomes softcap * tanh(S /
    softcap) before the mask and the softmax (lse is that of the capped scores).
    """
    return ops.forward(q, k, v, softmax_scale, causal, out, tile, dropout_p=dropout_p, seed=seed, offset=offset,
                       softcap=softcap)


def backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False, deterministic=False, tile=None, *,
             dropout_p=0.0, seed=None, offset=0, softcap=0.0):
    """Gradients (dq, dk, dv) of attention, from the forward's inputs, output and lse.

    dout and out are shaped like q; lse is the forward's float32 (batch, nheads, seqlen_q).
    dk and dv are summed over each group of query heads that shares a kv head (MQA/GQA).
    deterministic=True uses no floating-point atomics, so repeated calls give bitwise-equal
    gradients (dQ then takes a second pass over K and V). `tile` (a plan.BwdTile) overrides the
    tile table. dropout_p, seed, offset and softcap must be the forward's: the kernels regenerate
    its keep mask and its capped scores. Results come back in the caller's framework.
    """
    return ops.backward(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, tile, dropout_p=dropout_p,
                        seed=seed, offset=offset, softcap=softcap)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, return_lse=False, seed=None):
    """flash-attn 2's flash_attn_func, in its positional order: returns O (batch, seqlen_q,
    nheads, headdim) like q; with return_lse=True (O, lse); with return_attn_probs=True (O, lse,
    None), which is what flash-attn returns without dropout.

    Differentiable with respect to q, k and v for torch tensors (torch.autograd, torch.compile)
    and JAX arrays (jax.grad, jax.jit); lse is not differentiable (a gradient reaching it raises).
    deterministic=True makes the backward bitwise reproducible. CuPy arrays get the forward only.
    A head dim that is not a multiple of 8 is zero-padded to one inside, as flash-attn does.
    softcap > 0 caps the scores (softcap * tanh(S / softcap), Gemma 2), forward and backward.
    window_size and alibi_slopes are accepted at their defaults (no window, no bias); other
    values raise NotImplementedError, as does return_attn_probs with dropout (use return_lse and
    cuflash.dropout_mask).

    Dropout (dropout_p > 0) draws its mask from `seed`, or without one: for torch tensors from
    torch's CUDA generator (so torch.manual_seed reproduces a run and each call draws a new
    mask), for CuPy arrays from a fresh random seed. JAX callers pass the seed: an int, or an
    integer JAX array of shape () or (2,) (e.g. jax.random.key_data(key)), traced under jit.
    """
    dropout_p = validate.dropout_p(dropout_p)
    causal = validate.flag("causal", causal)
    deterministic = validate.flag("deterministic", deterministic)
    validate.window_size(window_size)
    softcap = validate.softcap(softcap)
    validate.not_yet("alibi_slopes", alibi_slopes, None)
    if return_attn_probs:
        validate.flag("return_attn_probs", return_attn_probs)
        if dropout_p > 0:
            raise NotImplementedError("return_attn_probs=True with dropout_p > 0: cuflash does not return the "
                                      "dropped attention matrix; use return_lse=True for lse and "
                                      "cuflash.dropout_mask(q, k, dropout_p, seed) for the keep mask")
    head_dim = _last_dim(q)
    if head_dim % 8 and head_dim < plan.MAX_HEAD_DIM and interop.framework_of(q) is not None:
        o, lse = _padded(q, k, v, head_dim, softmax_scale, causal, deterministic, dropout_p, seed, softcap)
    else:
        o, lse = _attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap)
    if return_attn_probs:
        return o, lse, None
    return (o, lse) if validate.flag("return_lse", return_lse) else o


def _attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap):
    """(o, lse) through the autograd adapter of q's framework."""
    framework = interop.framework_of(q)
    if framework == "torch":
        return torch_ops.attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap)
    if framework == "jax":
        return jax_ops.attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap)
    # CuPy arrays (and anything else, which ops.forward refuses by name): no autograd
    if dropout_p > 0 and seed is None:
        seed = dropout.random_seed()
    return ops.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p, seed=seed,
                       softcap=softcap)


def _last_dim(x):
    """x's last axis length, or 0 where x has no 4-d shape (the adapters then say what is wrong)."""
    shape = getattr(x, "shape", None)
    return shape[-1] if shape is not None and len(shape) == 4 else 0


def _padded(q, k, v, head_dim, softmax_scale, causal, deterministic, dropout_p, seed, softcap):
    """_attention with q, k and v zero-padded to the next multiple of 8 in the head dim (the
    kernels move 16-byte rows), and O cut back; the zeros change no score, and the scale stays
    that of the true head dim."""
    width = -head_dim % 8
    if softmax_scale is None:
        softmax_scale = validate.softmax_scale(None, head_dim)
    if _last_dim(k) != head_dim or _last_dim(v) != head_dim:
        raise ValueError(f"k and v must have q's head dim {head_dim}; got {_last_dim(k)} and {_last_dim(v)}")
    q, k, v = (interop.pad_last(x, width) for x in (q, k, v))
    o, lse = _attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed, softcap)
    return o[..., :head_dim], lse


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              return_lse=False, seed=None):
    """flash_attn_func on qkv (batch, seqlen, 3, nheads, headdim) stacked; q, k and v are views
    of it (no copy), and its gradient flows back into it."""
    _check_packed("qkv", qkv, 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, return_lse=return_lse, seed=seed)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             return_lse=False, seed=None):
    """flash_attn_func on q and kv (batch, seqlen_k, 2, nheads_k, headdim) stacked; k and v are
    views of kv (no copy), and its gradient flows back into it."""
    _check_packed("kv", kv, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, return_lse=return_lse, seed=seed)


def _check_packed(name, x, count, layout):
    if interop.framework_of(x) is None:
        raise TypeError(f"{name} must be a CuPy, PyTorch or JAX array; got {type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) != 5 or shape[2] != count:
        raise ValueError(f"{name} must have shape {layout}; got {shape}")


def dropout_mask(q, k, dropout_p, seed, offset=0):
    """The keep mask that forward/backward with these (dropout_p, seed, offset) apply, as a bool
    (batch, nheads, seqlen_q, seqlen_k) array in q's framework and on its device: entry
    (b, h, i, j) is True iff P[b, h, i, j] is kept. For tests and debugging (it is seqlen_q x
    seqlen_k, what attention itself never stores); q and k give the shapes and the device."""
    return ops.dropout_mask(q, k, dropout_p, seed, offset)


def warmup(dtypes=plan.DTYPES, head_dims=plan.HEAD_DIM_BUCKETS, causal=(False, True), device=None, *,
           backward=False, dropout=False, softcap=False):
    """Compile, ahead of the first call, the kernels that calls with these dtypes, head dims and
    causal flags get on `device` (default: the current one): the forwards, and with
    backward=True the backwards (deterministic=False) too; dropout=True adds the dropout
    variants, softcap=True the softcap ones. NVRTC runs in one thread per CPU core; compiled
    kernels go to the kernel cache (cuflash.cache_dir()), so later processes load them in
    milliseconds. Returns the seconds it took."""
    device_id = device_.current() if device is None else int(device)
    start = time.perf_counter()
    compile_.check_supported(device_id)
    limit, hopper = device_.smem_limit(device_id), device_.use_hopper(device_id)
    programs = set()
    for dtype, head_dim, is_causal, drop, cap in itertools.product(dtypes, head_dims, causal, {False, bool(dropout)},
                                                                   {False, bool(softcap)}):
        variant = plan.forward_variant(dtype, head_dim, is_causal, smem_limit=limit, dropout=drop, hopper=hopper,
                                       softcap=cap)
        programs.add(compile_.forward_program(variant))
        if backward:
            try:
                variant = plan.backward_variant(dtype, head_dim, is_causal, False, smem_limit=limit, dropout=drop,
                                                hopper=hopper, softcap=cap)
            except ValueError:  # a head dim whose backward does not fit this GPU (d > 192 on 99 KB)
                continue
            programs.add(compile_.backward_program(variant))
    compile_.compile_all(programs, device_.compute_capability(device_id), os.cpu_count())
    for program in programs:
        for name in program.names:
            compile_.get_function(program, device_id, name)
    return time.perf_counter() - start
