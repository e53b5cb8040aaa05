"""GPU: attention dropout. The mask helper against the NumPy specification; forward and gradients
of every dropout variant and of fuzzed shapes against the float64 reference built with the
helper's mask (2x rule); keep rate; same (seed, offset) same bits, other offset other bits;
torch's generator (torch.manual_seed reproduces, successive calls differ, torch.compile draws
anew); JAX with int and traced seeds."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from helpers import assert_backward_2x, assert_forward_2x, poisoned, problems, qkv, randn, rows_that_see_a_key

cupy = pytest.importorskip("cupy")
import cuflash  # noqa: E402
from cuflash import plan, reference  # noqa: E402

pytestmark = pytest.mark.gpu


def assert_matches_reference(q, k, v, causal, dropout_p, mask, softmax_scale=None, o=None, lse=None, dout=None,
                             grads=None):
    """The 2x rule against the float64 reference built with `mask`, for whichever of o, lse and
    (with dout) grads = (dq, dk, dv) are given; q, k, v, dout are CuPy arrays."""
    drop = dict(dropout_p=dropout_p, dropout_mask=mask)
    if o is not None:
        assert_forward_2x(o, lse, q, k, v, softmax_scale, causal, **drop)
    if grads is not None:
        assert_backward_2x(grads, dout, q, k, v, softmax_scale, causal, **drop)


def check_dropout_forward(q, k, v, causal, dropout_p, seed, offset=0, softmax_scale=None, tile=None):
    """(o, lse, mask): the forward with dropout into a poisoned out, checked against the reference
    built with the helper's mask."""
    o, lse = cuflash.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, out=poisoned(q.shape, q.dtype.name),
                             tile=tile, dropout_p=dropout_p, seed=seed, offset=offset)
    mask = cuflash.dropout_mask(q, k, dropout_p, seed, offset)
    assert_matches_reference(q, k, v, causal, dropout_p, mask, softmax_scale, o=o, lse=lse)
    return o, lse, mask


def check_dropout(q, k, v, causal, dropout_p, seed, offset=0, softmax_scale=None, deterministic=False,
                  fwd_tile=None, bwd_tile=None, layout="contiguous"):
    """O, lse and (dq, dk, dv) with dropout against the float64 reference given the helper's mask."""
    o, lse, mask = check_dropout_forward(q, k, v, causal, dropout_p, seed, offset, softmax_scale, fwd_tile)
    dout = randn(q.shape, q.dtype.name, layout, seed % 2**20 + 7)
    grads = cuflash.backward(dout, q, k, v, o, lse, softmax_scale=softmax_scale, causal=causal,
                             deterministic=deterministic, tile=bwd_tile, dropout_p=dropout_p, seed=seed, offset=offset)
    assert_matches_reference(q, k, v, causal, dropout_p, mask, softmax_scale, dout=dout, grads=grads)
    return o, grads


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 113, 203), (1, 203, 113), (1, 129, 1000)], ids=str)
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**40 + 12345, 7), (2**64 - 1, 2**33 + 5)])
def test_mask_helper_is_the_specification(shape, seed, offset):
    batch, seqlen_q, seqlen_k = shape
    q, k, _ = qkv(batch, seqlen_q, seqlen_k, 3, 1, 64, "float16")
    mask = cuflash.dropout_mask(q, k, 0.3, seed, offset)
    assert mask.dtype == np.bool_ and mask.shape == (batch, 3, seqlen_q, seqlen_k)
    spec = reference.dropout_mask(seed, offset, batch, 3, seqlen_q, seqlen_k, 0.3)
    assert np.array_equal(cupy.asnumpy(mask), spec)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(dropout_p):
    q, k, _ = qkv(2, 1000, 999, 4, 4, 64, "bfloat16")
    n = 2 * 4 * 1000 * 999
    kept = int(cuflash.dropout_mask(q, k, dropout_p, 1234).sum())
    assert abs(kept - n * (1 - dropout_p)) <= 5 * math.sqrt(n * dropout_p * (1 - dropout_p))


@pytest.mark.parametrize("variant", [v for v in plan.backward_variants() if v.dropout], ids=repr)
def test_every_dropout_variant(variant):
    """Every dropout backward variant, with a forward dropout variant of the same bucket and tiles
    that differ from the backward's (the mask must not depend on tiles)."""
    forwards = [f for f in plan.forward_variants() if f.dropout and (f.dtype, f.head_dim, f.causal) ==
                (variant.dtype, variant.head_dim, variant.causal)]
    for seqlens in ((113, 203), (203, 113)):
        q, k, v = qkv(1, *seqlens, 4, 2, variant.head_dim, variant.dtype, seed=seqlens[0])
        check_dropout(q, k, v, variant.causal, 0.2, seed=seqlens[1], offset=3, deterministic=variant.deterministic,
                      fwd_tile=forwards[seqlens[0] % len(forwards)].tile, bwd_tile=variant.tile)


@pytest.mark.parametrize("variant", [v for v in plan.forward_variants() if v.dropout], ids=repr)
def test_every_forward_dropout_variant(variant):
    q, k, v = qkv(2, 113, 203, 4, 2, variant.head_dim, variant.dtype)
    check_dropout_forward(q, k, v, variant.causal, 0.3, 99, tile=variant.tile)


@settings(max_examples=60, deadline=None)
@given(problems(max_seqlen=1200, max_batch=2, max_scores=2e7, groups=(1, 2, 4), deterministic=st.booleans(),
                dropout_p=st.sampled_from([0.05, 0.17, 0.5]), dropout_seed=st.integers(0, 2**64 - 1),
                offset=st.integers(0, 2**40)))
def test_dropout_fuzz(p):
    assume(rows_that_see_a_key(p) >= 16)  # as in test_backward_fuzz
    q, k, v = qkv(p["batch"], p["seqlen_q"], p["seqlen_k"], p["nheads"], p["nheads_k"], p["head_dim"],
                  p["dtype"], p["layout"], p["seed"])
    check_dropout(q, k, v, p["causal"], p["dropout_p"], p["dropout_seed"], p["offset"], p["softmax_scale"],
                  p["deterministic"], layout=p["layout"])


@pytest.mark.parametrize("causal", [False, True])
def test_high_dropout_rate_on_a_large_problem(causal):
    """p = 0.9 keeps one entry in ten and scales it by 10: the reference comparison needs many
    rows for its error statistics to settle."""
    q, k, v = qkv(2, 1024, 1024, 8, 2, 128, "bfloat16", seed=9)
    check_dropout(q, k, v, causal, 0.9, seed=5)


def test_same_seed_same_bits_other_offset_other_bits():
    q, k, v = qkv(1, 300, 300, 4, 4, 64, "float16")
    dout = randn(q.shape, "float16", seed=3)

    def run(seed, offset):
        o, lse = cuflash.forward(q, k, v, dropout_p=0.25, seed=seed, offset=offset)
        grads = cuflash.backward(dout, q, k, v, o, lse, dropout_p=0.25, seed=seed, offset=offset, deterministic=True)
        return [x.view(cupy.uint16) for x in (o, *grads)]

    first = run(11, 2)
    for a, b in zip(first, run(11, 2)):
        assert bool((a == b).all())
    for other in (run(11, 3), run(12, 2)):
        assert not bool((first[0] == other[0]).all())


def test_dropout_zero_is_exact_attention():
    """dropout_p = 0 runs the dropout-free kernels: bitwise the plain forward, any seed."""
    q, k, v = qkv(1, 200, 200, 2, 2, 128, "bfloat16")
    plain, _ = cuflash.forward(q, k, v, causal=True)
    zero, _ = cuflash.forward(q, k, v, causal=True, dropout_p=0.0, seed=5)
    assert bool((plain.view(cupy.uint16) == zero.view(cupy.uint16)).all())


def test_dropout_needs_a_seed():
    q, k, v = qkv(1, 16, 16, 2, 2, 64, "float16")
    with pytest.raises(ValueError, match="seed"):
        cuflash.forward(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        cuflash.forward(q, k, v, dropout_p=1.0, seed=1)


# --- frameworks ----------------------------------------------------------------------------------

def test_torch_generator_reproduces_and_advances(torch):
    q, k, v = (torch.randn(2, 257, 4, 64, device="cuda", dtype=torch.float16).requires_grad_() for _ in range(3))
    gen = torch.cuda.default_generators[q.device.index]
    torch.manual_seed(123)
    seed, offset = gen.initial_seed(), gen.get_offset()
    first = cuflash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    second = cuflash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    assert not torch.equal(first, second), "successive calls drew the same mask"
    torch.manual_seed(123)
    assert torch.equal(cuflash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True), first)
    # the mask the first call drew, from the generator state before it
    qc, kc, vc = (cupy.from_dlpack(x.detach()) for x in (q, k, v))
    mask = cuflash.dropout_mask(qc, kc, 0.3, seed, offset)
    dout = torch.randn_like(first)
    first.backward(dout)
    assert_matches_reference(qc, kc, vc, True, 0.3, mask, o=cupy.from_dlpack(first.detach()),
                             dout=cupy.from_dlpack(dout), grads=[cupy.from_dlpack(x.grad) for x in (q, k, v)])


def test_torch_explicit_seed_and_compile(torch):
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = cuflash.flash_attn_func(q, k, v, dropout_p=0.2, seed=77)
    assert torch.equal(a, cuflash.flash_attn_func(q, k, v, dropout_p=0.2, seed=77))
    compiled = torch.compile(lambda q, k, v: cuflash.flash_attn_func(q, k, v, dropout_p=0.2), fullgraph=True)
    x, y = compiled(q, k, v), compiled(q, k, v)
    assert not torch.equal(x, y), "the compiled graph baked one mask in"


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_jax_grads_with_dropout(jax, mode):
    """jax.grad with a seed (an int eagerly, a traced key under jit) against the reference built
    from the helper's mask of that seed."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, 203, 4, 64), "bfloat16") for key in keys)
    key_data = jax.random.key_data(jax.random.PRNGKey(42))
    seed = int(np.asarray(key_data)[0]) | int(np.asarray(key_data)[1]) << 32

    def loss(q, k, v, s):
        return cuflash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, seed=s).astype("float32").sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    grads = jax.jit(grad)(q, k, v, key_data) if mode == "jit" else grad(q, k, v, seed)
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    mask = cuflash.dropout_mask(qc, kc, 0.3, seed)
    dout = reference.from_float32(cupy.ones(qc.shape, cupy.float32), "bfloat16")
    assert_matches_reference(qc, kc, vc, True, 0.3, mask, dout=dout, grads=[cupy.from_dlpack(g) for g in grads])
    if mode == "jit":
        other = jax.jit(grad)(q, k, v, jax.random.key_data(jax.random.PRNGKey(43)))
        assert not np.array_equal(np.asarray(other[0], np.float32), np.asarray(grads[0], np.float32))


def test_jax_dropout_needs_a_seed(jax):
    q = jax.numpy.ones((1, 8, 2, 64), "float16")
    with pytest.raises(ValueError, match="seed"):
        cuflash.flash_attn_func(q, q, q, dropout_p=0.1)
