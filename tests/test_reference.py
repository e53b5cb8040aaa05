"""CPU: the NumPy model of the tiled forward against the plain float64 reference."""
import functools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cuflash import reference, schedule
from cuflash.reference import attention_reference, flash_forward_model, from_float32
from helpers import assert_2x, make_inputs, max_abs_err, model_problems

AWKWARD = [1, 2, 7, 16, 17, 31, 64, 65, 113, 127, 128, 129, 203, 239]


problems = functools.partial(model_problems, AWKWARD, max_seqlen=300, max_nheads_k=3)


def kernel_options(p):
    """flash_forward_model's options for problem p, each checked with and without causal: as the
    portable kernels; 1 / l folded into the last tile (sm_90a without causal); row blocks aligned
    to the end (sm_90a under causal)."""
    return [{}, dict(fold_output_scale=True), dict(row_shift=schedule.causal_row_shift(p["seqlen_q"], p["block_m"]))]


@settings(max_examples=60, deadline=None)
@given(problems())
def test_model_matches_float64_reference(p):
    q, k, v, _ = make_inputs(p, "float64")
    o_ref, lse_ref = attention_reference(q, k, v, p["softmax_scale"], p["causal"])
    for options in kernel_options(p):
        o, lse = flash_forward_model(q, k, v, p["softmax_scale"], p["causal"], p["block_m"], p["block_n"], **options)
        assert max_abs_err(o, o_ref) < 1e-10
        assert max_abs_err(lse, lse_ref) < 1e-10


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@settings(max_examples=15, deadline=None)
@given(p=problems())
def test_model_in_low_precision_obeys_2x_rule(dtype, p):
    q, k, v, _ = make_inputs(p, dtype)
    o_ref, lse_ref = attention_reference(q, k, v, p["softmax_scale"], p["causal"])
    o_low, lse_low = attention_reference(q, k, v, p["softmax_scale"], p["causal"], upcast=False)
    for options in kernel_options(p):
        o, lse = flash_forward_model(q, k, v, p["softmax_scale"], p["causal"], p["block_m"], p["block_n"], **options)
        assert_2x(o, o_ref, o_low, dtype)
        assert_2x(lse, lse_ref, lse_low, dtype, "lse")


@settings(max_examples=200, deadline=None)
@given(seqlen_q=st.integers(1, 300), seqlen_k=st.integers(1, 300), causal=st.booleans(),
       block_m=st.sampled_from([16, 64, 128, 192]), block_n=st.sampled_from([16, 32, 64, 128]), shifted=st.booleans())
def test_tile_skipping_and_masking_cover_exactly_the_visible_keys(seqlen_q, seqlen_k, causal, block_m, block_n, shifted):
    """Visited tiles hold every visible (row, key); unmasked tiles hold only visible ones. With
    the rows end-aligned (shifted), the Q tiles still cover every row, and end within 64 rows
    past the last."""
    seen = reference.visible(seqlen_q, seqlen_k, causal)
    covered = np.zeros_like(seen)
    num_m_blocks = -(-seqlen_q // block_m)
    shift = schedule.causal_row_shift(seqlen_q, block_m) if shifted else 0
    if shifted:
        assert 0 <= shift < block_m and shift % 64 == 0 and 0 <= num_m_blocks * block_m - shift - seqlen_q < 64
    for m_block in range(num_m_blocks):
        first_row = m_block * block_m - shift
        rows = slice(max(first_row, 0), first_row + block_m)
        for n_block in range(reference.n_block_max(m_block, block_m, block_n, seqlen_q, seqlen_k, causal, shift)):
            cols = slice(n_block * block_n, (n_block + 1) * block_n)
            covered[rows, cols] = True
            if not reference.tile_needs_mask(m_block, n_block, block_m, block_n, seqlen_q, seqlen_k, causal, shift):
                assert seen[rows, cols].all() and (n_block + 1) * block_n <= seqlen_k
    assert not (seen & ~covered).any()


def test_rows_that_see_no_key_give_zero_and_minus_inf():
    q, k, v, _ = make_inputs(dict(batch=1, seqlen_q=9, seqlen_k=4, nheads=2, nheads_k=1, head_dim=16, seed=3), "float64")
    for fn in (attention_reference, lambda *a: flash_forward_model(*a, block_m=4, block_n=2)):
        o, lse = fn(q, k, v, None, True)
        assert (o[:, :5] == 0).all() and np.isneginf(lse[:, :, :5]).all()
        assert np.isfinite(lse[:, :, 5:]).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_to_matches_the_dtype_cast(dtype):
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    cast = reference._upcast(from_float32(x, dtype), np.float32)
    assert np.array_equal(reference.round_to(x, dtype), cast)
    if dtype == "bfloat16":
        import ml_dtypes

        assert np.array_equal(cast, x.astype(ml_dtypes.bfloat16).astype(np.float32))
