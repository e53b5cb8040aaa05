"""GPU: the backward (dq, dk, dv) against float64 gradients with the 2x rule, every variant the
dispatcher can pick, fuzzed shapes, GQA, strided views, deterministic mode."""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from helpers import (FAMILIES, SOFTCAPS, assert_2x, assert_backward_2x, forward_path, problems, qkv, randn, rows_that_see_a_key,
                     variant_softcap)

cupy = pytest.importorskip("cupy")
import cuflash  # noqa: E402
from cuflash import backward_launch, plan, schedule  # noqa: E402
from cuflash.reference import attention_reference_backward  # noqa: E402

pytestmark = pytest.mark.gpu


def check_backward(q, k, v, causal, softmax_scale=None, deterministic=False, tile=None, layout="contiguous", seed=0,
                   softcap=0.0):
    dtype = q.dtype.name
    out, lse = cuflash.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, softcap=softcap)
    dout = randn(q.shape, dtype, layout, seed + 7)
    dq, dk, dv = cuflash.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                                  deterministic=deterministic, tile=tile, softcap=softcap)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dq.dtype == q.dtype
    assert_backward_2x((dq, dk, dv), dout, q, k, v, softmax_scale, causal, softcap=softcap)
    return dq, dk, dv


@pytest.mark.parametrize("variant", plan.backward_variants(), ids=repr)
def test_every_backward_variant(variant, monkeypatch):
    """Every variant any sm_80+ GPU can be given, at sizes that are not tile multiples (the
    variants that flush their dK/dV sums, with the row budget lowered so that they run)."""
    if plan.is_hopper(variant) and cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the sm_90a kernels need a compute capability 9.0 GPU")
    if variant.flush:
        monkeypatch.setattr(schedule, "DKDV_FLUSH_ROWS", 160)
    for seqlens in ((113, 203), (203, 113)):
        check_backward(*qkv(1, *seqlens, 4, 2, variant.head_dim, variant.dtype), variant.causal,
                       deterministic=variant.deterministic, tile=variant.tile, softcap=variant_softcap(variant))


@pytest.mark.parametrize("path", FAMILIES)
@settings(max_examples=80, deadline=None)
@given(problems(max_seqlen=1500, max_batch=2, max_scores=3e7, deterministic=st.booleans(), softcap=SOFTCAPS))
def test_backward_fuzz(path, p):
    # With a handful of rows, both sides of the 2x rule are single random rounding errors
    # (tests/test_reference_backward.py measures the tail); 16 rows make the rule meaningful.
    assume(rows_that_see_a_key(p) >= 16)
    q, k, v = qkv(p["batch"], p["seqlen_q"], p["seqlen_k"], p["nheads"], p["nheads_k"], p["head_dim"],
                  p["dtype"], p["layout"], p["seed"])
    with forward_path(path):
        check_backward(q, k, v, p["causal"], p["softmax_scale"], p["deterministic"], layout=p["layout"], seed=p["seed"],
                       softcap=p["softcap"])


@pytest.mark.parametrize("path", FAMILIES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 239, 1), (1, 1, 239), (1, 3000, 2999), (2, 77, 1500)])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_edge_shapes(shape, causal, head_dim, path):
    batch, seqlen_q, seqlen_k = shape
    with forward_path(path):
        check_backward(*qkv(batch, seqlen_q, seqlen_k, 16, 2, head_dim, "bfloat16", seed=seqlen_q), causal)


@pytest.mark.parametrize("converters", [0, 1, 3])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_dq_converter_ctas(converters, head_dim, causal, monkeypatch):
    """The sm_90a backward's CTAs that convert dQ tiles as their heads finish: none (the last pass
    converts every tile), or one or three, each walking many tiles of several GQA groups."""
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the sm_90a kernels need a compute capability 9.0 GPU")
    monkeypatch.setattr(backward_launch, "sm_count", lambda device_id: converters)
    check_backward(*qkv(2, 517, 389, 6, 2, head_dim, "bfloat16", seed=converters), causal)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_deterministic_is_bitwise_reproducible(head_dim):
    q, k, v = qkv(2, 1000, 1000, 8, 2, head_dim, "float16", seed=head_dim)
    out, lse = cuflash.forward(q, k, v, causal=True)
    dout = randn(q.shape, "float16", seed=5)
    runs = [cuflash.backward(dout, q, k, v, out, lse, causal=True, deterministic=True) for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert bool((a.view(cupy.uint16) == b.view(cupy.uint16)).all())


def test_backward_of_empty_problems():
    for sq, sk in ((0, 5), (5, 0)):
        q, k, v = (cupy.ones(s, cupy.float16) for s in [(1, sq, 2, 64), (1, sk, 2, 64), (1, sk, 2, 64)])
        out = cupy.zeros_like(q)
        lse = cupy.full((1, 2, sq), -np.inf, cupy.float32)
        dq, dk, dv = cuflash.backward(out, q, k, v, out, lse)
        assert dq.shape == q.shape and dk.shape == k.shape
        assert not (dq != 0).any() and not (dk != 0).any() and not (dv != 0).any()


def test_backward_bad_lse_is_refused():
    q, k, v = qkv(1, 16, 16, 2, 2, 64, "float16")
    out, lse = cuflash.forward(q, k, v)
    with pytest.raises(ValueError, match="lse"):
        cuflash.backward(out, q, k, v, out, lse[:, :1])
    with pytest.raises(TypeError, match="lse"):
        cuflash.backward(out, q, k, v, out, lse.astype(cupy.float64))


@pytest.mark.parametrize("path", FAMILIES)
@pytest.mark.parametrize("head_dim", [64, 128, 256, 96])
@pytest.mark.parametrize("causal, deterministic, dropout_p", [(False, False, 0.0), (True, False, 0.0),
                                                             (True, True, 0.0), (False, False, 0.15)])
def test_dkdv_flushed_partial_sums(path, head_dim, causal, deterministic, dropout_p, monkeypatch):
    """dK/dV CTAs that hand their accumulators to the float32 partial sums every 1 to 3 Q tiles
    (schedule.DKDV_FLUSH_ROWS lowered from 65536 rows to 160), so that the first flush, the later
    ones and the fold at the end all run, with GQA, causal rows, dropout and deterministic mode:
    the gradients still obey the 2x rule, and equal the unflushed run's within rounding."""
    q, k, v = qkv(2, 333, 290, 4, 1, head_dim, "float16", seed=head_dim)
    dout = randn(q.shape, "float16", "contiguous", 11)
    with forward_path(path):
        out, lse = cuflash.forward(q, k, v, causal=causal, dropout_p=dropout_p, seed=5)
        unflushed = cuflash.backward(dout, q, k, v, out, lse, causal=causal, deterministic=deterministic,
                                     dropout_p=dropout_p, seed=5)
        monkeypatch.setattr(schedule, "DKDV_FLUSH_ROWS", 160)
        flushed = cuflash.backward(dout, q, k, v, out, lse, causal=causal, deterministic=deterministic,
                                   dropout_p=dropout_p, seed=5)
    for name, a, b in zip(("dq", "dk", "dv"), flushed, unflushed):
        scale = float(cupy.abs(b.astype(cupy.float32)).max())
        err = float(cupy.abs(a.astype(cupy.float32) - b.astype(cupy.float32)).max())
        assert err <= 4e-3 * scale + 1e-3, f"{name}: flushed and unflushed differ by {err} (max |{name}| {scale})"
    if dropout_p == 0:
        ref = attention_reference_backward(dout, q, k, v, None, causal)
        low = attention_reference_backward(dout, q, k, v, None, causal, upcast=False)
        for name, got, r, lo in zip(("dq", "dk", "dv"), flushed, ref, low):
            assert_2x(got, r, lo, "float16", name)
