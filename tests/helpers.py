"""Helpers shared by the test modules, which import them from here and never from each other
(conftest.py holds only pytest's hooks and fixtures). CuPy is needed only by the helpers that
make or run CuPy arrays, so the CPU suites import this module without it.

The error rule of every correctness test: compare with float64, never with cuflash itself.

cuflash's error against the float64 reference must be at most twice the error of the same
computation done in the input's precision (reference.attention_reference(upcast=False)), plus a
small absolute slack for the final rounding of O.
"""
import contextlib
import os
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from cuflash import backward_launch, forward_launch, ops, plan
from cuflash import compile as compile_, interop, reference
from cuflash.reference import attention_reference, attention_reference_backward, from_float32

try:
    import cupy
except ImportError:  # the CPU suites; the GPU ones skip on pytest.importorskip("cupy")
    cupy = None

ROOT = Path(__file__).resolve().parent.parent  # the checkout (or unpacked sdist) that holds tests/


# --- the 2x rule ---------------------------------------------------------------------------------

SLACK = {"float16": 2e-4, "bfloat16": 2e-3, "float32": 1e-6, "float64": 1e-12}


def max_abs_err(a, b):
    """max |a - b| over finite entries; inf entries must match exactly (e.g. lse = -inf rows)."""
    xp = _xp(a)
    a = xp.asarray(a, dtype=np.float64)
    b = xp.asarray(b, dtype=np.float64)
    assert not bool(xp.isnan(a).any()), "result holds NaN (an unwritten or poisoned element?)"
    same_inf = xp.isinf(a) == xp.isinf(b)
    assert bool(same_inf.all()), "infinite entries differ from the reference"
    finite = xp.isfinite(b)
    if not bool(finite.any()):
        return 0.0
    return float(xp.abs(xp.where(finite, a, 0) - xp.where(finite, b, 0)).max())


def assert_2x(out, ref64, ref_lowp, dtype, what="o"):
    err = max_abs_err(out, ref64)
    err_lowp = max_abs_err(ref_lowp, ref64)
    bound = 2 * err_lowp + SLACK[dtype]
    assert err <= bound, f"{what}: error {err:.3g} > 2 x {err_lowp:.3g} (same computation in {dtype}) + {SLACK[dtype]}"
    return err, err_lowp


def assert_forward_2x(o, lse, q, k, v, softmax_scale=None, causal=False, **dropout):
    """O (and lse, unless None) of attention(q, k, v) against the float64 reference, with the same
    computation in q's precision as the yardstick (2x rule); `dropout` holds the references'
    dropout_p and dropout_mask, if any."""
    dtype = q.dtype.name
    o_ref, lse_ref = attention_reference(q, k, v, softmax_scale, causal, **dropout)
    o_low, lse_low = attention_reference(q, k, v, softmax_scale, causal, upcast=False, **dropout)
    assert_2x(o, o_ref, o_low, dtype)
    if lse is not None:
        assert_2x(lse, lse_ref, lse_low, dtype, "lse")


def assert_backward_2x(grads, dout, q, k, v, softmax_scale=None, causal=False, **dropout):
    """grads = (dq, dk, dv) for upstream gradient dout against the float64 reference backward
    (2x rule), as assert_forward_2x."""
    dtype = q.dtype.name
    ref = attention_reference_backward(dout, q, k, v, softmax_scale, causal, **dropout)
    low = attention_reference_backward(dout, q, k, v, softmax_scale, causal, upcast=False, **dropout)
    for name, got, r, lo in zip(("dq", "dk", "dv"), grads, ref, low):
        assert_2x(got, r, lo, dtype, name)


def assert_matches_finite_differences(grads, inputs, dout, forward, seed, eps=1e-6):
    """<grad, u> = d/de <dO, forward(x + e u)> by central differences, for each input x in turn
    (float64; `forward(*inputs)` returns O)."""
    rng = np.random.default_rng(seed)
    for which, grad in enumerate(grads):
        u = rng.standard_normal(grad.shape)
        plus, minus = list(inputs), list(inputs)
        plus[which] = plus[which] + eps * u
        minus[which] = minus[which] - eps * u
        numeric = float((dout * (forward(*plus) - forward(*minus))).sum() / (2 * eps))
        analytic = float((grad * u).sum())
        assert abs(numeric - analytic) <= 1e-6 * (1 + abs(analytic)), f"gradient {which}"


def _xp(a):
    return np if cupy is None else cupy.get_array_module(a)


# --- NumPy problems for the tiled models (the CPU suites) -----------------------------------------

@st.composite
def model_problems(draw, awkward, max_seqlen, max_nheads_k=2, groups=(1, 2, 3, 4, 8), head_dims=range(8, 257, 8),
                   **extra):
    """A problem (a dict) for the NumPy models: seqlens from `awkward` (those up to max_seqlen) or
    any up to max_seqlen, sq != sk, GQA groups, head dims, causal or not, the model's tiles, scale,
    data seed; plus a field per `extra` strategy."""
    seqlen = st.one_of(st.sampled_from([n for n in awkward if n <= max_seqlen]), st.integers(1, max_seqlen))
    nheads_k = draw(st.integers(1, max_nheads_k))
    return dict(
        batch=draw(st.integers(1, 2)), seqlen_q=draw(seqlen), seqlen_k=draw(seqlen),
        nheads_k=nheads_k, nheads=nheads_k * draw(st.sampled_from(groups)),
        head_dim=draw(st.sampled_from(head_dims)), causal=draw(st.booleans()),
        block_m=draw(st.sampled_from([16, 32, 64, 128])), block_n=draw(st.sampled_from([16, 32, 64, 128])),
        softmax_scale=draw(st.one_of(st.none(), st.floats(0.01, 2.0))), seed=draw(st.integers(0, 2**31)),
        **{name: draw(strategy) for name, strategy in extra.items()})


def make_inputs(p, dtype):
    """q, k, v, dout in dtype (standard normal values rounded to it)."""
    rng = np.random.default_rng(p["seed"])
    q_shape = (p["batch"], p["seqlen_q"], p["nheads"], p["head_dim"])
    kv_shape = (p["batch"], p["seqlen_k"], p["nheads_k"], p["head_dim"])
    return [from_float32(rng.standard_normal(s).astype(np.float32), dtype) for s in (q_shape, kv_shape, kv_shape, q_shape)]


# --- CuPy arrays and fuzzed problems (the GPU suites) ---------------------------------------------

AWKWARD_SEQLENS = [1, 2, 3, 17, 63, 64, 65, 113, 127, 128, 129, 203, 239, 257, 509, 1021, 1999]
LAYOUTS = ["contiguous", "bhsd", "packed", "padded"]


def randn(shape, dtype, layout="contiguous", seed=0):
    """A random CuPy array of `shape` (b, s, h, d), as a view with the strides of `layout`:
    bhsd: a transposed (b, h, s, d) tensor; packed: one of three in (b, s, 3, h, d); padded: the
    first d columns of (b, s, h, d + 8)."""
    b, s, h, d = shape
    full = {"contiguous": (b, s, h, d), "bhsd": (b, h, s, d), "packed": (b, s, 3, h, d), "padded": (b, s, h, d + 8)}[layout]
    x = from_float32(cupy.random.default_rng(seed).standard_normal(full, dtype=cupy.float32), dtype)
    return {"contiguous": lambda: x, "bhsd": lambda: x.transpose(0, 2, 1, 3), "packed": lambda: x[:, :, 1],
            "padded": lambda: x[..., :d]}[layout]()


def qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype, layout="contiguous", seed=0):
    return (randn((batch, seqlen_q, nheads, head_dim), dtype, layout, seed),
            randn((batch, seqlen_k, nheads_k, head_dim), dtype, layout, seed + 1),
            randn((batch, seqlen_k, nheads_k, head_dim), dtype, layout, seed + 2))


def poisoned(shape, dtype):
    return from_float32(cupy.full(shape, cupy.nan, dtype=cupy.float32), dtype)


def problems(max_seqlen=2000, max_batch=3, max_scores=6e7, groups=(1, 2, 3, 4, 8), **extra):
    """Fuzzed problems (a dict): awkward or random seqlens up to max_seqlen, sq != sk, GQA groups,
    every head dim, both dtypes, strided layouts, causal or not, scale, data seed; plus a field per
    `extra` strategy. The batch shrinks so that the float64 reference's (b, h, sq, sk) scores stay
    under max_scores elements (6e7: ~0.5 GB)."""
    @st.composite
    def draw_problem(draw):
        seqlen = st.one_of(st.sampled_from(AWKWARD_SEQLENS), st.integers(1, max_seqlen))
        nheads_k = draw(st.integers(1, 2))
        p = dict(batch=draw(st.integers(1, max_batch)), seqlen_q=draw(seqlen), seqlen_k=draw(seqlen),
                 nheads_k=nheads_k, nheads=nheads_k * draw(st.sampled_from(groups)),
                 head_dim=draw(st.sampled_from(range(8, 257, 8))), dtype=draw(st.sampled_from(plan.DTYPES)),
                 layout=draw(st.sampled_from(LAYOUTS)), causal=draw(st.booleans()),
                 softmax_scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))), seed=draw(st.integers(0, 2**20)),
                 **{name: draw(strategy) for name, strategy in extra.items()})
        p["batch"] = max(1, min(p["batch"], int(max_scores // (p["nheads"] * p["seqlen_q"] * p["seqlen_k"]))))
        return p
    return draw_problem()


def rows_that_see_a_key(p):
    rows = p["seqlen_q"] if not p["causal"] else max(0, min(p["seqlen_q"], p["seqlen_k"]))
    return p["batch"] * p["nheads"] * rows


# --- which kernels run ---------------------------------------------------------------------------

FAMILIES = ["default", "portable"]
# Fuzzed softcaps: off half the time; 2 caps most scores of the fuzzed problems, 30 only the tails.
SOFTCAPS = st.sampled_from([0.0, 0.0, 2.0, 30.0])


def variant_softcap(variant):
    """The softcap a test of every variant passes: 5 where the variant caps, else off."""
    return 5.0 if variant.softcap else 0.0


# Softcaps of the reference and model tests (always on): a few round ones and the range between.
POSITIVE_SOFTCAPS = st.sampled_from([1.0, 5.0, 30.0]) | st.floats(0.25, 50.0)


def softcap_dropout(p):
    """(the references' dropout arguments, the models') for problem p: none when dropout_p = 0,
    else the mask of (seed, offset = 0) and the (seed, offset) the models draw it from."""
    if not p["dropout_p"]:
        return {}, {}
    mask = reference.dropout_mask(p["seed"], 0, p["batch"], p["nheads"], p["seqlen_q"], p["seqlen_k"], p["dropout_p"])
    return dict(dropout_p=p["dropout_p"], dropout_mask=mask), dict(dropout_p=p["dropout_p"], seed=p["seed"], offset=0)



@contextlib.contextmanager
def forward_path(path):
    """Run on `path` for the duration: "portable" sets CUFLASH_PORTABLE=1 (no sm_90a kernels);
    "3_ctas" gives the persistent sm_90a forward a grid of 3 CTAs, so that small problems too
    walk many tiles per CTA."""
    saved = os.environ.get("CUFLASH_PORTABLE"), forward_launch.sm_count
    os.environ["CUFLASH_PORTABLE"] = "1" if path == "portable" else "0"
    if path == "3_ctas":
        forward_launch.sm_count = lambda device_id: 3
    ops.clear_plan_cache()  # plans hold their grids
    try:
        yield
    finally:
        forward_launch.sm_count = saved[1]
        ops.clear_plan_cache()
        if saved[0] is None:
            del os.environ["CUFLASH_PORTABLE"]
        else:
            os.environ["CUFLASH_PORTABLE"] = saved[0]


def forget_compiled(monkeypatch):
    """Make this process forget every kernel it compiled or loaded, as a new process would."""
    for module, name in ((compile_, "_memory"), (compile_, "_modules"), (compile_, "_functions"),
                         (forward_launch, "_prepared"), (backward_launch, "_prepared")):
        monkeypatch.setattr(module, name, {})
    ops.clear_plan_cache()


# --- framework arrays and array descriptions ------------------------------------------------------

def torch_qkv(torch, shape, dtype, layout="contiguous", requires_grad=(True, True, True), seed=0):
    """q (b, sq, h, d), k, v (b, sk, hk, d); with layout "bhsd" they are transposed views of
    (b, h, s, d) tensors. Leaves, each requiring grad as asked."""
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def make(seqlen, heads):
        full = (batch, heads, seqlen, head_dim) if layout == "bhsd" else (batch, seqlen, heads, head_dim)
        x = torch.randn(full, generator=gen, device="cuda").to(dtype)
        return x.transpose(1, 2) if layout == "bhsd" else x

    xs = [make(seqlen_q, nheads), make(seqlen_k, nheads_k), make(seqlen_k, nheads_k)]
    return [x.requires_grad_(r) for x, r in zip(xs, requires_grad)]


def array_info(shape, dtype="float16", strides=None, device=0, framework="cupy", data_ptr=1 << 20):
    """A hand-built interop.ArrayInfo, CuPy-like; the default is contiguous and 16-byte aligned."""
    shape = tuple(shape)
    return interop.ArrayInfo(framework, shape, interop._c_strides(shape) if strides is None else tuple(strides),
                             dtype, device, data_ptr)
