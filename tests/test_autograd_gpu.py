"""GPU: gradients through flash_attn_func (torch.autograd, torch.compile, jax.grad, jax.jit)
against float64 gradients with the 2x rule, and the plumbing around them: inputs that need no
gradient, strided inputs, deterministic mode, the custom ops' fake implementations.

No finite-difference gradcheck: the kernels take float16 and bfloat16 only, where a difference
quotient's rounding error is larger than the gradient errors it would have to detect.
"""
import math

import numpy as np
import pytest

from helpers import assert_2x, assert_backward_2x, assert_forward_2x, torch_qkv

cupy = pytest.importorskip("cupy")
import cuflash  # noqa: E402
from cuflash.reference import from_float32  # noqa: E402

pytestmark = pytest.mark.gpu

SHAPES = [  # batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim
    (2, 113, 203, 4, 2, 64),    # sq < sk, GQA 4:2
    (2, 203, 113, 8, 1, 128),   # sq > sk (causal: the first rows see no key), MQA 8:1
    (1, 113, 113, 4, 4, 72),    # an odd head dim
    (1, 97, 131, 4, 2, 60),     # not a multiple of 8: flash_attn_func pads it to 64 inside
]


# --- PyTorch -------------------------------------------------------------------------------------

def plain_attention(torch, q, k, v, scale, causal):
    """softmax(Q K^T * scale [+ bottom-right causal mask]) V with K/V heads repeated per group;
    a row that sees no key gets P = 0 (and no NaN in its gradients)."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    # S = Q K^T * scale   (b, h, sq, sk)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    rows = torch.arange(seqlen_q, device=q.device)[:, None]
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    visible = cols <= rows + (seqlen_k - seqlen_q) if causal else torch.ones_like(cols <= rows)
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    p = torch.softmax(s, dim=-1) * visible
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def torch_reference(torch, q, k, v, dout, causal, dtype):
    """(o, [dq, dk, dv]) of plain_attention by torch autograd, computed in `dtype`."""
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    o = plain_attention(torch, *xs, 1.0 / math.sqrt(q.shape[-1]), causal)
    o.backward(dout.to(dtype))
    return o.detach(), [x.grad for x in xs]


def as_cupy(t):
    return cupy.from_dlpack(t.detach().double().contiguous())


def check_torch_grads(torch, q, k, v, dout, o, causal):
    """o and the .grad of every input that requires grad, against the 2x rule."""
    dtype = str(q.dtype).removeprefix("torch.")
    o64, grads64 = torch_reference(torch, q, k, v, dout, causal, torch.float64)
    o_low, grads_low = torch_reference(torch, q, k, v, dout, causal, q.dtype)
    assert_2x(as_cupy(o), as_cupy(o64), as_cupy(o_low), dtype, "o")
    for name, x, g64, g_low in zip(("dq", "dk", "dv"), (q, k, v), grads64, grads_low):
        if not x.requires_grad:
            assert x.grad is None, f"{name} was computed for an input that does not require grad"
            continue
        assert x.grad.shape == x.shape and x.grad.dtype == x.dtype and x.grad.device == x.device
        assert_2x(as_cupy(x.grad), as_cupy(g64), as_cupy(g_low), dtype, name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "bhsd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_grads(torch, shape, layout, causal, dtype):
    q, k, v = torch_qkv(torch, shape, getattr(torch, dtype), layout)
    dout = torch.randn(q.shape, device="cuda").to(q.dtype)
    o = cuflash.flash_attn_func(q, k, v, causal=causal)
    assert o.grad_fn is not None and o.shape == q.shape and o.dtype == q.dtype
    o.backward(dout)
    check_torch_grads(torch, q, k, v, dout, o, causal)


@pytest.mark.parametrize("requires_grad", [(True, False, False), (False, True, True), (False, False, True)], ids=str)
def test_torch_only_some_inputs_require_grad(torch, requires_grad):
    """Gradients only where asked; out.sum()'s upstream gradient has stride 0 in every dim."""
    q, k, v = torch_qkv(torch, SHAPES[0], torch.bfloat16, "bhsd", requires_grad)
    o = cuflash.flash_attn_func(q, k, v, causal=True)
    o.sum().backward()
    check_torch_grads(torch, q, k, v, torch.ones_like(o), o, causal=True)


@pytest.mark.parametrize("other", ["cupy", "numpy", "torch_cpu"])
@pytest.mark.parametrize("which", [1, 2])
def test_torch_q_with_other_arrays_is_a_type_error(torch, other, which):
    """A torch q with k or v from CuPy or NumPy, or on the CPU: TypeError naming the argument,
    before anything runs."""
    q, k, v = torch_qkv(torch, SHAPES[0], torch.float16)
    x = (q, k, v)[which].detach()
    x = {"cupy": lambda: cupy.from_dlpack(x), "numpy": lambda: x.cpu().numpy(), "torch_cpu": x.cpu}[other]()
    args = [q, k, v]
    args[which] = x
    with pytest.raises(TypeError, match=rf"^{'kv'[which - 1]} must"):
        cuflash.flash_attn_func(*args)


def test_torch_no_grad_records_nothing(torch):
    q, k, v = torch_qkv(torch, SHAPES[0], torch.float16)
    with torch.no_grad():
        o = cuflash.flash_attn_func(q, k, v)
    assert o.grad_fn is None and not o.requires_grad
    o, lse = cuflash.forward(q, k, v)  # the low-level entry records no autograd either
    assert o.grad_fn is None and lse.grad_fn is None


def test_torch_gradient_through_lse_is_refused(torch):
    q, k, v = torch_qkv(torch, SHAPES[0], torch.float16)
    o, lse = cuflash.flash_attn_func(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="lse"):
        (o.float().sum() + lse.sum()).backward()
    o, lse = cuflash.flash_attn_func(q, k, v, return_lse=True)
    (o.float().sum() * lse.detach().mean()).backward()  # a detached lse is fine
    assert q.grad is not None


@pytest.mark.parametrize("packing", ["qkv", "kv"])
def test_torch_packed_inputs_match_separate_ones(torch, packing):
    """flash_attn_qkvpacked_func / flash_attn_kvpacked_func read q, k, v as views of the packed
    tensor: O equals flash_attn_func's on separate copies, and (deterministic) the packed
    gradient is theirs stacked, bitwise."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    dout = torch.randn(2, 150, 4, 64, device="cuda", generator=gen).to(torch.bfloat16)
    if packing == "qkv":
        packed = torch.randn(2, 150, 3, 4, 64, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
        o = cuflash.flash_attn_qkvpacked_func(packed, causal=True, deterministic=True)
        parts = [packed.detach()[:, :, i].clone().requires_grad_() for i in range(3)]
    else:
        q = torch.randn(2, 150, 4, 64, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
        packed = torch.randn(2, 170, 2, 2, 64, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
        o = cuflash.flash_attn_kvpacked_func(q, packed, 0.0, None, True, (-1, -1), 0.0, None, True)
        parts = [q.detach().clone().requires_grad_()] + [packed.detach()[:, :, i].clone().requires_grad_() for i in range(2)]
    o.backward(dout)
    o_separate = cuflash.flash_attn_func(*parts, causal=True, deterministic=True)
    o_separate.backward(dout)
    assert torch.equal(o, o_separate)
    grads = [x.grad for x in parts]
    assert torch.equal(packed.grad, torch.stack(grads[-packed.shape[2]:], 2))
    if packing == "kv":
        assert torch.equal(q.grad, grads[0])


def test_torch_return_attn_probs_is_flash_attns_triple(torch):
    q, k, v = torch_qkv(torch, SHAPES[0], torch.float16, requires_grad=(False,) * 3)
    o, lse, probs = cuflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    o_ref, lse_ref = cuflash.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert probs is None and torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_torch_softcap(torch, causal, compiled):
    """softcap through flash_attn_func (flash-attn's 8th positional argument), eager and under
    torch.compile: O and the gradients against the capped float64 reference."""
    q, k, v = torch_qkv(torch, SHAPES[1], torch.bfloat16)
    dout = torch.randn(q.shape, device="cuda").to(q.dtype)
    attention = lambda q, k, v: cuflash.flash_attn_func(q, k, v, 0.0, 0.5, causal, (-1, -1), 3.0)  # noqa: E731
    o = (torch.compile(attention, fullgraph=True) if compiled else attention)(q, k, v)
    o.backward(dout)
    qc, kc, vc, doc = (cupy.from_dlpack(x.detach()) for x in (q, k, v, dout))
    assert_forward_2x(cupy.from_dlpack(o.detach()), None, qc, kc, vc, 0.5, causal, softcap=3.0)
    assert_backward_2x([cupy.from_dlpack(x.grad) for x in (q, k, v)], doc, qc, kc, vc, 0.5, causal, softcap=3.0)


def test_torch_deterministic_is_bitwise_reproducible(torch):
    q, k, v = torch_qkv(torch, SHAPES[1], torch.bfloat16)
    dout = torch.randn(q.shape, device="cuda").to(q.dtype)
    runs = []
    for _ in range(3):
        for x in (q, k, v):
            x.grad = None
        cuflash.flash_attn_func(q, k, v, causal=True, deterministic=True).backward(dout)
        runs.append([x.grad.clone() for x in (q, k, v)])
    for run in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], run):
            assert torch.equal(a, b), f"{name} differs between deterministic runs"
    check_torch_grads(torch, q, k, v, dout, cuflash.flash_attn_func(q, k, v, causal=True), True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(torch, backend):
    """One graph (fullgraph=True: no graph break), forward and backward, bitwise equal to eager
    (deterministic=True, so dQ has no atomics)."""
    if backend == "inductor":
        pytest.importorskip("triton")

    def loss(q, k, v):
        o = cuflash.flash_attn_func(q * 1.0, k, v, causal=True, deterministic=True)
        return o.float().square().sum()

    q, k, v = torch_qkv(torch, SHAPES[0], torch.float16, "bhsd")
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    compiled(q, k, v).backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    loss(q, k, v).backward()
    for name, a, x in zip(("dq", "dk", "dv"), got, (q, k, v)):
        assert torch.equal(a, x.grad), f"{name}: compiled differs from eager"


def test_torch_ops_pass_opcheck(torch):
    """The fake implementations agree with the real ops (shapes, dtypes, strides), the schemas
    hold, autograd is registered, and AOT dispatch (dynamic shapes) works."""
    q, k, v = torch_qkv(torch, SHAPES[0], torch.float16, "bhsd", (False, False, False))
    # An explicit seed: opcheck compares repeated runs. softcap: the schemas' default, then a cap.
    for dropout_p, seed, softcap in ((0.0, None, ()), (0.25, 5, (3.0,))):
        torch.library.opcheck(torch.ops.cuflash.flash_fwd.default, (q, k, v, 0.125, True, False, dropout_p, seed, *softcap))
        o, lse, rng_state = torch.ops.cuflash.flash_fwd(q, k, v, 0.125, True, False, dropout_p, seed, *softcap)
        dout = torch.randn(o.shape, device="cuda").to(o.dtype)
        torch.library.opcheck(torch.ops.cuflash.flash_bwd.default,
                              (dout, q, k, v, o, lse, 0.125, True, False, dropout_p, rng_state, *softcap))


# --- JAX -----------------------------------------------------------------------------------------

def jax_qkv(jax, shape, dtype, seed=0):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (batch, seqlen_q, nheads, head_dim), dtype),
            jax.random.normal(keys[1], (batch, seqlen_k, nheads_k, head_dim), dtype),
            jax.random.normal(keys[2], (batch, seqlen_k, nheads_k, head_dim), dtype))


def sum_loss(jax, causal, deterministic=False):
    """sum(flash_attn_func(q, k, v)): its upstream gradient dO is all ones."""
    def loss(q, k, v):
        return cuflash.flash_attn_func(q, k, v, causal=causal, deterministic=deterministic).astype("float32").sum()
    return jax.grad(loss, argnums=(0, 1, 2))


def check_jax_grads(grads, q, k, v, causal):
    """jax.grad's (dq, dk, dv) against the float64 reference and the same computation in the
    input precision (cuflash.reference), for dO = ones."""
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    dout = from_float32(cupy.ones(qc.shape, cupy.float32), q.dtype.name)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    assert_backward_2x([cupy.from_dlpack(g) for g in grads], dout, qc, kc, vc, None, causal)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_jax_grads(jax, shape, causal, dtype, mode):
    q, k, v = jax_qkv(jax, shape, dtype)
    grad = sum_loss(jax, causal)
    check_jax_grads((jax.jit(grad) if mode == "jit" else grad)(q, k, v), q, k, v, causal)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_jax_softcap_grads(jax, mode):
    q, k, v = jax_qkv(jax, SHAPES[0], "bfloat16")

    def loss(q, k, v):
        return cuflash.flash_attn_func(q, k, v, causal=True, softcap=2.0).astype("float32").sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    grads = (jax.jit(grad) if mode == "jit" else grad)(q, k, v)
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    dout = from_float32(cupy.ones(qc.shape, cupy.float32), q.dtype.name)
    assert_backward_2x([cupy.from_dlpack(g) for g in grads], dout, qc, kc, vc, None, True, softcap=2.0)


def test_jax_jit_runs_in_a_buffer_callback_and_matches_eager(jax):
    """Under jit the kernels run in XLA's buffer callback (no host round trip); results are
    bitwise those of the eager (DLPack) path, deterministic gradients over 3 runs included."""
    q, k, v = jax_qkv(jax, SHAPES[1], "bfloat16")
    grad = sum_loss(jax, causal=True, deterministic=True)
    assert "xla_buffer_python_gpu_callback" in jax.jit(grad).lower(q, k, v).as_text()
    eager = grad(q, k, v)
    for _ in range(3):
        for name, a, b in zip(("dq", "dk", "dv"), jax.jit(grad)(q, k, v), eager):
            assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)), f"{name}: jit differs from eager"
    forward = lambda q, k, v: cuflash.flash_attn_func(q, k, v, causal=True, return_lse=True)  # noqa: E731
    for a, b in zip(jax.jit(forward)(q, k, v), forward(q, k, v)):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_jax_jit_orders_after_xla_work(jax):
    """q comes out of a long matmul chain in the same jit: the callback must run on XLA's stream,
    after it, or it reads q before it is written."""
    import jax.numpy as jnp

    q, k, v = jax_qkv(jax, SHAPES[0], "float16")
    big = jax.random.normal(jax.random.PRNGKey(3), (4096, 4096), jnp.float32)

    @jax.jit
    def late_q(q, k, v, big):
        for _ in range(8):
            big = jnp.tanh(big @ big / 64.0)
        q_late = q + (jnp.zeros_like(q, jnp.float32) * big[0, 0]).astype(q.dtype)  # q, written late
        return cuflash.flash_attn_func(q_late, k, v)

    want = cuflash.flash_attn_func(q, k, v)
    assert np.array_equal(np.asarray(late_q(q, k, v, big), np.float32), np.asarray(want, np.float32))


def test_jax_vmap_under_jit(jax):
    import jax.numpy as jnp

    q, k, v = jax_qkv(jax, SHAPES[0], "float16")
    qs = jnp.stack([q, q * 0.5])
    out = jax.jit(jax.vmap(lambda q: cuflash.flash_attn_func(q, k, v, causal=True)))(qs)
    for i in range(2):
        assert np.array_equal(np.asarray(out[i], np.float32), np.asarray(cuflash.flash_attn_func(qs[i], k, v, causal=True), np.float32))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_jax_gradient_through_lse_is_refused(jax, mode):
    q, k, v = jax_qkv(jax, SHAPES[0], "float16")

    def loss(q, use_lse):
        o, lse = cuflash.flash_attn_func(q, k, v, return_lse=True)
        lse = lse if use_lse else jax.lax.stop_gradient(lse)
        return o.astype("float32").sum() + lse.sum()

    wrap = jax.jit if mode == "jit" else (lambda f: f)
    with pytest.raises(NotImplementedError, match="lse"):
        wrap(jax.grad(lambda q: loss(q, True)))(q)
    assert wrap(jax.grad(lambda q: loss(q, False)))(q).shape == q.shape
