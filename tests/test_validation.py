"""CPU: every bad argument is refused with the right exception type and a message naming it.

validate.py works on interop.ArrayInfo descriptions, so the checks run here on hand-built
descriptions; no GPU or CuPy array is needed.
"""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import cuflash
from cuflash import interop, validate
from helpers import array_info


def qkv(batch=2, seqlen_q=113, seqlen_k=203, nheads=4, nheads_k=2, head_dim=64, **kw):
    return (array_info((batch, seqlen_q, nheads, head_dim), **kw),
            array_info((batch, seqlen_k, nheads_k, head_dim), **kw),
            array_info((batch, seqlen_k, nheads_k, head_dim), **kw))


def replace(x, **changes):
    return dataclasses.replace(x, **changes)


Q, K, V = qkv()


def test_valid_qkv_passes():
    validate.check_qkv(Q, K, V)
    validate.check_qkv(*qkv(nheads=8, nheads_k=1, head_dim=8))     # MQA, smallest head dim
    validate.check_qkv(*qkv(nheads=3, nheads_k=3, head_dim=256))   # MHA, largest head dim
    validate.check_qkv(*qkv(seqlen_q=0, seqlen_k=0, batch=0))      # empty is legal
    validate.check_qkv(*qkv(head_dim=64, dtype="bfloat16"))


BAD_QKV = {
    "q rank 3": ((array_info((2, 113, 64)), K, V), ValueError, r"\bq\b.*rank 4"),
    "k rank 5": ((Q, array_info((2, 203, 2, 1, 64)), V), ValueError, r"\bk\b.*rank 4"),
    "v rank 0": ((Q, K, array_info(())), ValueError, r"\bv\b.*rank 4"),
    "q float32": ((replace(Q, dtype="float32"), K, V), TypeError, r"\bq\b.*float16 or bfloat16"),
    "v float32": ((Q, K, replace(V, dtype="float32")), TypeError, r"\bv\b.*float16 or bfloat16"),
    "k dtype differs": ((Q, replace(K, dtype="bfloat16"), V), TypeError, r"\bk\b.*q's dtype"),
    "v dtype differs": ((Q, K, replace(V, dtype="bfloat16")), TypeError, r"\bv\b.*q's dtype"),
    "k device differs": ((Q, replace(K, device=1), V), ValueError, r"\bk\b.*device"),
    "v device differs": ((Q, K, replace(V, device=1)), ValueError, r"\bv\b.*device"),
    "k framework differs": ((Q, replace(K, framework="torch"), V), TypeError, r"\bk\b.*framework"),
    "v framework differs": ((Q, K, replace(V, framework="jax")), TypeError, r"\bv\b.*framework"),
    "k, v shapes differ": ((Q, K, array_info((2, 202, 2, 64))), ValueError, r"\bk\b and \bv\b.*same shape"),
    "batch differs": (qkv()[:1] + qkv(batch=3)[1:], ValueError, r"\bk\b and \bv\b.*batch"),
    "head dim differs": (qkv()[:1] + qkv(head_dim=32)[1:], ValueError, r"\bk\b and \bv\b.*head dim"),
    "nheads 6 vs 4": (qkv(nheads=6, nheads_k=4), ValueError, r"nheads"),
    "nheads 2 vs 4": (qkv(nheads=2, nheads_k=4), ValueError, r"nheads"),
    "nheads_k 0": (qkv(nheads_k=0), ValueError, r"nheads"),
    "head dim 12": (qkv(head_dim=12), ValueError, r"headdim.*multiple of 8"),
    "head dim 264": (qkv(head_dim=264), ValueError, r"headdim.*256"),
    "head dim 0": (qkv(head_dim=0), ValueError, r"headdim"),
    "q last dim strided": ((replace(Q, strides=(113 * 4 * 128, 4 * 128, 128, 2)), K, V), ValueError,
                           r"\bq\b.*contiguous in its last"),
    "k last dim strided": ((Q, replace(K, strides=(0, 0, 0, 3)), V), ValueError, r"\bk\b.*contiguous in its last"),
    "v last dim strided": ((Q, K, replace(V, strides=(203 * 2 * 64, 2 * 64, 64, -1))), ValueError,
                           r"\bv\b.*contiguous in its last"),
}


@pytest.mark.parametrize("case", BAD_QKV, ids=str)
def test_bad_qkv(case):
    args, error, message = BAD_QKV[case]
    with pytest.raises(error, match=message):
        validate.check_qkv(*args)


def test_last_dim_of_one_may_have_any_stride():
    validate.check_last_dim_contiguous("q", array_info((2, 3, 4, 1), strides=(12, 4, 1, 7)))


@given(head_dim=st.integers(0, 300), nheads=st.integers(1, 12), nheads_k=st.integers(1, 12),
       dtype=st.sampled_from(["float16", "bfloat16", "float32", "float64", "int8"]))
def test_qkv_accepted_exactly_when_supported(head_dim, nheads, nheads_k, dtype):
    supported = (head_dim % 8 == 0 and 8 <= head_dim <= 256 and nheads % nheads_k == 0
                 and dtype in ("float16", "bfloat16"))
    q, k, v = qkv(nheads=nheads, nheads_k=nheads_k, head_dim=head_dim, dtype=dtype)
    if supported:
        validate.check_qkv(q, k, v)
    else:
        with pytest.raises((TypeError, ValueError)):
            validate.check_qkv(q, k, v)


BAD_OUT = {
    "shape": (array_info((2, 113, 4, 32)), ValueError, r"\bout\b.*q's shape"),
    "dtype": (replace(Q, dtype="bfloat16"), TypeError, r"\bout\b.*q's dtype"),
    "device": (replace(Q, device=1), ValueError, r"\bout\b.*device"),
    "framework": (replace(Q, framework="torch"), TypeError, r"\bout\b.*framework"),
    "last dim strided": (replace(Q, strides=(113 * 4 * 128, 4 * 128, 128, 2)), ValueError,
                         r"\bout\b.*contiguous in its last"),
    "pointer off 16 bytes": (replace(Q, data_ptr=(1 << 20) + 8), ValueError, r"\bout\b.*16-byte"),
    "row stride not 8 elements": (replace(Q, strides=(113 * 4 * 68, 4 * 68, 68, 1)), ValueError, r"\bout\b.*16-byte"),
}


def test_valid_out_passes():
    validate.check_out(Q, Q)
    validate.check_out(replace(Q, strides=(113 * 4 * 72, 4 * 72, 72, 1), data_ptr=16), Q)  # padded rows


@pytest.mark.parametrize("case", BAD_OUT, ids=str)
def test_bad_out(case):
    out, error, message = BAD_OUT[case]
    with pytest.raises(error, match=message):
        validate.check_out(out, Q)


@pytest.mark.parametrize("shape, strides, data_ptr, aligned", [
    ((2, 113, 4, 64), None, 1 << 20, True),            # contiguous
    ((2, 113, 4, 64), None, (1 << 20) + 2, False),     # pointer off by one element
    ((2, 113, 4, 64), None, 16, True),
    ((2, 113, 4, 64), (113 * 4 * 72, 4 * 72, 72, 1), 0, True),   # rows padded to 72 elements
    ((2, 113, 4, 64), (113 * 4 * 68, 4 * 68, 68, 1), 0, False),  # rows padded to 68 elements
    ((2, 113, 4, 64), (4 * 113 * 64, 64, 113 * 64, 1), 0, True),  # view of a (b, h, s, d) array
    ((1, 1, 1, 12), None, 32, True),                   # odd row stride but only one row
    ((1, 2, 1, 12), None, 32, False),                  # ... and with two rows
    ((2, 1, 1, 8), (12, 4, 4, 1), 0, False),           # batch stride 12 on a dim of size 2
    ((1, 1, 1, 8), (12, 4, 4, 1), 0, True),            # same strides, all dims of size 1
])
def test_is_aligned(shape, strides, data_ptr, aligned):
    assert validate.is_aligned(array_info(shape, strides=strides, data_ptr=data_ptr)) is aligned


@pytest.mark.parametrize("value, head_dim, expected", [
    (None, 64, 0.125), (None, 8, 1 / math.sqrt(8)), (None, 200, 1 / math.sqrt(200)),
    (2, 64, 2.0), (0.5, 64, 0.5), (np.float32(0.25), 64, 0.25), (1e-30, 64, 1e-30),
])
def test_softmax_scale(value, head_dim, expected):
    scale = validate.softmax_scale(value, head_dim)
    assert type(scale) is float and scale == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("value, error", [
    (-0.125, ValueError), (0, ValueError), (0.0, ValueError), (-0.0, ValueError),
    (math.inf, ValueError), (-math.inf, ValueError), (math.nan, ValueError),
    (True, TypeError), (False, TypeError), ("0.125", TypeError), (1j, TypeError), ([0.1], TypeError),
], ids=repr)
def test_bad_softmax_scale(value, error):
    with pytest.raises(error, match="softmax_scale"):
        validate.softmax_scale(value, 64)


@pytest.mark.parametrize("value", [1, 0, None, "True", 1.0])
def test_causal_must_be_bool(value):
    with pytest.raises(TypeError, match="causal"):
        validate.flag("causal", value)


def test_causal_bool_passes():
    assert validate.flag("causal", True) is True and validate.flag("causal", False) is False


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 0.999, np.float32(0.1)])
def test_dropout_p(value):
    assert validate.dropout_p(value) == pytest.approx(float(value))


@pytest.mark.parametrize("value, error", [
    (-0.1, ValueError), (1.0, ValueError), (1, ValueError), (1.5, ValueError), (math.nan, ValueError),
    (math.inf, ValueError), ("0.1", TypeError), (None, TypeError), (True, TypeError), (0.1j, TypeError),
], ids=repr)
def test_bad_dropout_p(value, error):
    with pytest.raises(error, match="dropout_p"):
        validate.dropout_p(value)


def test_describe_refuses_host_arrays():
    with pytest.raises(TypeError, match=r"\bq\b.*host"):
        interop.describe(np.zeros((1, 1, 1, 8), np.float16), "q")
    with pytest.raises(TypeError, match=r"\bk\b"):
        interop.describe([[1.0]], "k")


def _numpy_qkv():
    return [np.zeros(shape, np.float16) for shape in ((1, 4, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64))]


def test_forward_refuses_numpy_before_anything_else(monkeypatch):
    """A host array fails in describe: nothing is allocated, compiled or launched (no GPU needed)."""
    def touched(*args, **kwargs):
        raise AssertionError("forward went past validation with a host array")

    monkeypatch.setattr(interop, "caller_stream", touched)
    monkeypatch.setattr(cuflash.ops, "launch_forward", touched)
    with pytest.raises(TypeError, match=r"\bq\b.*host"):
        cuflash.forward(*_numpy_qkv())
    with pytest.raises(TypeError, match=r"\bq\b.*host"):
        cuflash.flash_attn_func(*_numpy_qkv(), causal=True)


def test_flash_attn_func_checks_dropout_first():
    with pytest.raises(ValueError, match="dropout_p"):
        cuflash.flash_attn_func(*_numpy_qkv(), dropout_p=1.0)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"window_size": (128, 0)}, NotImplementedError, r"window_size=\(128, 0\) is not supported"),
    ({"window_size": [-1, 64]}, NotImplementedError, "window_size"),
    ({"window_size": (-2, 0)}, TypeError, "window_size must be a pair"),
    ({"window_size": 128}, TypeError, "window_size must be a pair"),
    ({"window_size": (1.5, 0)}, TypeError, "window_size must be a pair"),
    ({"softcap": -1.0}, ValueError, "softcap must be"),
    ({"softcap": "30"}, ValueError, "softcap must be"),
    ({"alibi_slopes": np.ones(2, np.float32)}, NotImplementedError, "alibi_slopes"),
    ({"return_attn_probs": True, "dropout_p": 0.1}, NotImplementedError, "dropout_mask"),
    ({"return_attn_probs": 1}, TypeError, "return_attn_probs must be a bool"),
], ids=repr)
def test_flash_attn_func_refuses_what_it_does_not_compute_before_anything_runs(kwargs, error, match):
    with pytest.raises(error, match=match):
        cuflash.flash_attn_func(*_numpy_qkv(), **kwargs)


def test_flash_attn_func_takes_flash_attn_positional_order():
    """q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
    deterministic, return_attn_probs: the old 7th argument (return_lse=True) is now refused as a
    window size rather than silently changing the result's type."""
    with pytest.raises(TypeError, match="window_size must be a pair"):
        cuflash.flash_attn_func(*_numpy_qkv(), 0.0, None, True, True)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        cuflash.flash_attn_func(*_numpy_qkv(), 0.0, None, True, (-1, -1), 50.0, np.ones(2, np.float32))
    with pytest.raises(TypeError, match=r"\bq\b.*host"):  # defaults accepted, then the host array refused
        cuflash.flash_attn_func(*_numpy_qkv(), 0.0, None, True, (-1, -1), 0.0, None, False, False)


@pytest.mark.parametrize("func, shape, match", [
    ("flash_attn_qkvpacked_func", (1, 8, 2, 2, 64), r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"),
    ("flash_attn_qkvpacked_func", (1, 8, 3, 64), "qkv must have shape"),
    ("flash_attn_kvpacked_func", (1, 8, 3, 2, 64), r"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\)"),
])
def test_packed_inputs_are_checked(func, shape, match):
    class ndarray:  # a stand-in CuPy array (its type's package is what interop.framework_of reads)
        __module__ = "cupy"

    x = ndarray()
    x.shape = shape
    args = (x,) if func == "flash_attn_qkvpacked_func" else (_numpy_qkv()[0], x)
    with pytest.raises(ValueError, match=match):
        getattr(cuflash, func)(*args)


def test_packed_host_arrays_are_a_type_error():
    with pytest.raises(TypeError, match="qkv must be a CuPy, PyTorch or JAX array"):
        cuflash.flash_attn_qkvpacked_func(np.zeros((1, 8, 3, 2, 64), np.float16))


@pytest.mark.parametrize("value, expected", [(None, 0), (0, 0), (7, 7), (2**64 + 3, 3), (-1, 2**64 - 1),
                                             (np.uint64(2**63), 2**63)], ids=repr)
def test_seed(value, expected):
    assert validate.seed(value, 0.0 if value is None else 0.5) == expected


@pytest.mark.parametrize("value, dropout_p, error", [
    (None, 0.1, ValueError), (1.5, 0.1, TypeError), ("3", 0.1, TypeError), (True, 0.1, TypeError),
    (np.zeros(2), 0.0, TypeError),
], ids=repr)
def test_bad_seed(value, dropout_p, error):
    with pytest.raises(error, match="seed"):
        validate.seed(value, dropout_p)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (2**64, ValueError), (1.0, TypeError),
                                          (None, TypeError), (False, TypeError)], ids=repr)
def test_bad_offset(value, error):
    with pytest.raises(error, match="offset"):
        validate.offset(value)
