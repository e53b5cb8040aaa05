"""Public entry points. Each validates its flags and hands the arrays to cuflash/ops.py (any
framework, no autograd) or to the autograd adapter of the caller's framework (torch_ops.py,
jax_ops.py)."""
import itertools
import os
import time

from . import compile as compile_
from . import device as device_
from . import dropout, interop, jax_ops, ops, plan, torch_ops, validate


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
    return ops.forward(q, k, v, softmax_scale, causal, out, tile, dropout_p=dropout_p, seed=seed, offset=offset)


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
    return ops.backward(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, tile, dropout_p=dropout_p,
                        seed=seed, offset=offset)


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
    framework = interop.framework_of(q)
    if framework == "torch":
        o, lse = torch_ops.attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed)
    elif framework == "jax":
        o, lse = jax_ops.attention(q, k, v, softmax_scale, causal, deterministic, dropout_p, seed)
    else:  # CuPy arrays (and anything else, which ops.forward refuses by name): no autograd
        if dropout_p > 0 and seed is None:
            seed = dropout.random_seed()
        o, lse = ops.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p, seed=seed)
    return (o, lse) if return_lse else o


def dropout_mask(q, k, dropout_p, seed, offset=0):
    """The keep mask that forward/backward with these (dropout_p, seed, offset) apply, as a bool
    (batch, nheads, seqlen_q, seqlen_k) array in q's framework and on its device: entry
    (b, h, i, j) is True iff P[b, h, i, j] is kept. For tests and debugging (it is seqlen_q x
    seqlen_k, what attention itself never stores); q and k give the shapes and the device."""
    return ops.dropout_mask(q, k, dropout_p, seed, offset)


def warmup(dtypes=plan.DTYPES, head_dims=plan.HEAD_DIM_BUCKETS, causal=(False, True), device=None, *,
           backward=False, dropout=False):
    """Compile, ahead of the first call, the kernels that calls with these dtypes, head dims and
    causal flags get on `device` (default: the current one): the forwards, and with
    backward=True the backwards (deterministic=False) too; dropout=True adds the dropout
    variants. NVRTC runs in one thread per CPU core; compiled kernels go to the kernel cache
    (cuflash.cache_dir()), so later processes load them in milliseconds. Returns the seconds it
    took."""
    device_id = device_.current() if device is None else int(device)
    start = time.perf_counter()
    compile_.check_supported(device_id)
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
    compile_.compile_all(programs, device_.compute_capability(device_id), os.cpu_count())
    for program in programs:
        for name in program.names:
            compile_.get_function(program, device_id, name)
    return time.perf_counter() - start
