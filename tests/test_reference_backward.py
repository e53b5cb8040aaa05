"""CPU: the backward reference against finite differences, and the NumPy model of the tiled
backward against the float64 reference (exact in float64, the 2x rule in float16 / bfloat16)."""
import functools

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from cuflash import reference
from cuflash.reference import attention_reference, attention_reference_backward, flash_backward_model, from_float32
from helpers import assert_2x, assert_matches_finite_differences, make_inputs, max_abs_err, model_problems

# Smaller than the forward's sizes: the model loops over every (batch, head, tile) pair in Python.
AWKWARD = [1, 2, 7, 16, 17, 31, 64, 65, 97, 113]


problems = functools.partial(model_problems, AWKWARD, max_seqlen=130)


@settings(max_examples=40, deadline=None)
@given(p=problems(max_seqlen=9, head_dims=[8, 16]))
def test_reference_backward_matches_finite_differences(p):
    """<grad, u> = d/de <dO, O(x + e u)> by central differences, for x = q, k, v in turn."""
    q, k, v, dout = make_inputs(p, "float64")
    args = (p["softmax_scale"], p["causal"])
    grads = attention_reference_backward(dout, q, k, v, *args)
    assert_matches_finite_differences(grads, (q, k, v), dout, lambda *x: attention_reference(*x, *args)[0], p["seed"] + 1)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_model_matches_float64_reference(p):
    q, k, v, dout = make_inputs(p, "float64")
    args = (p["softmax_scale"], p["causal"])
    out, lse = attention_reference(q, k, v, *args)
    expected = attention_reference_backward(dout, q, k, v, *args)
    grads = flash_backward_model(dout, q, k, v, out, lse, *args, p["block_m"], p["block_n"])
    for name, g, ref, x in zip(("dq", "dk", "dv"), grads, expected, (q, k, v)):
        assert g.dtype == np.float64 and g.shape == x.shape, name
        assert max_abs_err(g, ref) < 1e-9, name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@settings(max_examples=15, deadline=None)
@given(p=problems())
def test_model_in_low_precision_obeys_2x_rule(dtype, p):
    """out and lse as the kernel's forward gives them: exact values, out rounded to the dtype,
    lse in float32.

    At least 16 (batch, head, row) triples that see a key: with fewer, dq's and dk's errors are
    each one rounding error times a vector (the rounding of O through D = rowsum(dO * O) when P is
    nearly one-hot), and both sides of the rule are a single random draw; their ratio passes 2 in
    about 1 example in 50 at 1-4 rows, 0 in 2800 at 16 or more (worst 0.86 of the bound). The
    float64 test above keeps the tiny shapes."""
    seen_rows = int(reference.visible(p["seqlen_q"], p["seqlen_k"], p["causal"]).any(axis=1).sum())
    assume(p["batch"] * p["nheads"] * seen_rows >= 16)
    q, k, v, dout = make_inputs(p, dtype)
    args = (p["softmax_scale"], p["causal"])
    out64, lse64 = attention_reference(q, k, v, *args)
    out = from_float32(out64.astype(np.float32), dtype)
    lse = lse64.astype(np.float32)
    expected = attention_reference_backward(dout, q, k, v, *args)
    same_precision = attention_reference_backward(dout, q, k, v, *args, upcast=False)
    grads = flash_backward_model(dout, q, k, v, out, lse, *args, p["block_m"], p["block_n"])
    for name, g, ref, ref_lowp, x in zip(("dq", "dk", "dv"), grads, expected, same_precision, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_2x(g, ref, ref_lowp, dtype, name)


@settings(max_examples=200, deadline=None)
@given(seqlen_q=st.integers(1, 300), seqlen_k=st.integers(1, 300), causal=st.booleans(),
       block_m=st.sampled_from([16, 32, 64, 128]), block_n=st.sampled_from([16, 32, 64, 128]))
def test_m_block_min_covers_exactly_the_visible_keys(seqlen_q, seqlen_k, causal, block_m, block_n):
    """Visited tiles hold every visible (row, key), skipped tiles none; unmasked tiles only visible ones."""
    seen = reference.visible(seqlen_q, seqlen_k, causal)
    covered = np.zeros_like(seen)
    n_m_blocks = -(-seqlen_q // block_m)
    for n_block in range(-(-seqlen_k // block_n)):
        cols = slice(n_block * block_n, (n_block + 1) * block_n)
        first = reference.m_block_min(n_block, block_m, block_n, seqlen_q, seqlen_k, causal)
        assert 0 <= first <= n_m_blocks
        assert not seen[: first * block_m, cols].any(), "a skipped Q tile sees this K/V tile"
        for m_block in range(first, n_m_blocks):
            rows = slice(m_block * block_m, (m_block + 1) * block_m)
            covered[rows, cols] = True
            if not reference.tile_needs_mask(m_block, n_block, block_m, block_n, seqlen_q, seqlen_k, causal):
                assert seen[rows, cols].all() and (n_block + 1) * block_n <= seqlen_k
    assert not (seen & ~covered).any()


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_rows_that_see_no_key_get_zero_dq_and_nothing_is_nan(dtype):
    """seqlen_q > seqlen_k, causal: rows 0..4 see no key (lse = -inf) and share Q tiles with rows that do."""
    p = dict(batch=2, seqlen_q=9, seqlen_k=4, nheads=4, nheads_k=2, head_dim=16, seed=3)
    q, k, v, dout = make_inputs(p, dtype)
    out64, lse64 = attention_reference(q, k, v, None, True)
    out, lse = from_float32(out64.astype(np.float32), dtype), lse64.astype(np.float32)
    results = [attention_reference_backward(dout, q, k, v, None, True),
               attention_reference_backward(dout, q, k, v, None, True, upcast=False),
               flash_backward_model(dout, q, k, v, out, lse, None, True, block_m=4, block_n=2),
               flash_backward_model(dout, q, k, v, out, lse, None, True, block_m=16, block_n=16)]
    for dq, dk, dv in results:
        dq, dk, dv = (reference._upcast(x, np.float64) for x in (dq, dk, dv))
        assert not any(np.isnan(x).any() for x in (dq, dk, dv))
        assert (dq[:, :5] == 0).all() and (dq[:, 5:] != 0).any()
        assert (dk != 0).any() and (dv != 0).any()
