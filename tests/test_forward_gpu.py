"""GPU: the forward against the float64 reference (2x rule), from CuPy, PyTorch and JAX callers.

Outputs are poisoned with NaN before each launch so an unwritten element fails the test. The fuzz
and edge-shape tests run each problem on both kernel families: the default (the sm_90a kernels on
a compute capability 9.0 GPU, for the head dims that have one) and the portable one.
"""
import contextlib
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from accuracy import assert_2x

cupy = pytest.importorskip("cupy")
import cuflash  # noqa: E402
from cuflash import plan  # noqa: E402
from cuflash.reference import attention_reference, from_float32  # noqa: E402

pytestmark = pytest.mark.gpu

AWKWARD = [1, 2, 3, 17, 63, 64, 65, 113, 127, 128, 129, 203, 239, 257, 509, 1021, 1999]
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


FAMILIES = ["default", "portable"]
PATHS = FAMILIES + ["3_ctas"]


@contextlib.contextmanager
def forward_path(path):
    """Run on `path` for the duration: "portable" sets CUFLASH_PORTABLE=1 (no sm_90a kernels);
    "3_ctas" gives the persistent sm_90a forward a grid of 3 CTAs, so that small problems too
    walk many tiles per CTA."""
    forward = sys.modules["cuflash.forward"]  # the module, which cuflash.forward (the function) hides
    saved = os.environ.get("CUFLASH_PORTABLE"), forward.sm_count
    os.environ["CUFLASH_PORTABLE"] = "1" if path == "portable" else "0"
    if path == "3_ctas":
        forward.sm_count = lambda device_id: 3
    try:
        yield
    finally:
        forward.sm_count = saved[1]
        if saved[0] is None:
            del os.environ["CUFLASH_PORTABLE"]
        else:
            os.environ["CUFLASH_PORTABLE"] = saved[0]


def poisoned(shape, dtype):
    return from_float32(cupy.full(shape, cupy.nan, dtype=cupy.float32), dtype)


def check_forward(q, k, v, causal, softmax_scale=None, tile=None):
    dtype = q.dtype.name
    out = poisoned(q.shape, dtype)
    o, lse = cuflash.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, out=out, tile=tile)
    assert o is out and lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == np.float32
    o_ref, lse_ref = attention_reference(q, k, v, softmax_scale, causal)
    o_low, lse_low = attention_reference(q, k, v, softmax_scale, causal, upcast=False)
    assert_2x(o, o_ref, o_low, dtype)
    assert_2x(lse, lse_ref, lse_low, dtype, "lse")


def qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype, layout="contiguous", seed=0):
    return (randn((batch, seqlen_q, nheads, head_dim), dtype, layout, seed),
            randn((batch, seqlen_k, nheads_k, head_dim), dtype, layout, seed + 1),
            randn((batch, seqlen_k, nheads_k, head_dim), dtype, layout, seed + 2))


@pytest.mark.parametrize("variant", plan.forward_variants(), ids=repr)
@pytest.mark.parametrize("seqlens", [(113, 203), (203, 113), (128, 128)])
def test_every_variant(variant, seqlens):
    """Every variant the dispatcher can pick on any sm_80+ GPU (tiles shrunk for small shared
    memories included), at awkward sizes."""
    if plan.is_hopper(variant) and cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the sm_90a kernels need a compute capability 9.0 GPU")
    check_forward(*qkv(2, *seqlens, 4, 2, variant.head_dim, variant.dtype), variant.causal, tile=variant.tile)


def problems(max_seqlen=2000, max_batch=3, max_scores=6e7, groups=(1, 2, 3, 4, 8), **extra):
    """Fuzzed problems (a dict): awkward or random seqlens up to max_seqlen, sq != sk, GQA groups,
    every head dim, both dtypes, strided layouts, causal or not, scale, data seed; plus a field per
    `extra` strategy. The batch shrinks so that the float64 reference's (b, h, sq, sk) scores stay
    under max_scores elements (6e7: ~0.5 GB)."""
    @st.composite
    def draw_problem(draw):
        seqlen = st.one_of(st.sampled_from(AWKWARD), st.integers(1, max_seqlen))
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


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(problems())
def test_forward_fuzz(path, p):
    q, k, v = qkv(p["batch"], p["seqlen_q"], p["seqlen_k"], p["nheads"], p["nheads_k"], p["head_dim"],
                  p["dtype"], p["layout"], p["seed"])
    with forward_path(path):
        check_forward(q, k, v, p["causal"], p["softmax_scale"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 239, 1), (1, 1, 239), (2, 4000, 4000), (1, 3, 4099)])
@pytest.mark.parametrize("causal", [False, True])
def test_edge_shapes(shape, causal, head_dim, path):
    batch, seqlen_q, seqlen_k = shape
    with forward_path(path):
        check_forward(*qkv(batch, seqlen_q, seqlen_k, 8, 1, head_dim, "bfloat16", seed=seqlen_k), causal)


def test_misaligned_rows_are_copied_and_stay_exact():
    """Rows 24 bytes apart cannot feed cp.async; the API copies such a view and stays exact."""
    base = randn((2, 77, 3, 12), "float16")
    q = base[..., :8]
    assert q.strides[2] == 24
    check_forward(q, q, q, causal=True)


def test_views_a_tensor_map_cannot_read_stay_exact():
    """K and V broadcast over heads (stride 0), which TMA cannot express: the sm_90a path hands
    them to the portable kernel."""
    q = randn((2, 300, 4, 128), "bfloat16")
    k, v = (cupy.broadcast_to(randn((2, 257, 1, 128), "bfloat16", seed=s), (2, 257, 4, 128)) for s in (1, 2))
    assert k.strides[2] == 0
    check_forward(q, k, v, causal=True)


def test_misaligned_out_is_refused():
    q = randn((1, 16, 2, 64), "float16")
    out = poisoned((1, 16, 2, 72), "float16")[..., 4:68]
    with pytest.raises(ValueError, match="out"):
        cuflash.forward(q, q, q, out=out)


def test_empty_inputs_return_empty_results_or_minus_inf():
    for shape_q, shape_k in [((0, 5, 2, 64), (0, 5, 2, 64)), ((1, 0, 2, 64), (1, 5, 2, 64))]:
        o, lse = cuflash.forward(cupy.empty(shape_q, cupy.float16), cupy.empty(shape_k, cupy.float16), cupy.empty(shape_k, cupy.float16))
        assert o.shape == shape_q and lse.shape == (shape_q[0], 2, shape_q[1])
    o, lse = cuflash.forward(*(cupy.ones(s, cupy.float16) for s in [(1, 5, 2, 64), (1, 0, 2, 64), (1, 0, 2, 64)]))
    assert (o == 0).all() and cupy.isneginf(lse).all()


def test_offsets_beyond_2_31_elements():
    """q and o hold 2^31 + elements: row offsets must be 64-bit. Checks the last rows only."""
    seqlen_q, nheads, head_dim = 2**20 + 77, 16, 128
    q = randn((1, seqlen_q, nheads, head_dim), "float16")
    k, v = randn((1, 64, nheads, head_dim), "float16", seed=1), randn((1, 64, nheads, head_dim), "float16", seed=2)
    o, lse = cuflash.forward(q, k, v)
    tail = slice(seqlen_q - 300, seqlen_q)
    o_ref, lse_ref = attention_reference(q[:, tail], k, v)
    o_low, _ = attention_reference(q[:, tail], k, v, upcast=False)
    assert_2x(o[:, tail], o_ref, o_low, "float16")
    del q, o, lse


SPIN = cupy.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
    long long start = clock64(); while (clock64() - start < cycles) {} }''', "spin")


def test_runs_on_cupy_current_stream():
    """q is written on a side stream behind a ~50 ms spin; cuflash must run after it on that stream."""
    src = qkv(1, 512, 512, 4, 4, 64, "float16")
    q = poisoned(src[0].shape, "float16")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        SPIN((1,), (1,), (np.int64(10**8),))
        q[...] = src[0]
        o, _ = cuflash.forward(q, src[1], src[2])
    stream.synchronize()
    o_ref, _ = attention_reference(*src)
    o_low, _ = attention_reference(*src, upcast=False)
    assert_2x(o, o_ref, o_low, "float16")


# --- PyTorch callers -------------------------------------------------------------------------

def torch_qkv(torch, dtype, layout, seqlen_q=300, seqlen_k=257):
    shape = lambda s, h: (2, h, s, 64) if layout == "bhsd" else (2, s, h, 64)  # noqa: E731
    make = lambda s, h: torch.randn(shape(s, h), dtype=dtype, device="cuda")  # noqa: E731
    xs = [make(seqlen_q, 8), make(seqlen_k, 2), make(seqlen_k, 2)]
    return [x.transpose(1, 2) for x in xs] if layout == "bhsd" else xs


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "bhsd"])
def test_torch_inputs_zero_copy_and_torch_outputs(dtype, layout):
    torch = pytest.importorskip("torch")
    from cuflash import interop

    q, k, v = torch_qkv(torch, getattr(torch, dtype), layout)
    assert interop.launchable(q, interop.describe(q, "q"))[1].data_ptr == q.data_ptr()
    o, lse = cuflash.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert isinstance(o, torch.Tensor) and o.dtype == q.dtype and o.device == q.device and o.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (2, 8, 300)
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    o_ref, lse_ref = attention_reference(qc, kc, vc, causal=True)
    o_low, lse_low = attention_reference(qc, kc, vc, causal=True, upcast=False)
    assert_2x(cupy.from_dlpack(o), o_ref, o_low, dtype)
    assert_2x(cupy.from_dlpack(lse), lse_ref, lse_low, dtype, "lse")


def test_torch_current_stream_is_respected():
    torch = pytest.importorskip("torch")
    q, k, v = torch_qkv(torch, torch.float16, "contiguous")
    q_late = torch.full_like(q, float("nan"))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10**8)
        q_late.copy_(q)
        o = cuflash.flash_attn_func(q_late, k, v)
    stream.synchronize()
    o_ref, _ = attention_reference(*(cupy.from_dlpack(x) for x in (q, k, v)))
    o_low, _ = attention_reference(*(cupy.from_dlpack(x) for x in (q, k, v)), upcast=False)
    assert_2x(cupy.from_dlpack(o), o_ref, o_low, "float16")


def test_torch_cpu_tensor_is_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="q must be a CUDA"):
        cuflash.flash_attn_func(torch.zeros(1, 4, 1, 64, dtype=torch.float16), *torch_qkv(torch, torch.float16, "contiguous")[1:])


# --- JAX callers -----------------------------------------------------------------------------

def test_jax_inputs_and_outputs():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 300, 4, 128), dtype=jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, 1000, 2, 128), dtype=jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, 1000, 2, 128), dtype=jnp.bfloat16)
    from cuflash import interop

    assert interop.launchable(q, interop.describe(q, "q"))[1].data_ptr == q.unsafe_buffer_pointer()
    o, lse = cuflash.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert isinstance(o, jax.Array) and o.dtype == jnp.bfloat16 and o.shape == q.shape
    o2 = o * 2  # JAX consumes the result on its own stream
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    o_ref, lse_ref = attention_reference(qc, kc, vc, causal=True)
    o_low, lse_low = attention_reference(qc, kc, vc, causal=True, upcast=False)
    assert_2x(cupy.from_dlpack(o2) / 2, o_ref, o_low, "bfloat16")
    assert_2x(cupy.from_dlpack(lse), lse_ref, lse_low, "bfloat16", "lse")
