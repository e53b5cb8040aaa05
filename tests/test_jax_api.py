"""cuflash.jax.dot_product_attention: on the CPU, that what it does not compute yet raises before
anything runs; on a GPU, the output, the residual and the gradients against a float64 reference
with jax.nn's top-left causal mask (2x rule, the same computation in low precision being
jax.nn.dot_product_attention's own XLA implementation), under jax.jit too."""
import math

import numpy as np
import pytest

from cuflash.jax import dot_product_attention
from helpers import assert_2x


@pytest.mark.parametrize("kwargs", [{"bias": 0}, {"mask": 0}, {"query_seq_lengths": 0},
                                    {"key_value_seq_lengths": 0}, {"local_window_size": (4, 0)}])
def test_what_is_not_computed_yet_raises(kwargs):
    with pytest.raises(NotImplementedError, match=next(iter(kwargs))):
        dot_product_attention(None, None, None, **kwargs)


def test_an_unknown_implementation_raises():
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(None, None, None, implementation="triton")


def reference64(q, k, v, dout, scale, causal):
    """(o, lse (B, T, N), dq, dk, dv) in float64 of softmax(Q K^T * scale) V with jax.nn's
    top-left causal mask (query i sees keys j <= i) and K/V heads shared by groups of query heads."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    group = q.shape[2] // k.shape[2]
    k_, v_ = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k_) * scale
    if causal:
        s = np.where(np.tri(q.shape[1], k.shape[1], dtype=bool), s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    lse = np.log(e.sum(-1)) + m[..., 0]
    p = e / e.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v_)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, v_)
    ds = p * (dp - np.einsum("bqhd,bqhd->bhq", dout, o)[..., None])

    def per_kv_head(x):
        return x.reshape(*x.shape[:2], k.shape[2], group, x.shape[3]).sum(3)

    dq = np.einsum("bhqk,bkhd->bqhd", ds, k_) * scale
    dk = per_kv_head(np.einsum("bhqk,bqhd->bkhd", ds, q)) * scale
    dv = per_kv_head(np.einsum("bhqk,bqhd->bkhd", p, dout))
    return o, lse.transpose(0, 2, 1), dq, dk, dv


SHAPES = [  # batch, T, S, N, K, H
    (2, 97, 97, 4, 2, 64),
    (1, 61, 130, 4, 4, 128),   # T < S: keys past T are seen by no query
    (2, 130, 61, 8, 2, 64),    # T > S: rows past S see every key
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("jit", [False, True])
def test_matches_jax_nn_semantics(jax, shape, causal, dtype, jit):
    jnp = jax.numpy
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim = shape
    keys = jax.random.split(jax.random.key(sum(shape) + causal), 4)
    q, k, v, dout = (jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, [
        (batch, seqlen_q, nheads, head_dim), (batch, seqlen_k, nheads_k, head_dim),
        (batch, seqlen_k, nheads_k, head_dim), (batch, seqlen_q, nheads, head_dim)]))
    scale = 1 / math.sqrt(head_dim)

    def run(attention):
        def loss(q, k, v):
            out, lse = attention(q, k, v, is_causal=causal, return_residual=True)
            return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), (out, lse)

        grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
        grads, (out, lse) = (jax.jit(grad) if jit else grad)(q, k, v)
        return [np.asarray(x.astype(jnp.float32)) for x in (out, lse, *grads)]

    ours = run(dot_product_attention)
    xla = run(lambda *a, **kw: jax.nn.dot_product_attention(*a, implementation="xla", **kw))
    ref = reference64(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v, dout)), scale, causal)
    for name, a, b, r in zip(("o", "lse", "dq", "dk", "dv"), ours, xla, ref):
        assert a.shape == b.shape == r.shape, f"{name}: shape {a.shape}, jax.nn's {b.shape}"
        assert_2x(a, r, b, dtype, name)


@pytest.mark.gpu
def test_unbatched_inputs(jax):
    jnp = jax.numpy
    q, k, v = (jax.random.normal(jax.random.key(i), (37, 2, 64), jnp.float32).astype(jnp.bfloat16) for i in range(3))
    out = dot_product_attention(q, k, v, is_causal=True)
    batched = dot_product_attention(q[None], k[None], v[None], is_causal=True)
    assert out.shape == q.shape and bool(jnp.array_equal(out, batched[0]))
