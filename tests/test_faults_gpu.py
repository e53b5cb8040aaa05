"""GPU fault suite (marker `faults`, left out of the default run: `python3 -m pytest -m faults
tests`): what a user's program meets besides clean inputs. Non-finite inputs stay in the rows
that read them; huge logits stay exact; tensors of more than 2^31 elements are indexed right;
threads sharing an empty kernel cache, damaged cache files and an unwritable cache all end in
correct results; CUDA-graph capture replays correctly; 2000 calls leak nothing; and
compute-sanitizer finds no memory error or race in a corpus of every kernel family
(tests/sanitizer_corpus.py)."""
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

from helpers import FAMILIES, SLACK, assert_2x, assert_forward_2x, forget_compiled, forward_path, max_abs_err, qkv, randn

cupy = pytest.importorskip("cupy")
import cuflash  # noqa: E402
from cuflash import compile as compile_  # noqa: E402
from cuflash.reference import attention_reference, attention_reference_backward  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.faults]
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=FAMILIES)
def family(request):
    """Each test on both kernel families (the sm_90a one where the GPU has it)."""
    with forward_path(request.param):
        yield request.param


# --- non-finite inputs and huge logits -----------------------------------------------------------

def masked_reference(q, k, v, visible):
    """float64 (o, lse) of attention with an explicit (batch, nheads, seqlen_q, seqlen_k) mask of
    visible keys; a row that sees none gets o = 0, lse = -inf."""
    q, k, v = (cupy.asnumpy(x.astype(cupy.float32)).astype(np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.where(visible, np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[3]), -np.inf)
    m = np.where(visible.any(-1), s.max(-1), 0)[..., None]
    e = np.where(visible, np.exp(s - m), 0)
    l = e.sum(-1)
    o = np.einsum("bhqk,bkhd->bqhd", e / np.where(l > 0, l, 1)[..., None], v)
    return o, np.where(l > 0, np.log(np.where(l > 0, l, 1)) + m[..., 0], -np.inf)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_inputs_stay_in_their_rows(family, where, bad, causal):
    """A NaN or Inf in q makes its own row of O and lse non-finite, and no other. One in k or v
    (key j of a kv head) reaches only rows of that kv head's query heads: a row that sees key j
    with a NaN, or an Inf in v, is non-finite; any other row of those heads is either non-finite
    (a kernel computes P = 0 times V = NaN as NaN for the masked keys of a tile it reads) or
    exact as if key j were masked; an Inf in k that scores -inf masks key j. Rows of other heads
    are finite and exact."""
    batch, seqlen, nheads, nheads_k, head_dim = 2, 150, 4, 2, 64
    q, k, v = qkv(batch, seqlen, seqlen, nheads, nheads_k, head_dim, "bfloat16")
    finite = [x.copy() for x in (q, k, v)]
    key, head = 100, 2  # key j (or query row) and the query head; kv head 1 serves query heads 2 and 3
    {"q": q, "k": k, "v": v}[where][0, key, head if where == "q" else head // 2, 5] = bad
    o, lse = cuflash.forward(q, k, v, causal=causal)
    o = cupy.asnumpy(o.astype(cupy.float32)).transpose(0, 2, 1, 3)  # (batch, nheads, seqlen, d)
    lse = cupy.asnumpy(lse)
    causal_visible = np.tri(seqlen, dtype=bool) if causal else np.ones((seqlen, seqlen), bool)
    visible = np.broadcast_to(causal_visible, (batch, nheads, seqlen, seqlen)).copy()
    reached = np.zeros((batch, nheads, seqlen), bool)   # rows that may read the bad value
    must_fail = np.zeros_like(reached)                  # rows whose result cannot be finite
    if where == "q":
        reached[0, head, key] = must_fail[0, head, key] = True
    else:
        reached[0, head:head + 2] = True
        visible[0, head:head + 2, :, key] = False
        if where == "v" or math.isnan(bad):
            must_fail[0, head:head + 2] = causal_visible[:, key]
    bad_rows = ~np.isfinite(o).all(-1) | ~np.isfinite(lse)
    assert bad_rows[must_fail].all(), "a row that read a NaN, or an Inf in v, is finite"
    assert not bad_rows[~reached].any(), "a non-finite value leaked out of its rows"
    o_ref, lse_ref = masked_reference(*finite, visible)
    o64, lse64 = (cupy.asnumpy(x) for x in attention_reference(*finite, causal=causal))
    o_low, lse_low = (cupy.asnumpy(x.astype(cupy.float32)) for x in attention_reference(*finite, causal=causal,
                                                                                         upcast=False))
    rows = ~bad_rows
    # The truth is the masked reference; the yardstick, the low-precision computation's error on
    # the same rows of the clean problem.
    for name, ours, truth, low, clean64 in (("o", o, o_ref, o_low, o64), ("lse", lse, lse_ref, lse_low, lse64)):
        if name == "o":
            truth, low, clean64 = (x.transpose(0, 2, 1, 3) for x in (truth, low, clean64))
        err, err_low = max_abs_err(ours[rows], truth[rows]), max_abs_err(low[rows], clean64[rows])
        assert err <= 2 * err_low + SLACK["bfloat16"], f"{name}: error {err:.3g} against 2 x {err_low:.3g}"


@pytest.mark.parametrize("dtype, softmax_scale", [("float16", 30.0), ("bfloat16", 3e4)])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_logits(family, dtype, softmax_scale, causal):
    """Scores in the hundreds (fp16) to hundreds of thousands (bf16; in fp16 they would overflow
    the low-precision reference itself): the running max keeps every exponential finite, and O
    and lse obey the 2x rule."""
    q, k, v = qkv(1, 257, 300, 4, 4, 64, dtype, seed=3)
    o, lse = cuflash.forward(q, k, v, softmax_scale=softmax_scale, causal=causal)
    assert bool(cupy.isfinite(o).all()) and bool(cupy.isfinite(lse).all())
    o_ref, lse_ref = attention_reference(q, k, v, softmax_scale, causal)
    o_low, lse_low = attention_reference(q, k, v, softmax_scale, causal, upcast=False)
    assert_2x(o, o_ref, o_low, dtype)
    assert_2x(lse, lse_ref, lse_low, dtype, "lse")


# --- size ----------------------------------------------------------------------------------------

def test_more_than_2_31_elements(family):
    """q, O, dO and dQ of 2^31 + 49152 elements (2^21 + 3 queries of 16 heads x 64): every offset
    past 2^31 must be 64-bit. Rows at both ends are checked against the reference."""
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GiB of free GPU memory; {free / 2**30:.0f} GiB free")
    seqlen_q, nheads, nheads_k, head_dim = 2**21 + 3, 16, 4, 64
    q, k, v = qkv(1, seqlen_q, 256, nheads, nheads_k, head_dim, "float16", seed=5)
    assert q.size > 2**31
    o, lse = cuflash.forward(q, k, v)
    dout = randn(q.shape, "float16", seed=9)
    dq, _, _ = cuflash.backward(dout, q, k, v, o, lse)
    for rows in (slice(0, 64), slice(seqlen_q - 131, seqlen_q)):
        o_ref, lse_ref = attention_reference(q[:, rows], k, v)
        o_low, lse_low = attention_reference(q[:, rows], k, v, upcast=False)
        assert_2x(o[:, rows], o_ref, o_low, "float16")
        assert_2x(lse[:, :, rows], lse_ref, lse_low, "float16", "lse")
        # dQ of a row needs only that row's q, dO and O (through D = rowsum(dO * O)).
        dq_ref = attention_reference_backward(dout[:, rows], q[:, rows], k, v)[0]
        dq_low = attention_reference_backward(dout[:, rows], q[:, rows], k, v, upcast=False)[0]
        assert_2x(dq[:, rows], dq_ref, dq_low, "float16", "dq")


def test_dk_dv_of_keys_seen_by_millions_of_rows(family, torch):
    """2^20 queries of 16 heads over 512 keys of 4 kv heads: each row of dK and dV sums 4 x 2^20
    products. dK and dV obey the 2x rule against the same computation in fp16 by torch (its
    GEMMs accumulate in float32); dQ too. The references are computed chunk by chunk: float64,
    and fp16 with float32 sums of the chunks."""
    seqlen_q, seqlen_k, nheads, nheads_k, head_dim, chunk = 2**20, 512, 16, 4, 64, 2**15
    group = nheads // nheads_k
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(1, seqlen_q, nheads, head_dim, generator=gen, device="cuda").half() for _ in range(2))
    k, v = (torch.randn(1, seqlen_k, nheads_k, head_dim, generator=gen, device="cuda").half() for _ in range(2))
    o, lse = cuflash.forward(q, k, v)
    ours = cuflash.backward(do, q, k, v, o, lse)

    def reference(dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        kk, vv = (x.to(dtype).repeat_interleave(group, dim=2) for x in (k, v))
        dq = torch.empty(q.shape, dtype=dtype, device="cuda")
        dk, dv = (torch.zeros(kk.shape, dtype=acc, device="cuda") for _ in range(2))
        for start in range(0, seqlen_q, chunk):
            qc, doc = q[:, start:start + chunk].to(dtype), do[:, start:start + chunk].to(dtype)
            s = torch.einsum("bqhd,bkhd->bhqk", qc, kk) * head_dim ** -0.5
            p = torch.softmax(s.to(acc), dim=-1).to(dtype)
            oc = torch.einsum("bhqk,bkhd->bqhd", p, vv)
            dp = torch.einsum("bqhd,bkhd->bhqk", doc, vv)
            d_row = (doc.to(acc) * oc.to(acc)).sum(-1).transpose(1, 2)[..., None]
            ds = (p.to(acc) * (dp.to(acc) - d_row)).to(dtype)
            dq[:, start:start + chunk] = torch.einsum("bhqk,bkhd->bqhd", ds, kk) * head_dim ** -0.5
            dk += torch.einsum("bhqk,bqhd->bkhd", ds, qc).to(acc) * head_dim ** -0.5
            dv += torch.einsum("bhqk,bqhd->bkhd", p, doc).to(acc)
        fold = lambda x: x.reshape(1, seqlen_k, nheads_k, group, head_dim).sum(3).to(dtype)  # noqa: E731
        return dq, fold(dk), fold(dv)

    ref, low = reference(torch.float64), reference(torch.float16)
    for name, got, r, lo in zip(("dq", "dk", "dv"), ours, ref, low):
        assert_2x(*(cupy.from_dlpack(x) for x in (got, r, lo)), "float16", name)


# --- the kernel cache ----------------------------------------------------------------------------

@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """An empty kernel cache in tmp_path and a process that has compiled nothing yet."""
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path / "cache"))
    forget_compiled(monkeypatch)
    return tmp_path / "cache"


def check_attention(q, k, v, causal=False):
    o, lse = cuflash.forward(q, k, v, causal=causal)
    assert_forward_2x(o, lse, q, k, v, causal=causal)


def test_threads_on_an_empty_cache(family, empty_cache):
    """8 threads start on an empty cache at once, two programs among them: each program is
    compiled once, and every result is right."""
    problems = [qkv(1, 100 + i, 90, 2, 1, 64 if i % 2 else 128, "bfloat16", seed=i) for i in range(8)]
    start, errors = threading.Barrier(8), []

    def work(problem):
        try:
            start.wait()
            check_attention(*problem, causal=True)
        except BaseException as error:  # noqa: B036 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(p,)) for p in problems]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(p.suffix for p in empty_cache.iterdir()) == [".bin", ".bin"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "swap", "refused"])
def test_damaged_cache_files_are_recompiled(family, empty_cache, monkeypatch, damage):
    """Cache files cut short, overwritten, swapped between two programs, or whole but holding a
    binary the driver refuses: each is compiled again, and the results are right."""
    problems = [qkv(1, 77, 99, 2, 2, 64, "bfloat16", seed=1), qkv(1, 77, 99, 2, 2, 128, "bfloat16", seed=2)]
    for problem in problems:
        check_attention(*problem)
    files = sorted(empty_cache.iterdir())
    assert len(files) == 2
    blobs = [f.read_bytes() for f in files]
    if damage == "truncate":
        files[0].write_bytes(blobs[0][: len(blobs[0]) // 2])
    elif damage == "garbage":
        files[0].write_bytes(os.urandom(len(blobs[0])))
    elif damage == "swap":
        files[0].write_bytes(blobs[1])
        files[1].write_bytes(blobs[0])
    else:
        key = files[0].stem
        files[0].write_bytes(compile_._pack(key, b"\x7fELF" + os.urandom(4096)))
    forget_compiled(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for problem in problems:
            check_attention(*problem)
    assert [f.read_bytes() for f in files] == blobs, "the recompiled binaries were not stored back"


def test_an_unwritable_cache_compiles_in_memory(family, empty_cache, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("a file where the cache directory would be")
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(compile_, "_warned_unwritable", False)
    with pytest.warns(RuntimeWarning, match="not writable"):
        check_attention(*qkv(1, 65, 65, 2, 2, 64, "bfloat16"))


# --- CUDA graphs and leaks -----------------------------------------------------------------------

def test_cuda_graph_capture(family, torch):
    """forward + backward captured in one torch CUDA graph, replayed on new inputs copied into
    the captured tensors: O and lse equal an eager run bitwise, the gradients obey the 2x rule."""
    from cuflash.reference import attention_reference as ref

    shape_q, shape_k = (2, 300, 4, 128), (2, 300, 2, 128)
    static = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in (shape_q, shape_k, shape_k, shape_q)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture (flash_attn_func: its eager path's signature)
            o, lse = cuflash.forward(*static[:3], causal=True)
            cuflash.backward(static[3], *static[:3], o, lse, causal=True)
            cuflash.flash_attn_func(*static[:3], causal=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = cuflash.forward(*static[:3], causal=True)
        grads = cuflash.backward(static[3], *static[:3], o, lse, causal=True)
        o_func = cuflash.flash_attn_func(*static[:3], causal=True)
    for replay in range(2):
        for x in static:
            x.copy_(torch.randn_like(x))
        graph.replay()
        o_eager, lse_eager = cuflash.forward(*static[:3], causal=True)
        torch.cuda.synchronize()
        assert torch.equal(o, o_eager) and torch.equal(lse, lse_eager), f"replay {replay}"
        assert torch.equal(o_func, o_eager), f"replay {replay}: flash_attn_func"
        q, k, v, dout = (cupy.from_dlpack(x) for x in static)
        o_ref, _ = ref(q, k, v, causal=True)
        o_low, _ = ref(q, k, v, causal=True, upcast=False)
        assert_2x(cupy.from_dlpack(o), o_ref, o_low, "bfloat16")
        refs = attention_reference_backward(dout, q, k, v, causal=True)
        lows = attention_reference_backward(dout, q, k, v, causal=True, upcast=False)
        for name, g, r, low in zip(("dq", "dk", "dv"), grads, refs, lows):
            assert_2x(cupy.from_dlpack(g), r, low, "bfloat16", name)


def test_no_leak_over_2000_calls(family, torch):
    """flash_attn_func forward and backward 2000 times on a small problem: device memory, host
    memory and the compiled-kernel tables end where they began."""
    q, k, v = (torch.randn(1, 128, 16, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))

    def step():
        cuflash.flash_attn_func(q, k, v, causal=True).sum().backward()

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    before = (torch.cuda.memory_allocated(), cupy.get_default_memory_pool().used_bytes(), len(compile_._functions))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2000):
        step()
    torch.cuda.synchronize()
    after = (torch.cuda.memory_allocated(), cupy.get_default_memory_pool().used_bytes(), len(compile_._functions))
    assert after == before
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 32, f"host memory grew by {grown_mib:.0f} MiB over 2000 calls"


# --- compute-sanitizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("tool, clean", [("memcheck", "ERROR SUMMARY: 0 errors"),
                                         ("racecheck", "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)")])
def test_compute_sanitizer(tool, clean):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    # The corpus imports the cuflash under test, wherever that is.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(cuflash.__file__)),
                                                        os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sanitizer, "--tool", tool, "--racecheck-report", "all", sys.executable,
                             os.path.join(TESTS, "sanitizer_corpus.py")] if tool == "racecheck" else
                            [sanitizer, "--tool", tool, sys.executable, os.path.join(TESTS, "sanitizer_corpus.py")],
                            capture_output=True, text=True, env=env, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "corpus done" in output, output[-4000:]
    assert clean in output, output[-4000:]
