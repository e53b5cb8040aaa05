"""Argument checks, run on ArrayInfo descriptions before any memory is touched or kernel launched.

Every failure is a ValueError or TypeError that names the argument and what was expected.
"""
import math
import numbers

from . import plan

SUPPORTED_DTYPES = plan.DTYPES
# What the autograd adapters raise when a gradient reaches lse, which they do not differentiate.
LSE_GRAD_MESSAGE = ("cuflash does not differentiate through lse yet: a gradient reached the lse output "
                    "(detach it, or use jax.lax.stop_gradient, if it only feeds a metric)")


def check_qkv(q, k, v):
    """q (batch, seqlen_q, nheads, headdim); k, v (batch, seqlen_k, nheads_k, headdim)."""
    for name, info in (("q", q), ("k", k), ("v", v)):
        if len(info.shape) != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seqlen, nheads, headdim); got shape {info.shape}")
        if info.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16; got {info.dtype}")
    for name, info in (("k", k), ("v", v)):
        check_same_place(name, info, q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {k.shape} and v {v.shape}")
    batch, _, nheads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k and v must have q's batch size {batch}; got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k and v must have q's head dim {head_dim}; got {k.shape[3]}")
    nheads_k = k.shape[2]
    if nheads_k == 0 or nheads % nheads_k:
        raise ValueError(f"q's nheads ({nheads}) must be a multiple of k/v's nheads ({nheads_k})")
    if head_dim % 8 or not 8 <= head_dim <= plan.MAX_HEAD_DIM:
        raise ValueError(f"headdim must be a multiple of 8 from 8 to {plan.MAX_HEAD_DIM}; got {head_dim}")
    for name, info in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, info)


def check_last_dim_contiguous(name, info):
    if info.shape[-1] > 1 and info.strides[-1] != 1 and 0 not in info.shape:
        raise ValueError(f"{name} must be contiguous in its last (headdim) dimension; got strides {info.strides}")


def check_same_place(name, info, q):
    """`name` must share q's framework, dtype and device."""
    if info.framework != q.framework:
        raise TypeError(f"{name} must come from q's framework {q.framework}; got {info.framework}")
    if info.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}; got {info.dtype}")
    if info.device != q.device:
        raise ValueError(f"{name} must be on q's device cuda:{q.device}; got cuda:{info.device}")


def check_like(name, info, q):
    """`name` must match q's framework, shape, dtype and device, contiguous in its last dim."""
    check_same_place(name, info, q)
    if info.shape != q.shape:
        raise ValueError(f"{name} must have q's shape {q.shape}; got {info.shape}")
    check_last_dim_contiguous(name, info)


def check_lse(lse, q):
    """lse: the forward's float32 log-sum-exp, (batch, nheads, seqlen_q)."""
    batch, seqlen_q, nheads, _ = q.shape
    if lse.framework != q.framework:
        raise TypeError(f"lse must come from q's framework {q.framework}; got {lse.framework}")
    if lse.shape != (batch, nheads, seqlen_q):
        raise ValueError(f"lse must have shape (batch, nheads, seqlen_q) = {(batch, nheads, seqlen_q)}; got {lse.shape}")
    if lse.dtype != "float32":
        raise TypeError(f"lse must be float32; got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on q's device cuda:{q.device}; got cuda:{lse.device}")


def check_out(out, q):
    """out: a preallocated O of q's shape, dtype and device, aligned for 16-byte stores."""
    if out.framework == "jax":
        raise TypeError("out must be a CuPy array or a torch tensor; JAX arrays are immutable")
    check_like("out", out, q)
    if not is_aligned(out):
        raise ValueError("out must start on a 16-byte boundary and have strides that are multiples of 8 elements")


def is_aligned(info):
    """True if every row of 8 elements starts on a 16-byte boundary (cp.async and vector stores)."""
    return info.data_ptr % 16 == 0 and all(s % 8 == 0 for s, n in zip(info.strides[:-1], info.shape[:-1]) if n > 1)


def softmax_scale(value, head_dim):
    """The scale applied to QK^T: 1/sqrt(headdim) by default, else a positive finite number."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"softmax_scale must be a real number or None; got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"softmax_scale must be positive and finite; got {value}")
    return value


def flag(name, value):
    if value is True or value is False:
        return value
    if type(value).__name__ != "bool_":  # NumPy's bool
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return bool(value)


def dropout_p(value):
    if type(value) is float and 0.0 <= value < 1.0:  # the common case, before the ABC checks
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout_p must be a real number; got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {value}")
    return float(value)


def not_yet(name, value, default):
    """Accept a flash-attn argument that cuflash does not compute yet only at its neutral value
    (default); anything else raises NotImplementedError rather than computing something else."""
    if value is default or (default is not None and type(value) is type(default) and value == default):
        return
    raise NotImplementedError(f"{name}={value!r} is not supported by cuflash yet (only {default!r}); "
                              "flash-attn or torch's FlexAttention compute it")


def window_size(value):
    """flash-attn's (left, right) window: -1 means unbounded on that side."""
    if value == (-1, -1) and type(value) in (tuple, list):
        return
    if type(value) not in (tuple, list) or len(value) != 2 or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= -1 for x in value):
        raise TypeError(f"window_size must be a pair of ints >= -1 (left, right); got {value!r}")
    not_yet("window_size", tuple(int(x) for x in value), (-1, -1))


def softcap(value):
    """The logit cap: scores S become softcap * tanh(S / softcap); 0 turns it off."""
    if type(value) is float and 0.0 <= value < math.inf:  # the common case, before the ABC checks
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"softcap must be a finite real number >= 0 (0: off); got {value!r}")
    return float(value)


def is_contiguous(info):
    step = 1
    for size, stride in zip(reversed(info.shape), reversed(info.strides)):
        if size > 1 and stride != step:
            return False
        step *= size
    return True


def seed(value, dropout_p):
    """The dropout seed: an int (taken modulo 2^64); required when dropout_p > 0, since the
    backward must get the forward's."""
    if value is None:
        if dropout_p > 0:
            raise ValueError("seed: dropout_p > 0 needs a seed (an int), and the backward needs the same one")
        return 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be an int; got {type(value).__name__}")
    return int(value) % 2**64


def offset(value):
    """The dropout offset, the Philox counter word that separates calls under one seed: an int
    in [0, 2^64) (the kernels use it modulo 2^32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"offset must be an int; got {type(value).__name__}")
    if not 0 <= int(value) < 2**64:
        raise ValueError(f"offset must be in [0, 2^64); got {value}")
    return int(value)


def tile(value, dtype, head_dim, causal, dropout, deterministic=None):
    """A `tile` override (None, or a tile of cuflash/plan.py) checked before any launch: its type
    picks the kernel family (a forward's when deterministic is None) and its sizes must suit the
    head dim."""
    if value is not None:
        if deterministic is None:
            plan.forward_variant(dtype, head_dim, causal, value, dropout=dropout)
        else:
            plan.backward_variant(dtype, head_dim, causal, deterministic, value, dropout=dropout)
    return value
