"""GPU: the forward against the float64 reference (2x rule), from CuPy, PyTorch and JAX callers.

Outputs are poisoned with NaN before each launch so an unwritten element fails the test. The fuzz
and edge-shape tests run each problem on both kernel families: the default (the sm_90a kernels on
a compute capability 9.0 GPU, for the head dims that have one) and the portable one.
"""
import numpy as np
import pytest
from hypothesis import given, settings

from helpers import (FAMILIES, SOFTCAPS, assert_2x, assert_forward_2x, forward_path, poisoned, problems, qkv, randn, torch_qkv,
                     variant_softcap)

cupy = pytest.importorskip("cupy")
import cuflash  # noqa: E402
from cuflash import plan  # noqa: E402
from cuflash.reference import attention_reference  # noqa: E402

pytestmark = pytest.mark.gpu

PATHS = FAMILIES + ["3_ctas"]


def check_forward(q, k, v, causal, softmax_scale=None, tile=None, softcap=0.0):
    dtype = q.dtype.name
    out = poisoned(q.shape, dtype)
    o, lse = cuflash.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, out=out, tile=tile, softcap=softcap)
    assert o is out and lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == np.float32
    assert_forward_2x(o, lse, q, k, v, softmax_scale, causal, softcap=softcap)


@pytest.mark.parametrize("variant", plan.forward_variants(), ids=repr)
@pytest.mark.parametrize("seqlens", [(113, 203), (203, 113), (128, 128)])
def test_every_variant(variant, seqlens):
    """Every variant the dispatcher can pick on any sm_80+ GPU (tiles shrunk for small shared
    memories included), at awkward sizes."""
    if plan.is_hopper(variant) and cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the sm_90a kernels need a compute capability 9.0 GPU")
    check_forward(*qkv(2, *seqlens, 4, 2, variant.head_dim, variant.dtype), variant.causal, tile=variant.tile,
                  softcap=variant_softcap(variant))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(problems(softcap=SOFTCAPS))
def test_forward_fuzz(path, p):
    q, k, v = qkv(p["batch"], p["seqlen_q"], p["seqlen_k"], p["nheads"], p["nheads_k"], p["head_dim"],
                  p["dtype"], p["layout"], p["seed"])
    with forward_path(path):
        check_forward(q, k, v, p["causal"], p["softmax_scale"], softcap=p["softcap"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 239, 1), (1, 1, 239), (2, 4000, 4000), (1, 3, 4099)])
@pytest.mark.parametrize("causal", [False, True])
def test_edge_shapes(shape, causal, head_dim, path):
    batch, seqlen_q, seqlen_k = shape
    with forward_path(path):
        check_forward(*qkv(batch, seqlen_q, seqlen_k, 8, 1, head_dim, "bfloat16", seed=seqlen_k), causal)


def test_the_persistent_grid_leaves_its_counter_at_zero(monkeypatch):
    """The sm_90a forward's work counter is taken from a ring and zeroed by the kernel itself:
    with every launch handed the ring's first slot (units from 1 to more than the SM count,
    causal and not, from CuPy and from torch's eager path), each result is exact, and the slot
    reads zero after them."""
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the persistent grid is the sm_90a forward's")
    import itertools

    from cuflash import work_counters

    monkeypatch.setattr(work_counters, "_turns", itertools.repeat(0))  # the ring keeps its size
    for batch, seqlen, causal in ((1, 17, False), (3, 1000, True), (2, 300, False), (1, 129, True), (4, 2000, False)):
        check_forward(*qkv(batch, seqlen, seqlen, 4, 2, 128, "bfloat16"), causal)
    torch = pytest.importorskip("torch")
    q, k, v = torch_qkv(torch, (2, 700, 700, 4, 2, 64), torch.bfloat16, requires_grad=(False,) * 3)
    refs = [attention_reference(*(cupy.from_dlpack(x) for x in (q, k, v)), causal=True, upcast=u)[0] for u in (True, False)]
    for _ in range(3):  # the second and third calls take torch_ops' known-signature path
        assert_2x(cupy.from_dlpack(cuflash.flash_attn_func(q, k, v, causal=True)), *refs, "bfloat16")
    cupy.cuda.Device().synchronize()
    slot = work_counters.take(cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    value = cupy.ndarray((1,), cupy.int32, cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(slot, 4, None), 0))
    assert int(value[0]) == 0


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

TORCH_SHAPE = (2, 300, 257, 8, 2, 64)  # batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim
NO_GRAD = (False, False, False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "bhsd"])
def test_torch_inputs_zero_copy_and_torch_outputs(dtype, layout):
    torch = pytest.importorskip("torch")
    from cuflash import interop

    q, k, v = torch_qkv(torch, TORCH_SHAPE, getattr(torch, dtype), layout, NO_GRAD)
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
    q, k, v = torch_qkv(torch, TORCH_SHAPE, torch.float16, requires_grad=NO_GRAD)
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
        cuflash.flash_attn_func(torch.zeros(1, 4, 1, 64, dtype=torch.float16),
                                *torch_qkv(torch, TORCH_SHAPE, torch.float16, requires_grad=NO_GRAD)[1:])


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
