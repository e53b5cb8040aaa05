"""CPU: the dropout specification in cuflash/reference.py. Philox4x32-10 against Random123's known
answers; the keep rate; keep bits that depend on every key and counter word and on nothing else
(not the tile, not the order); the tiled models with dropout against the plain references given
the whole mask; dropout_p = 0 changing no bit; the reference backward with dropout against finite
differences of the forward with the same fixed mask."""
import functools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from cuflash import reference
from cuflash.reference import (attention_reference, attention_reference_backward, dropout_keep, dropout_mask,
                               dropout_words, flash_backward_model, flash_forward_model, from_float32, philox4x32_10)
from helpers import assert_2x, assert_matches_finite_differences, make_inputs, max_abs_err, model_problems

# Random123 1.14, tests/kat_vectors, philox4x32 10 rounds: (counter, key, expected output).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]

SEEDS = st.integers(0, 2**64 - 1)
OFFSETS = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = philox4x32_10(tuple(np.uint32(c) for c in counter), tuple(np.uint32(k) for k in key))
    assert all(w.dtype == np.uint32 for w in words)
    assert tuple(int(w) for w in words) == expected


def test_philox_on_arrays_equals_philox_on_each_element():
    """Broadcasting evaluates each (counter, key) on its own: the KATs stacked along an axis,
    and one counter against several keys."""
    counters = [np.array([kat[0][i] for kat in KAT], dtype=np.uint32) for i in range(4)]
    keys = [np.array([kat[1][i] for kat in KAT], dtype=np.uint32) for i in range(2)]
    words = philox4x32_10(counters, keys)
    assert [tuple(int(w[j]) for w in words) for j in range(len(KAT))] == [kat[2] for kat in KAT]
    words = philox4x32_10(KAT[2][0], (keys[0][:, None], keys[1][None, :]))
    for i in range(3):
        for j in range(3):
            single = philox4x32_10(KAT[2][0], (keys[0][i], keys[1][j]))
            assert [int(w[i, j]) for w in words] == [int(w) for w in single]


def test_dropout_threshold():
    assert reference.dropout_threshold(0.0) == 0
    assert reference.dropout_threshold(0.25) == 2**30
    assert reference.dropout_threshold(0.5) == 2**31
    assert reference.dropout_threshold(math.nextafter(1.0, 0.0)) == 2**32 - 1
    assert reference.dropout_threshold(1.0) == 2**32 - 1           # does not fit: keep rate 2^-32
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            reference.dropout_threshold(bad)
    assert dropout_mask(7, 0, 2, 3, 33, 45, 0.0).all()


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(dropout_p):
    """Over 2^20 elements, and over each of the 4 words of a Philox call (cols % 4) on its own,
    the count of kept elements lies within 5 binomial sigmas of n (1 - p)."""
    keep = dropout_mask(0x0123456789ABCDEF, 3, 2, 4, 256, 512, dropout_p)
    for sample in [keep] + [keep[..., lane::4] for lane in range(4)]:
        n = sample.size
        sigma = math.sqrt(n * dropout_p * (1 - dropout_p))
        assert abs(int(sample.sum()) - n * (1 - dropout_p)) <= 5 * sigma


@settings(max_examples=30)
@given(seed=SEEDS, offset=OFFSETS, dropout_p=st.floats(0.0, 0.99))
def test_same_seed_and_offset_give_the_same_mask_and_offsets_wrap_at_2_32(seed, offset, dropout_p):
    mask = dropout_mask(seed, offset, 2, 3, 19, 37, dropout_p)
    assert np.array_equal(mask, dropout_mask(seed, offset, 2, 3, 19, 37, dropout_p))
    assert np.array_equal(mask, dropout_mask(seed, offset + 2**32, 2, 3, 19, 37, dropout_p))


@settings(max_examples=20)
@given(seed=SEEDS, offset=OFFSETS, batch_head=st.integers(0, 1000), row0=st.integers(0, 10**6),
       col0=st.integers(0, 10**6).map(lambda c: 4 * c))
def test_every_key_and_counter_word_changes_the_bits(seed, offset, batch_head, row0, col0):
    """Changing the seed's low or high half, the offset, the head, the row or the key (the next
    group of 4, or the next word of the same call) changes nearly every random word (each equal
    pair has probability 2^-32), and so about half of the keep bits at p = 0.5."""
    rows, cols = row0 + np.arange(64)[:, None], col0 + np.arange(64)[None, :]
    base = dropout_words(seed, offset, batch_head, rows, cols)
    others = {
        "seed, low half": dropout_words(seed ^ 1, offset, batch_head, rows, cols),
        "seed, high half": dropout_words(seed ^ (1 << 32), offset, batch_head, rows, cols),
        "offset": dropout_words(seed, offset + 1, batch_head, rows, cols),
        "head": dropout_words(seed, offset, batch_head + 1, rows, cols),
        "row": dropout_words(seed, offset, batch_head, rows + 1, cols),
        "group of 4 keys": dropout_words(seed, offset, batch_head, rows, cols + 4),
        "word of the call": dropout_words(seed, offset, batch_head, rows, cols ^ 1),
    }
    half = np.uint32(2**31)
    sigma = math.sqrt(0.25 / base.size)
    for what, words in others.items():
        assert (words == base).mean() < 0.01, what
        assert abs(((words >= half) != (base >= half)).mean() - 0.5) <= 5 * sigma, what


@settings(max_examples=100)
@given(data=st.data(), seed=SEEDS, offset=OFFSETS, dropout_p=st.floats(0.0, 0.99),
       batch=st.integers(1, 2), nheads=st.integers(1, 3), seqlen_q=st.integers(1, 70), seqlen_k=st.integers(1, 70))
def test_a_tile_of_keep_bits_equals_that_tile_of_the_mask(data, seed, offset, dropout_p, batch, nheads, seqlen_q, seqlen_k):
    """dropout_keep on any sub-block, for one head or an array of heads, gives that block of the
    full mask, itself drawn a different way (one Philox call per (row, group of 4 keys))."""
    full = dropout_mask(seed, offset, batch, nheads, seqlen_q, seqlen_k, dropout_p)
    r0 = data.draw(st.integers(0, seqlen_q - 1))
    r1 = data.draw(st.integers(r0 + 1, seqlen_q))
    c0 = data.draw(st.integers(0, seqlen_k - 1))
    c1 = data.draw(st.integers(c0 + 1, seqlen_k))
    b, h = data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, nheads - 1))
    rows, cols = np.arange(r0, r1)[:, None], np.arange(c0, c1)[None, :]
    tile = dropout_keep(seed, offset, b * nheads + h, rows, cols, dropout_p)
    assert np.array_equal(tile, full[b, h, r0:r1, c0:c1])
    heads = np.arange(batch * nheads).reshape(batch, nheads, 1, 1)
    assert np.array_equal(dropout_keep(seed, offset, heads, rows, cols, dropout_p), full[:, :, r0:r1, c0:c1])


# ---- attention with dropout: the tiled models against the plain references ----

AWKWARD = [1, 2, 7, 16, 17, 31, 64, 65, 97]


problems = functools.partial(model_problems, AWKWARD, max_seqlen=100, groups=(1, 2, 3, 4), head_dims=(8, 16, 32, 64),
                             dropout_p=st.sampled_from([0.1, 0.5, 0.9]) | st.floats(0.01, 0.95), rng_seed=SEEDS,
                             offset=st.integers(0, 2**33))


def mask_of(p):
    return dropout_mask(p["rng_seed"], p["offset"], p["batch"], p["nheads"], p["seqlen_q"], p["seqlen_k"], p["dropout_p"])


def model_dropout(p):
    return dict(dropout_p=p["dropout_p"], seed=p["rng_seed"], offset=p["offset"])


@settings(max_examples=80)
@given(problems(max_seqlen=150))
def test_forward_model_with_dropout_matches_reference(p):
    """Also: lse is that of the undropped P, bit for bit in the model."""
    q, k, v, _ = make_inputs(p, "float64")
    args = (p["softmax_scale"], p["causal"])
    o_ref, lse_ref = attention_reference(q, k, v, *args, dropout_p=p["dropout_p"], dropout_mask=mask_of(p))
    lse_undropped = flash_forward_model(q, k, v, *args, p["block_m"], p["block_n"])[1]
    for fold in (False, True):  # 1 / (1 - p) after the last P V, or folded into it (sm_90a)
        o, lse = flash_forward_model(q, k, v, *args, p["block_m"], p["block_n"], **model_dropout(p), fold_output_scale=fold)
        assert max_abs_err(o, o_ref) < 1e-9
        assert max_abs_err(lse, lse_ref) < 1e-9
        assert np.array_equal(lse, lse_undropped)


@settings(max_examples=60)
@given(problems())
def test_backward_model_with_dropout_matches_reference(p):
    q, k, v, dout = make_inputs(p, "float64")
    args = (p["softmax_scale"], p["causal"])
    mask = mask_of(p)
    out, lse = attention_reference(q, k, v, *args, dropout_p=p["dropout_p"], dropout_mask=mask)
    expected = attention_reference_backward(dout, q, k, v, *args, dropout_p=p["dropout_p"], dropout_mask=mask)
    grads = flash_backward_model(dout, q, k, v, out, lse, *args, p["block_m"], p["block_n"], **model_dropout(p))
    for name, g, ref, x in zip(("dq", "dk", "dv"), grads, expected, (q, k, v)):
        assert g.dtype == np.float64 and g.shape == x.shape, name
        assert max_abs_err(g, ref) < 1e-9, name


@st.composite
def moderate_problems(draw):
    """Sizes where the 2x rule is a stable test under dropout (see the test below)."""
    seqlen = st.integers(48, 160)
    nheads_k = draw(st.integers(1, 2))
    return dict(
        batch=draw(st.integers(1, 2)), seqlen_q=draw(seqlen), seqlen_k=draw(seqlen),
        nheads_k=nheads_k, nheads=nheads_k * draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([16, 32, 64])), causal=draw(st.booleans()),
        block_m=draw(st.sampled_from([16, 32, 64, 128])), block_n=draw(st.sampled_from([16, 32, 64, 128])),
        softmax_scale=None, seed=draw(st.integers(0, 2**31)),
        dropout_p=draw(st.sampled_from([0.1, 0.5]) | st.floats(0.01, 0.5)),
        rng_seed=draw(SEEDS), offset=draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@settings(max_examples=8)
@given(p=moderate_problems())
def test_models_with_dropout_in_low_precision_obey_2x_rule(dtype, p):
    """The models fold 1 / (1 - p) into their epilogues (P rounded as without dropout); the
    same-precision reference rounds P * keep / (1 - p) instead: either is one rounding of P.

    Why p <= 0.5, seqlens 48-160 and at least 1024 kept visible (row, key) pairs: dropout thins
    every sum, and the largest errors come from the few rows whose dominant key is kept (|O| up to
    |V| / (1 - p), rounded, enters dS through D), so both sides of the rule become a few random
    draws. Measured here (max over o, dq, dk, dv of error / bound): this strategy, 2 in 15,500
    examples over the bound (worst 1.02, p99 0.64; 0.62 without dropout); p = 0.9 or 0.95 at the
    same sizes, about 1 in 100 (p99 0.82-0.94), tiny shapes far more. The spread widens both
    ways: the same-precision reference loses to the model by more, too (median of its error over
    2x the model's: 0.98 at p = 0, 1.33 at p = 0.95); the medians of the rule move from 0.31 to
    0.37 only. The float64 tests above cover every p and shape."""
    seen = reference.visible(p["seqlen_q"], p["seqlen_k"], p["causal"])
    mask = mask_of(p)
    assume(int((mask & seen).sum()) >= 1024)
    q, k, v, dout = make_inputs(p, dtype)
    args = (p["softmax_scale"], p["causal"])
    drop = dict(dropout_p=p["dropout_p"], dropout_mask=mask)
    o64, lse64 = attention_reference(q, k, v, *args, **drop)
    o_low, _ = attention_reference(q, k, v, *args, upcast=False, **drop)
    o, _ = flash_forward_model(q, k, v, *args, p["block_m"], p["block_n"], **model_dropout(p))
    assert_2x(o, o64, o_low, dtype)
    # out and lse as the kernel's forward gives them: exact values, out rounded to the dtype
    out, lse = from_float32(o64.astype(np.float32), dtype), lse64.astype(np.float32)
    expected = attention_reference_backward(dout, q, k, v, *args, **drop)
    same_precision = attention_reference_backward(dout, q, k, v, *args, upcast=False, **drop)
    grads = flash_backward_model(dout, q, k, v, out, lse, *args, p["block_m"], p["block_n"], **model_dropout(p))
    for name, g, ref, ref_lowp, x in zip(("dq", "dk", "dv"), grads, expected, same_precision, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_2x(g, ref, ref_lowp, dtype, name)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_dropout_p_zero_changes_no_bit(dtype):
    """dropout_p = 0 with any seed and offset, and the references given the (all-kept) mask of
    p = 0, give exactly what they give without dropout."""
    p = dict(batch=2, seqlen_q=45, seqlen_k=29, nheads=4, nheads_k=2, head_dim=16, seed=5)
    q, k, v, dout = make_inputs(p, dtype)
    keep_all = dropout_mask(99, 7, 2, 4, 45, 29, 0.0)
    for causal in (False, True):
        args = (None, causal, 16, 32)
        o, lse = flash_forward_model(q, k, v, *args)
        o_p0, lse_p0 = flash_forward_model(q, k, v, *args, dropout_p=0.0, seed=99, offset=7)
        assert np.array_equal(o, o_p0) and np.array_equal(lse, lse_p0)
        grads = flash_backward_model(dout, q, k, v, o, lse, *args)
        grads_p0 = flash_backward_model(dout, q, k, v, o, lse, *args, dropout_p=0.0, seed=99, offset=7)
        assert all(np.array_equal(a, b) for a, b in zip(grads, grads_p0))
        for upcast in (True, False):
            plain = attention_reference(q, k, v, None, causal, upcast)
            masked = attention_reference(q, k, v, None, causal, upcast, dropout_p=0.0, dropout_mask=keep_all)
            assert all(np.array_equal(a, b) for a, b in zip(plain, masked))
            plain = attention_reference_backward(dout, q, k, v, None, causal, upcast)
            masked = attention_reference_backward(dout, q, k, v, None, causal, upcast, dropout_p=0.0, dropout_mask=keep_all)
            assert all(np.array_equal(a, b) for a, b in zip(plain, masked))


def test_dropout_arguments_are_checked():
    p = dict(batch=1, seqlen_q=8, seqlen_k=8, nheads=1, nheads_k=1, head_dim=8, seed=0)
    q, k, v, dout = make_inputs(p, "float64")
    mask = dropout_mask(1, 0, 1, 1, 8, 8, 0.5)
    with pytest.raises(ValueError, match="dropout_mask"):
        attention_reference(q, k, v, dropout_p=0.5)
    with pytest.raises(ValueError, match="dropout_mask"):
        attention_reference_backward(dout, q, k, v, dropout_p=0.5)
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError):
            attention_reference(q, k, v, dropout_p=bad, dropout_mask=mask)
        with pytest.raises(ValueError):
            flash_forward_model(q, k, v, dropout_p=bad)
        with pytest.raises(ValueError):
            flash_backward_model(dout, q, k, v, q, np.zeros((1, 1, 8)), dropout_p=bad)


@settings(max_examples=60)
@given(p=problems(max_seqlen=9, head_dims=[8, 16]))
def test_reference_backward_with_dropout_matches_finite_differences(p):
    """<grad, u> = d/de <dO, O(x + e u)> by central differences, for x = q, k, v in turn, with one
    fixed keep mask in every evaluation (the backward of a given forward regenerates its bits)."""
    q, k, v, dout = make_inputs(p, "float64")
    args = (p["softmax_scale"], p["causal"])
    drop = dict(dropout_p=p["dropout_p"], dropout_mask=mask_of(p))
    grads = attention_reference_backward(dout, q, k, v, *args, **drop)
    assert_matches_finite_differences(grads, (q, k, v), dout, lambda *x: attention_reference(*x, *args, **drop)[0],
                                      p["seed"] + 1)
