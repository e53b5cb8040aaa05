"""merge_states: attention over a union of disjoint key sets, from the attention over each set.

If (O_i, lse_i) is attention over key set K_i (lse natural log; -inf for a row that sees none of
K_i), attention over the union is exactly

    lse = log(sum_i exp(lse_i))        O = sum_i exp(lse_i - lse) O_i

since each O_i is the softmax-weighted mean of its own values and exp(lse_i) its row's share of
the softmax denominator. Split-KV decoding, shared-prefix (cascade) inference and context
parallelism combine their parts this way. The arithmetic runs in float32 with the caller's
framework (torch, CuPy, JAX or NumPy), so it differentiates where that framework does.
"""
import math

from . import interop


def merge_states(outs, lses):
    """(O, lse) of attention over the union of disjoint key sets, from each set's (O_i, lse_i).

    outs: a sequence of n >= 1 arrays (batch, seqlen_q, nheads, headdim), one per key set, of one
    shape and dtype; lses: their float32 log-sum-exps (batch, nheads, seqlen_q), as forward and
    flash_attn_func(return_lse=True) return them. A row that sees no key of a set has lse_i = -inf
    (and any O_i row); a row that sees no key of any set gets O = 0 and lse = -inf. Returns O in
    the parts' dtype and lse float32, in their framework."""
    outs, lses = list(outs), list(lses)
    ops = _check(outs, lses)
    stacked = ops.stack([ops.float32(x) for x in lses])  # (n, batch, nheads, seqlen_q)
    m = ops.max0(stacked)
    m = ops.where(ops.isfinite(m), m, 0.0)  # rows that see no key anywhere: no inf - inf
    weights = ops.exp(stacked - m)
    total = ops.sum0(weights)
    seen = total > 0
    total = ops.where(seen, total, 1.0)
    lse = ops.where(seen, ops.log(total) + m, -math.inf)
    weights = weights / total
    out = None
    for i, part in enumerate(outs):
        weight = ops.rows_last(weights[i])  # (b, h, s) -> (b, s, h, 1)
        term = ops.where(weight > 0, weight * ops.float32(part), 0.0)  # an unseen row's O_i may be anything
        out = term if out is None else out + term
    return ops.cast_like(out, outs[0]), lse


def _check(outs, lses):
    """The array operations of the parts' framework, once the parts are checked."""
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be sequences of the same nonzero length; got {len(outs)} and {len(lses)}")
    ops = _Ops.of(outs[0], "outs[0]")
    shape, dtype = tuple(outs[0].shape), str(outs[0].dtype)
    if len(shape) != 4:
        raise ValueError(f"outs[0] must have rank 4 (batch, seqlen_q, nheads, headdim); got shape {shape}")
    batch, seqlen_q, nheads, _ = shape
    for i, (out, lse) in enumerate(zip(outs, lses)):
        for name, x in ((f"outs[{i}]", out), (f"lses[{i}]", lse)):
            if _Ops.of(x, name).framework != ops.framework:
                raise TypeError(f"{name} must come from outs[0]'s framework {ops.framework}")
        if tuple(out.shape) != shape or str(out.dtype) != dtype:
            raise ValueError(f"outs[{i}] must have outs[0]'s shape {shape} and dtype {dtype}; got {tuple(out.shape)} {out.dtype}")
        if tuple(lse.shape) != (batch, nheads, seqlen_q):
            raise ValueError(f"lses[{i}] must have shape (batch, nheads, seqlen_q) = {(batch, nheads, seqlen_q)}; "
                             f"got {tuple(lse.shape)}")
        if str(lse.dtype).removeprefix("torch.") != "float32":
            raise TypeError(f"lses[{i}] must be float32; got {lse.dtype}")
    return ops


class _Ops:
    """The few array operations merge_states needs, in one framework's spelling."""

    def __init__(self, framework, xp):
        self.framework, self.xp = framework, xp

    @classmethod
    def of(cls, x, name):
        framework = interop.framework_of(x)
        if framework is None and type(x).__module__ == "numpy":
            framework = "numpy"
        if framework == "torch":
            import torch as xp
        elif framework == "jax":
            import jax.numpy as xp
        elif framework == "cupy":
            import cupy as xp
        elif framework == "numpy":
            import numpy as xp
        else:
            raise TypeError(f"{name} must be a CuPy, PyTorch, JAX or NumPy array; got {type(x).__name__}")
        return cls(framework, xp)

    def float32(self, x):
        return x.float() if self.framework == "torch" else x.astype(self.xp.float32)

    def cast_like(self, x, like):
        return x.to(like.dtype) if self.framework == "torch" else x.astype(like.dtype)

    def stack(self, xs):
        return self.xp.stack(xs)

    def max0(self, x):
        return self.xp.amax(x, dim=0) if self.framework == "torch" else x.max(axis=0)

    def sum0(self, x):
        return x.sum(0) if self.framework == "torch" else x.sum(axis=0)

    def where(self, condition, x, y):
        return self.xp.where(condition, x, y)

    def isfinite(self, x):
        return self.xp.isfinite(x)

    def exp(self, x):
        return self.xp.exp(x)

    def log(self, x):
        return self.xp.log(x)

    def rows_last(self, w):
        """(batch, nheads, seqlen_q) -> (batch, seqlen_q, nheads, 1)."""
        w = w.movedim(1, 2) if self.framework == "torch" else self.xp.moveaxis(w, 1, 2)
        return w[..., None]
