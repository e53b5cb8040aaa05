"""CPU: the NumPy model of the tiled forward against the plain float64 reference."""
import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cuflash import reference, schedule
from cuflash.reference import attention_reference, flash_forward_model, from_float32
from helpers import POSITIVE_SOFTCAPS, assert_2x, make_inputs, max_abs_err, model_problems, softcap_dropout

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


# ---- softcap: S' = softcap * tanh(S / softcap) before the mask and the softmax ----

# Smaller than the other model tests' sizes (seqlens up to 130): the capped scores add no tiling case.


@settings(max_examples=30, deadline=None)
@given(problems(max_seqlen=130, softcap=POSITIVE_SOFTCAPS, dropout_p=st.sampled_from([0.0, 0.0, 0.3])))
def test_model_with_softcap_matches_float64_reference(p):
    q, k, v, _ = make_inputs(p, "float64")
    ref_drop, model_drop = softcap_dropout(p)
    o_ref, lse_ref = attention_reference(q, k, v, p["softmax_scale"], p["causal"], softcap=p["softcap"], **ref_drop)
    for options in kernel_options(p):
        o, lse = flash_forward_model(q, k, v, p["softmax_scale"], p["causal"], p["block_m"], p["block_n"], softcap=p["softcap"],
                                     **model_drop, **options)
        assert max_abs_err(o, o_ref) < 1e-10
        assert max_abs_err(lse, lse_ref) < 1e-10


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@settings(max_examples=10, deadline=None)
@given(p=problems(max_seqlen=130, softcap=POSITIVE_SOFTCAPS))
def test_model_with_softcap_in_low_precision_obeys_2x_rule(dtype, p):
    q, k, v, _ = make_inputs(p, dtype)
    args = (p["softmax_scale"], p["causal"])
    o_ref, lse_ref = attention_reference(q, k, v, *args, softcap=p["softcap"])
    o_low, lse_low = attention_reference(q, k, v, *args, upcast=False, softcap=p["softcap"])
    for options in kernel_options(p):
        o, lse = flash_forward_model(q, k, v, *args, p["block_m"], p["block_n"], softcap=p["softcap"], **options)
        assert_2x(o, o_ref, o_low, dtype)
        assert_2x(lse, lse_ref, lse_low, dtype, "lse")


def test_softcap_by_hand():
    """Two query rows, three keys, d = 2, causal (row 0 sees keys 0 and 1): O and lse from scalar
    arithmetic; the models with 1-key tiles run the online softmax over every key."""
    q = np.array([[1.0, 2.0], [0.0, -1.0]]).reshape(1, 2, 1, 2)
    k = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]).reshape(1, 3, 1, 2)
    v = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]).reshape(1, 3, 1, 2)
    scale, softcap = 0.5, 0.75
    # S = Q K^T * scale = [[0.5, 1, 0.5], [0, -0.5, -0.5]]; S' = softcap * tanh(S / softcap)
    scores = [[0.5, 1.0], [0.0, -0.5, -0.5]]
    o_hand, lse_hand = np.zeros((1, 2, 1, 2)), np.zeros((1, 1, 2))
    for i, row in enumerate(scores):
        w = [math.exp(softcap * math.tanh(s / softcap)) for s in row]
        o_hand[0, i, 0] = [sum(wj * v[0, j, 0, c] for j, wj in enumerate(w)) / sum(w) for c in range(2)]
        lse_hand[0, 0, i] = math.log(sum(w))
    assert abs(lse_hand[0, 0, 0] - math.log(math.exp(0.75 * math.tanh(2 / 3)) + math.exp(0.75 * math.tanh(4 / 3)))) < 1e-15
    for fn in (attention_reference, functools.partial(flash_forward_model, block_m=1, block_n=1),
               functools.partial(flash_forward_model, block_m=16, block_n=16)):
        o, lse = fn(q, k, v, scale, True, softcap=softcap)
        assert max_abs_err(o, o_hand) < 1e-14 and max_abs_err(lse, lse_hand) < 1e-14
    # without the cap: S itself
    o, lse = attention_reference(q, k, v, scale, True)
    assert abs(lse[0, 0, 0] - math.log(math.exp(0.5) + math.exp(1.0))) < 1e-14


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_huge_softcap_is_no_softcap(dtype):
    """softcap = 1e6: S' = S - S^3 / (3 softcap^2) differs from S by ~1e-10 here. The same-
    precision reference rounds S' back to the rounded S exactly (a float32 error ~1e-7 of S is far
    below half a float16 / bfloat16 ulp); the models differ from their uncapped selves by the
    float32 error of t * softcap * log2(e) against S * scale * log2(e) (float32: a few ulps; float16
    / bfloat16: a flipped rounding of P, at most)."""
    p = dict(batch=2, seqlen_q=45, seqlen_k=29, nheads=4, nheads_k=2, head_dim=16, seed=5)
    q, k, v, _ = make_inputs(p, dtype)
    tol = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    for causal in (False, True):
        o, lse = attention_reference(q, k, v, 0.4, causal)
        o_cap, lse_cap = attention_reference(q, k, v, 0.4, causal, softcap=1e6)
        assert max_abs_err(o_cap, o) < 1e-9 and max_abs_err(lse_cap, lse) < 1e-9
        if dtype in ("float16", "bfloat16"):
            o, lse = attention_reference(q, k, v, 0.4, causal, upcast=False)
            o_cap, lse_cap = attention_reference(q, k, v, 0.4, causal, upcast=False, softcap=1e6)
            assert np.array_equal(o_cap, o) and np.array_equal(lse_cap, lse)
        o, lse = flash_forward_model(q, k, v, 0.4, causal, 16, 16)
        o_cap, lse_cap = flash_forward_model(q, k, v, 0.4, causal, 16, 16, softcap=1e6)
        o, o_cap = (reference._upcast(x, np.float64) for x in (o, o_cap))
        assert max_abs_err(o_cap, o) < tol and max_abs_err(lse_cap, lse) < (1e-9 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_softcap_zero_changes_no_bit(dtype):
    p = dict(batch=1, seqlen_q=33, seqlen_k=20, nheads=2, nheads_k=1, head_dim=16, seed=7)
    q, k, v, _ = make_inputs(p, dtype)
    for upcast in (True, False):
        for got, want in zip(attention_reference(q, k, v, None, True, upcast, softcap=0), attention_reference(q, k, v, None, True, upcast)):
            assert np.array_equal(got, want)
    for got, want in zip(flash_forward_model(q, k, v, None, True, softcap=0.0), flash_forward_model(q, k, v, None, True)):
        assert np.array_equal(reference._upcast(got, np.float64), reference._upcast(want, np.float64))


@pytest.mark.parametrize("softcap", [-1.0, math.nan, math.inf, True, "30", None])
def test_softcap_is_checked(softcap):
    q, k, v, _ = make_inputs(dict(batch=1, seqlen_q=4, seqlen_k=4, nheads=1, nheads_k=1, head_dim=8, seed=0), "float64")
    for fn in (attention_reference, flash_forward_model):
        with pytest.raises(ValueError, match="softcap must be"):
            fn(q, k, v, softcap=softcap)
