"""CPU: merge_states against attention over the union of the key sets (NumPy, float64), and its
argument checks."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cuflash


def masked_attention(q, k, v, visible):
    """(o, lse) of attention (float64) of q (b, sq, h, d) over the keys where visible (sq, sk) is
    True; a row that sees none gets o = 0 and lse = -inf."""
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if s.shape[-1] else np.full(s.shape[:-1] + (1,), -np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)
    lse = np.where(total > 0, np.log(np.where(total > 0, total, 1.0)) + m, -np.inf)[..., 0]
    return np.einsum("bhqk,bkhd->bqhd", p, v), lse


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 2), seqlen_q=st.integers(1, 40), seqlen_k=st.integers(0, 60), parts=st.integers(1, 4),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_merging_parts_is_attention_over_their_union(batch, seqlen_q, seqlen_k, parts, causal, seed):
    """Keys dealt at random into `parts` sets (some empty, none contiguous); under causal with
    seqlen_q > seqlen_k the first rows see no key at all."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seqlen_q, 3, 16))
    k, v = (rng.standard_normal((batch, seqlen_k, 3, 16)) for _ in range(2))
    visible = np.ones((seqlen_q, seqlen_k), bool)
    if causal:
        visible = np.arange(seqlen_k)[None, :] <= np.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    owner = rng.integers(0, parts, seqlen_k)
    pieces = [masked_attention(q, k, v, visible & (owner == i)[None, :]) for i in range(parts)]
    o, lse = cuflash.merge_states([o for o, _ in pieces], [lse.astype(np.float32) for _, lse in pieces])
    o_ref, lse_ref = masked_attention(q, k, v, visible)
    assert o.dtype == np.float64 and lse.dtype == np.float32 and o.shape == q.shape
    np.testing.assert_allclose(lse, lse_ref.astype(np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)  # the weights come from float32 lse
    unseen = ~visible.any(axis=1)
    assert np.all(lse[:, :, unseen] == -np.inf) and np.all(o[:, unseen] == 0)


def test_one_part_is_itself_and_empty_parts_change_nothing():
    rng = np.random.default_rng(0)
    o = rng.standard_normal((2, 5, 3, 8)).astype(np.float16)
    lse = rng.standard_normal((2, 3, 5)).astype(np.float32)
    merged, merged_lse = cuflash.merge_states([o], [lse])
    assert merged.dtype == np.float16 and np.array_equal(merged, o) and np.array_equal(merged_lse, lse)
    empty = np.full_like(lse, -np.inf)
    merged, merged_lse = cuflash.merge_states([o, np.full_like(o, np.nan)], [lse, empty])
    assert np.array_equal(merged, o) and np.array_equal(merged_lse, lse)


def _parts(n=2, shape=(1, 4, 2, 8)):
    batch, seqlen_q, nheads, _ = shape
    return [np.zeros(shape, np.float16)] * n, [np.zeros((batch, nheads, seqlen_q), np.float32)] * n


@pytest.mark.parametrize("change, error, match", [
    (lambda o, l: ([], []), ValueError, "same nonzero length"),
    (lambda o, l: (o, l[:1]), ValueError, "same nonzero length"),
    (lambda o, l: ([o[0], o[1].astype(np.float32)], l), ValueError, r"outs\[1\] must have outs\[0\]'s shape"),
    (lambda o, l: ([o[0], o[1][:, :3]], l), ValueError, r"outs\[1\] must have outs\[0\]'s shape"),
    (lambda o, l: (o, [l[0], l[1][:, :, :3]]), ValueError, r"lses\[1\] must have shape \(batch, nheads, seqlen_q\)"),
    (lambda o, l: (o, [l[0], l[1].astype(np.float64)]), TypeError, r"lses\[1\] must be float32"),
    (lambda o, l: ([o[0][0]] * 2, l), ValueError, r"outs\[0\] must have rank 4"),
    (lambda o, l: ([[1.0]] * 2, l), TypeError, r"outs\[0\] must be a CuPy, PyTorch, JAX or NumPy array"),
    (lambda o, l: (o, [l[0], l[1].tolist()]), TypeError, r"lses\[1\] must be a CuPy"),
], ids=["none", "lengths", "dtype", "shape", "lse shape", "lse dtype", "rank", "list", "lse list"])
def test_bad_parts_are_refused(change, error, match):
    outs, lses = change(*_parts())
    with pytest.raises(error, match=match):
        cuflash.merge_states(outs, lses)
