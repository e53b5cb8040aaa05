"""cuflash forward and backward benchmark: TFLOP/s against torch SDPA (flash, cuDNN) and naive
CuPy attention, tile sweeps, and peak extra device memory against seqlen.

    python bench/bench.py                      # forward + backward tables, memory table, plot, summary
    python bench/bench.py --quick              # a small subset (bf16, d 64/128, seqlen 1k/4k)
    python bench/bench.py --pass bwd           # backward tables only (fwd: forward only; default both)
    python bench/bench.py --dtype bf16 --hdim 128 --seqlen 4096 16384 --causal
    python bench/bench.py --dropout 0.1        # the forward and backward tables with dropout p=0.1
    python bench/bench.py --tiles --hdim 128   # time FwdTile and BwdTile candidates at seqlen 4k and 16k
    python bench/bench.py --tiles --pass bwd   # BwdTile candidates only
    python bench/bench.py --memory-only        # peak extra memory vs seqlen only
    python bench/bench.py --json out.json --plot bench/bench.png

Without a CUDA GPU it runs a CPU demo of the tiled algorithm (cuflash.reference) and exits 0.

Settings follow FlashAttention's benchmark: batch * seqlen = 16384 tokens, hidden = nheads * d =
2048. Every backend of a table row runs on the same torch tensors (b, s, h, d) in one process:
cuflash zero-copy on torch's current stream, SDPA on (b, h, s, d) transposed views, the naive
CuPy attention on DLPack views on torch's stream. Times are medians of CUDA-event timings with L2
flushed before each run.

The backward tables time the backward alone. cuflash: cuflash.forward runs once (no grad), then
cuflash.backward(dout, q, k, v, o, lse) is timed, with deterministic=False and True. SDPA: the graph
is built once (leaf q, k, v (b, s, h, d), passed as (b, h, s, d) views), then
torch.autograd.grad(o, (q, k, v), dout, retain_graph=True) is timed. Backward FLOPs are 2.5x the
forward's (attention_flops). The naive attention has no backward here.

With --dropout P every backend of the forward and backward tables drops with probability P: cuflash
with a fixed seed (DROPOUT_SEED), SDPA with dropout_p=P. The naive attention is skipped, and
cuflash is not checked against SDPA (their masks differ). FLOPs ignore dropout, as
FlashAttention's benchmarks do.
"""
import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

import cuflash  # noqa: E402

TOKENS = 16384                 # batch * seqlen
HIDDEN = 2048                  # nheads * head_dim
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
DTYPES = ("fp16", "bf16")
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16"}
QUICK = {"dtype": ("bf16",), "hdim": (64, 128), "seqlen": (1024, 4096)}
PASSES = {"fwd": ("fwd",), "bwd": ("bwd",), "both": ("fwd", "bwd")}
ACCEPT_SEQLEN = 2048           # the summary's geomeans (and acceptance) use seqlens >= this

TILE_SEQLENS = (4096, 16384)
# FwdTile(block_m, block_n, num_warps) candidates per head dim for --tiles (the table's default
# is always timed too). A candidate that does not fit (registers, shared memory) shows its error.
# Tuples of 2 or 3 are HopperFwdTile(block_m, block_n[, stages]) candidates of the sm_90a kernel
# (compute capability 9.0).
TILE_CANDIDATES = {
    64: [(128, 128, 4, 2), (128, 64, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2),
         (128, 128, 3), (192, 128), (128, 64, 3), (64, 128)],
    128: [(128, 64, 4, 2), (128, 32, 4, 2), (128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2),
          (128, 128, 3), (128, 64, 3), (128, 64, 4), (64, 128)],
    192: [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    256: [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64), (64, 64, 3)],
}
# BwdTile(block_m, block_n, num_warps, dq_block_n, sdp_wm, kv_wm, dq_wm) candidates for --tiles
# --pass bwd, timed with deterministic=False (the tables' defaults are always timed too); tuples
# of 3 are HopperBwdTile(block_m, block_n, stages) candidates of the sm_90a kernel.
BWD_TILE_CANDIDATES = {
    64: [(64, 128, 8, 64, 4, 4, 2), (128, 128, 8, 64, 2, 4, 4), (128, 128, 8, 64, 4, 8, 4),
         (128, 128, 8, 64, 8, 4, 4), (128, 128, 8, 64, 4, 4, 2), (128, 64, 8, 64, 2, 4, 4),
         (128, 128, 3)],
    128: [(64, 128, 8, 64, 2, 4, 2), (64, 128, 8, 64, 4, 2, 2), (64, 128, 8, 64, 4, 8, 2),
          (64, 128, 8, 64, 4, 4, 4), (64, 128, 8, 64, 8, 8, 4), (128, 128, 8, 64, 4, 4, 4),
          (64, 128, 3)],
    256: [(64, 64, 8, 32, 2, 2, 2), (64, 64, 8, 32, 4, 4, 4), (32, 64, 2)],
}

MEMORY_SHAPE = {"batch": 1, "nheads": 16, "head_dim": 128, "dtype": "float16"}
MEMORY_SEQLENS = (1024, 2048, 4096, 8192, 16384, 32768)
MEMORY_SEQLENS_QUICK = (1024, 2048, 4096, 8192)

NAIVE_S_LIMIT = 8e9            # bytes of the naive S matrix above which the timing tables skip it
NAIVE_PEAK_LIMIT = 40e9        # bytes of the naive peak above which the memory table skips it
FLUSH_BYTES = 256 << 20        # written before every timed run: larger than the H100's 50 MB L2
WARMUP_RUNS = 3
MIN_RUNS, MAX_RUNS = 10, 100
RUN_BUDGET_MS = 300.0          # aim for this much timed GPU work per measurement
QUICK_RUN_BUDGET_MS = 100.0

# Which entries dropout hits does not change the work, so one seed (and offset 0) serves every
# timed run; the backward regenerates the forward's mask from the same seed.
DROPOUT_SEED = 0

BACKENDS = ("cuflash", "cuflash-portable", "sdpa-flash", "sdpa-cudnn", "naive")
BWD_BACKENDS = ("cuflash", "cuflash-det", "sdpa-flash", "sdpa-cudnn")
PLOT_STYLE = {"cuflash": "C0", "sdpa-flash": "C1", "sdpa-cudnn": "C2", "naive": "C3", "cuflash-det": "C4",
              "cuflash-portable": "C5"}


# --------------------------------------------------------------------------------------------
# Arithmetic


# FLOPs of a pass relative to the forward's two matmuls. The backward does five matmuls of the
# same size (S = Q K^T recomputed, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q): 2.5x,
# FlashAttention's convention (its benchmarks count the backward's recomputation of S as work).
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(batch, nheads, seqlen_q, seqlen_k, head_dim, causal, pass_="fwd"):
    """FLOPs of one pass. Forward: two matmuls, S = Q K^T and O = P V, each seqlen_q * seqlen_k *
    head_dim multiply-adds (2 FLOPs) per head; causal attention sees about half the keys. The
    softmax's exp/max/sum are not counted (FlashAttention's convention). pass_ "bwd" is 2.5x the
    forward, "fwd+bwd" 3.5x (FLOP_FACTOR)."""
    flops = 4 * batch * nheads * seqlen_q * seqlen_k * head_dim * FLOP_FACTOR[pass_]
    return flops / 2 if causal else flops


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12


def tiled_extra_bytes(batch, seqlen, nheads, head_dim, itemsize, lse_itemsize=4):
    """What the tiled forward allocates beyond its inputs: O (like Q) and the LSE per row."""
    return batch * seqlen * nheads * head_dim * itemsize + batch * nheads * seqlen * lse_itemsize


def tiled_bwd_extra_bytes(batch, seqlen, nheads, head_dim, itemsize, deterministic=False):
    """What cuflash.backward allocates beyond its inputs (dO, Q, K, V, O, LSE): dQ, dK, dV (like
    Q), D = rowsum(dO * O) and lse2 (float32, rows padded to 4), and unless deterministic the
    float32 dQ accumulator."""
    grads = 3 * batch * seqlen * nheads * head_dim * itemsize
    stats = 2 * batch * nheads * (-(-seqlen // 4) * 4) * 4
    accum = 0 if deterministic else batch * nheads * seqlen * head_dim * 4
    return grads + stats + accum


def naive_score_bytes(batch, nheads, seqlen_q, seqlen_k, itemsize):
    """The naive S = Q K^T matrix, (batch, nheads, seqlen_q, seqlen_k)."""
    return batch * nheads * seqlen_q * seqlen_k * itemsize


def naive_peak_bytes(batch, nheads, seqlen_q, seqlen_k, itemsize):
    """Peak of naive_attention: S in the input dtype next to its float32 softmax copy."""
    return naive_score_bytes(batch, nheads, seqlen_q, seqlen_k, itemsize + 4)


def fmt_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_table(headers, rows):
    """Aligned text: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def print_table(title, headers, rows, notes=()):
    print(f"\n{title}\n{format_table(headers, rows)}", flush=True)
    for note in notes:
        print(f"  {note}", flush=True)


# --------------------------------------------------------------------------------------------
# CPU demo (no GPU)


def cpu_demo():
    """The tiled algorithm (flash_forward_model, flash_backward_model) against plain attention, in NumPy."""
    from cuflash.reference import attention_reference, flash_forward_model

    batch, seqlen, nheads, head_dim = 1, 300, 2, 64
    rng = np.random.default_rng(0)
    rows = []
    for dtype in (np.float32, np.float64):
        q, k, v = (rng.standard_normal((batch, seqlen, nheads, head_dim)).astype(dtype) for _ in range(3))
        for causal in (False, True):
            o_ref, lse_ref = attention_reference(q, k, v, causal=causal)               # float64
            o_fp32, _ = attention_reference(q, k, v, causal=causal, upcast=False)    # naive, fp32
            o, lse = flash_forward_model(q, k, v, causal=causal, block_m=64, block_n=64)
            tiled = o.nbytes + lse.nbytes
            naive = naive_score_bytes(batch, nheads, seqlen, seqlen, np.dtype(dtype).itemsize)
            rows.append([np.dtype(dtype).name, causal,
                         f"{np.abs(o - o_ref).max():.2e}", f"{np.abs(lse - lse_ref).max():.2e}",
                         f"{np.abs(o_fp32 - o_ref).max():.2e}", fmt_bytes(tiled), fmt_bytes(naive)])
    print_table(f"Tiled forward (64 x 64 tiles) vs float64 attention: b={batch} s={seqlen} h={nheads} d={head_dim}",
                ["dtype", "causal", "tiled |dO|", "tiled |dLSE|", "naive fp32 |dO|",
                 "tiled extra (O+LSE)", "naive extra (S)"], rows)
    shape = MEMORY_SHAPE
    for seqlen in (8192, 32768):
        tiled = tiled_extra_bytes(shape["batch"], seqlen, shape["nheads"], shape["head_dim"], 2)
        naive = naive_score_bytes(shape["batch"], shape["nheads"], seqlen, seqlen, 2)
        print(f"  at b=1 h=16 d=128 fp16 s={seqlen}: tiled O+LSE = {fmt_bytes(tiled)}, "
              f"naive S = {fmt_bytes(naive)} ({naive / tiled:.0f}x)")
    cpu_demo_backward()


def cpu_demo_backward():
    """The tiled backward (flash_backward_model, from the tiled forward's O and LSE) against the
    gradients of plain attention, in NumPy."""
    from cuflash.reference import attention_reference_backward, flash_backward_model, flash_forward_model

    batch, seqlen, nheads, head_dim = 1, 300, 2, 64
    rng = np.random.default_rng(1)
    rows = []
    for dtype in (np.float32, np.float64):
        q, k, v, dout = (rng.standard_normal((batch, seqlen, nheads, head_dim)).astype(dtype) for _ in range(4))
        for causal in (False, True):
            ref = attention_reference_backward(dout, q, k, v, causal=causal)                 # float64
            naive = attention_reference_backward(dout, q, k, v, causal=causal, upcast=False)  # fp32
            o, lse = flash_forward_model(q, k, v, causal=causal, block_m=64, block_n=64)
            tiled = flash_backward_model(dout, q, k, v, o, lse, causal=causal, block_m=64, block_n=64)
            extra = tiled_bwd_extra_bytes(batch, seqlen, nheads, head_dim, np.dtype(dtype).itemsize)
            rows.append([np.dtype(dtype).name, causal,
                         *(f"{np.abs(g - r).max():.2e}" for g, r in zip(tiled, ref)),
                         f"{max(np.abs(g - r).max() for g, r in zip(naive, ref)):.2e}", fmt_bytes(extra)])
    print_table(f"Tiled backward (64 x 64 tiles) vs float64 attention gradients: b={batch} s={seqlen} "
                f"h={nheads} d={head_dim}",
                ["dtype", "causal", "tiled |ddQ|", "tiled |ddK|", "tiled |ddV|", "naive fp32 max",
                 "tiled extra (dQKV+dQacc+D+lse2)"], rows)


# --------------------------------------------------------------------------------------------
# Naive attention in CuPy: S = Q K^T, softmax in float32, O = P V


_scale_mask_kernel = None


def _scale_mask(s, scale, causal):
    """float32 S * scale, with -inf where the (bottom-right aligned) causal mask hides a key."""
    global _scale_mask_kernel
    import cupy

    if _scale_mask_kernel is None:
        _scale_mask_kernel = cupy.ElementwiseKernel(
            "T s, float32 scale, int64 seqlen_q, int64 seqlen_k, bool causal", "float32 x",
            """
            long long col = i % seqlen_k, row = (i / seqlen_k) % seqlen_q;
            x = (causal && col > row + seqlen_k - seqlen_q) ? -__int_as_float(0x7f800000)
                                                            : static_cast<float>(s) * scale;
            """,
            "bench_scale_mask")
    seqlen_q, seqlen_k = s.shape[-2:]
    return _scale_mask_kernel(s, np.float32(scale), np.int64(seqlen_q), np.int64(seqlen_k), bool(causal))


def naive_attention(q, k, v, causal=False):
    """Attention the way it is written without fusion; CuPy (b, s, h, d) in, O (b, s, h, d) out."""
    import cupy

    scale = 1.0 / math.sqrt(q.shape[-1])
    q_, k_, v_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v))     # (b, h, s, d) views
    # S = Q K^T   (b, h, sq, sk), input dtype, cuBLAS
    s = cupy.matmul(q_, k_.transpose(0, 1, 3, 2))
    # P = softmax(S * scale [+ mask]) in float32, stored in the input dtype
    x = _scale_mask(s, scale, causal)
    del s
    x -= x.max(axis=-1, keepdims=True)
    cupy.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    p = x.astype(q.dtype)
    del x
    # O = P V   (b, h, sq, d) -> (b, sq, h, d) view
    return cupy.matmul(p, v_).transpose(0, 2, 1, 3)


# --------------------------------------------------------------------------------------------
# Timing (torch CUDA events on torch's current stream, where every backend runs)


class Skip(Exception):
    """A backend that does not run this problem on purpose (shown as "skip")."""


def l2_flusher():
    import torch

    buffer = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    return buffer.zero_


def warm_call_ms(fn):
    """GPU time in ms of one call of fn() after WARMUP_RUNS untimed ones (at least 1e-3): what the
    timers size their runs by."""
    import torch

    for _ in range(WARMUP_RUNS):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end), 1e-3)


def median_ms(fn, flush, budget_ms):
    """Median GPU time of fn() in ms: warm up, pick the number of runs from one timed call, then
    flush L2 and time each run between its own pair of CUDA events."""
    import torch

    def event():
        return torch.cuda.Event(enable_timing=True)

    runs = int(min(MAX_RUNS, max(MIN_RUNS, budget_ms / warm_call_ms(fn))))
    events = [(event(), event()) for _ in range(runs)]
    for start, end in events:
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def interleaved_ms(fns, flush, rounds):
    """{name: median GPU time in ms} of several callables timed call by call: each round runs every
    fn once (the order rotated by one place per round), each after an L2 flush and between its
    own pair of CUDA events, and the host waits only at the end, so no launch gap falls inside a
    measurement. Clock and power drift then reach every fn alike: two builds of one kernel agree
    within ~0.5%, where back-to-back medians (median_ms) drift by up to 5% between them in one
    process (bench/NOTES.md, v2.14)."""
    import torch

    names = list(fns)
    for name in names:
        for _ in range(WARMUP_RUNS):
            fns[name]()
    events = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush()
            start.record()
            fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(start.elapsed_time(end) for start, end in pairs) for name, pairs in events.items()}


def sustained_ms(fns, seconds, blocks=2, chunk_ms=10.0):
    """{name: ms per call} of several callables, each run back to back for `seconds` at a time,
    in blocks that alternate between them (the order reversed every block), as a training loop
    runs a kernel. The GPU then settles at its power limit, where the clock a kernel gets depends
    on the energy its calls draw (bench/NOTES.md, v2.16); interleaved_ms instead times every
    callable at the clock their mix sets. Calls go in chunks of ~chunk_ms between CUDA events,
    with no L2 flush (the benchmark's tensors are larger than L2); a block's figure is the median
    chunk of its second half, and a callable's figure the median of its blocks."""
    import torch

    names = list(fns)
    chunk = {name: max(1, round(chunk_ms / warm_call_ms(fns[name]))) for name in names}
    per_block = {name: [] for name in names}
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            fn, calls = fns[name], chunk[name]
            pairs = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline or len(pairs) < 4:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                pairs.append((start, end))
            torch.cuda.synchronize()
            settled = pairs[len(pairs) // 2:]
            per_block[name].append(statistics.median(s.elapsed_time(e) for s, e in settled) / calls)
    return {name: statistics.median(ms) for name, ms in per_block.items()}


def measure(make, flops, flush, budget_ms):
    """{"ms", "tflops"}, {"skip": why} or {"error": message} for the callable make() builds."""
    try:
        ms = median_ms(make(), flush, budget_ms)
    except Skip as why:
        return {"skip": str(why)}
    except Exception as error:  # a backend that cannot run this problem shows "n/a"
        message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return {"error": message}
    return {"ms": ms, "tflops": tflops(flops, ms)}


def cell(result):
    if "tflops" in result:
        return f"{result['tflops']:.1f}"
    return "skip" if "skip" in result else "n/a"


def error_notes(results_by_name):
    """One line per distinct (backend, error) of a table."""
    notes = {}
    for name, result in results_by_name:
        if "error" in result:
            notes.setdefault(f"{name}: {result['error']}", None)
    return list(notes)


# --------------------------------------------------------------------------------------------
# Backends: make_<name>(q, k, v, causal, dropout_p) -> a zero-argument callable returning O (b, s, h, d)


def make_cuflash(q, k, v, causal, dropout_p=0.0, tile=None):
    return lambda: cuflash.forward(q, k, v, causal=causal, tile=tile, dropout_p=dropout_p, seed=DROPOUT_SEED)[0]


def make_cuflash_portable(q, k, v, causal, dropout_p=0.0):
    """cuflash's portable (mma.sync) forward, forced by its table tile: on an H100 the default
    "cuflash" runs the sm_90a kernels where the head dim has one."""
    from cuflash import plan

    dtype = str(q.dtype).removeprefix("torch.")
    tile = plan.forward_variant(dtype, q.shape[-1], causal, dropout=dropout_p > 0).tile
    return make_cuflash(q, k, v, causal, dropout_p, tile=tile)


def make_sdpa(backend_name):
    def make(q, k, v, causal, dropout_p=0.0):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))     # (b, h, s, d) views, as users pass them

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q_, k_, v_, dropout_p=dropout_p,
                                                      is_causal=causal).transpose(1, 2)

        return run

    return make


def make_naive(q, k, v, causal, dropout_p=0.0):
    import cupy
    import torch

    if dropout_p:
        raise Skip("no dropout in the naive attention")
    if q.dtype == torch.bfloat16:
        raise Skip("CuPy arrays have no bfloat16")
    batch, seqlen, nheads, _ = q.shape
    s_bytes = naive_score_bytes(batch, nheads, seqlen, seqlen, q.element_size())
    if s_bytes > NAIVE_S_LIMIT:
        raise Skip(f"S would take {fmt_bytes(s_bytes)}")
    stream = cupy.cuda.Stream.from_external(torch.cuda.current_stream())
    with stream:
        q_, k_, v_ = (cupy.from_dlpack(x) for x in (q, k, v))

    def run():
        with stream:
            return naive_attention(q_, k_, v_, causal)

    return run


MAKERS = {
    "cuflash": make_cuflash,
    "cuflash-portable": make_cuflash_portable,
    "sdpa-flash": make_sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": make_sdpa("CUDNN_ATTENTION"),
    "naive": make_naive,
}


# Backward backends: make_<name>(q, k, v, dout, causal, dropout_p) -> a zero-argument callable
# returning (dq, dk, dv) (b, s, h, d); the forward (graph) is built once in make, outside the timing.


def make_cuflash_bwd(deterministic=False, tile=None):
    def make(q, k, v, dout, causal, dropout_p=0.0):
        import torch

        with torch.no_grad():
            o, lse = cuflash.forward(q, k, v, causal=causal, dropout_p=dropout_p, seed=DROPOUT_SEED)
        return lambda: cuflash.backward(dout, q, k, v, o, lse, causal=causal, deterministic=deterministic, tile=tile,
                                        dropout_p=dropout_p, seed=DROPOUT_SEED)

    return make


def make_sdpa_bwd(backend_name):
    def make(q, k, v, dout, causal, dropout_p=0.0):
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        # Leaves (b, s, h, d) that share q, k, v's memory; SDPA sees (b, h, s, d) views of them.
        leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
        with torch.enable_grad(), sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in leaves), dropout_p=dropout_p,
                                               is_causal=causal).transpose(1, 2)
        return lambda: torch.autograd.grad(o, leaves, dout, retain_graph=True)

    return make


BWD_MAKERS = {
    "cuflash": make_cuflash_bwd(deterministic=False),
    "cuflash-det": make_cuflash_bwd(deterministic=True),
    "sdpa-flash": make_sdpa_bwd("FLASH_ATTENTION"),
    "sdpa-cudnn": make_sdpa_bwd("CUDNN_ATTENTION"),
}


def random_qkv(batch, seqlen, nheads, head_dim, dtype, count=3):
    """q, k, v (and dout with count=4): standard normal (b, s, h, d) torch tensors."""
    import torch

    torch_dtype = getattr(torch, DTYPE_NAMES[dtype])
    return [torch.randn(batch, seqlen, nheads, head_dim, dtype=torch_dtype, device="cuda") for _ in range(count)]


def max_diff(q, k, v, causal, reference):
    """max |O_cuflash - O_reference|, a guard against a fast wrong answer (not an assertion)."""
    try:
        o = MAKERS["cuflash"](q, k, v, causal)()
        o_ref = MAKERS[reference](q, k, v, causal)()
        return float((o.float() - o_ref.float()).abs().max())
    except Exception:
        return None


def max_grad_diff(q, k, v, dout, causal, reference):
    """max over dq, dk, dv of |cuflash - reference|, a guard against a fast wrong answer."""
    try:
        grads = BWD_MAKERS["cuflash"](q, k, v, dout, causal)()
        grads_ref = BWD_MAKERS[reference](q, k, v, dout, causal)()
        return max(float((g.float() - r.float()).abs().max()) for g, r in zip(grads, grads_ref))
    except Exception:
        return None


def free_device_memory():
    import cupy
    import torch

    torch.cuda.synchronize()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Forward tables


def forward_row(dtype, head_dim, causal, seqlen, dropout_p, flush, budget_ms):
    """Every backend on the same inputs; the inputs die with this frame."""
    batch, nheads = TOKENS // seqlen, HIDDEN // head_dim
    flops = attention_flops(batch, nheads, seqlen, seqlen, head_dim, causal)
    q, k, v = random_qkv(batch, seqlen, nheads, head_dim, dtype)
    results = {name: measure(lambda name=name: MAKERS[name](q, k, v, causal, dropout_p), flops, flush, budget_ms)
               for name in BACKENDS}
    reference = next((name for name in ("sdpa-flash", "sdpa-cudnn") if "ms" in results[name]), None)
    checked = reference and "ms" in results["cuflash"] and not dropout_p  # dropout: the masks differ
    diff = max_diff(q, k, v, causal, reference) if checked else None
    return {"dtype": dtype, "head_dim": head_dim, "causal": causal, "dropout_p": dropout_p, "seqlen": seqlen,
            "batch": batch, "nheads": nheads, "flops": flops, "results": results, "check_against": reference,
            "max_diff": diff}


def run_grid(make_row, print_group, config, budget_ms, rows, save):
    """Append make_row(dtype, d, causal, seqlen, dropout_p, flush, budget_ms) for the whole grid to
    rows; print one table per (dtype, d, causal)."""
    flush = l2_flusher()
    for dtype in config["dtype"]:
        for head_dim in config["hdim"]:
            for causal in config["causal"]:
                group = []
                for seqlen in config["seqlen"]:
                    group.append(make_row(dtype, head_dim, causal, seqlen, config["dropout"], flush, budget_ms))
                    free_device_memory()
                print_group(group)
                rows += group
                save()


def ratio(row, a="cuflash", b="sdpa-flash"):
    ra, rb = row["results"][a], row["results"][b]
    return ra["tflops"] / rb["tflops"] if "tflops" in ra and "tflops" in rb else None


def dropout_text(dropout_p):
    """The titles' mention of dropout; nothing without it."""
    return f", dropout p={dropout_p:g}" if dropout_p else ""


def print_timing_table(rows, title, backends, diff_label, notes=()):
    """One table of a (dtype, d, causal) group: TFLOP/s per backend, cuflash/flash, the check."""
    first = rows[0]
    title = (f"{title}, {first['dtype']}, d={first['head_dim']}, causal={first['causal']}"
             f"{dropout_text(first['dropout_p'])} (batch*seqlen={TOKENS}, hidden={HIDDEN})")
    headers = ["seqlen", "batch", "nheads", *backends, "cuflash/flash", diff_label]
    table = []
    for row in rows:
        r = ratio(row)
        table.append([row["seqlen"], row["batch"], row["nheads"],
                      *(cell(row["results"][name]) for name in backends),
                      "n/a" if r is None else f"{r:.2f}",
                      "n/a" if row["max_diff"] is None else f"{row['max_diff']:.1e}"])
    errors = error_notes((name, row["results"][name]) for row in rows for name in backends)
    if first["dropout_p"]:
        notes = [*notes, f"{diff_label}: not checked with dropout (cuflash and SDPA draw different masks)."]
    print_table(title, headers, table, errors + list(notes))


def print_forward_table(rows):
    print_timing_table(rows, "Forward TFLOP/s", BACKENDS, "max|dO|")


# --------------------------------------------------------------------------------------------
# Backward tables


def backward_row(dtype, head_dim, causal, seqlen, dropout_p, flush, budget_ms):
    """Every backward backend on the same q, k, v, dout; the inputs die with this frame."""
    batch, nheads = TOKENS // seqlen, HIDDEN // head_dim
    flops = attention_flops(batch, nheads, seqlen, seqlen, head_dim, causal, pass_="bwd")
    q, k, v, dout = random_qkv(batch, seqlen, nheads, head_dim, dtype, count=4)
    results = {}
    for name in BWD_BACKENDS:
        results[name] = measure(lambda name=name: BWD_MAKERS[name](q, k, v, dout, causal, dropout_p),
                                flops, flush, budget_ms)
        free_device_memory()        # the graph (SDPA's saved O and LSE) dies with the callable
    reference = next((name for name in ("sdpa-flash", "sdpa-cudnn") if "ms" in results[name]), None)
    checked = reference and "ms" in results["cuflash"] and not dropout_p  # dropout: the masks differ
    diff = max_grad_diff(q, k, v, dout, causal, reference) if checked else None
    return {"dtype": dtype, "head_dim": head_dim, "causal": causal, "dropout_p": dropout_p, "seqlen": seqlen,
            "batch": batch, "nheads": nheads, "flops": flops, "results": results, "check_against": reference,
            "max_diff": diff}


def print_backward_table(rows):
    print_timing_table(rows, "Backward TFLOP/s (FLOPs = 2.5x forward)", BWD_BACKENDS, "max|dgrad|", [
        "cuflash: deterministic=False (dQ by float32 atomics); cuflash-det: deterministic=True. "
        "max|dgrad|: max over dQ, dK, dV of |cuflash - SDPA| (flash, else cuDNN)."])


# --------------------------------------------------------------------------------------------
# Tile sweep


TILE_FIELDS = {"fwd": "(block_m, block_n, num_warps, stages), sm_90a (block_m, block_n, stages)",
               "bwd": "(block_m, block_n, num_warps, dq_block_n, sdp_wm, kv_wm, dq_wm), sm_90a (block_m, block_n, stages)"}


def tile_candidates(head_dim, pass_):
    """[(tile, is_default)]: the plan's tile for head_dim first, then the other candidates."""
    from cuflash import plan

    bucket = plan.head_dim_bucket(head_dim)
    if pass_ == "fwd":
        tables, listed = (plan.FWD_TILES, plan.HOPPER_FWD_TILES), [
            plan.HopperFwdTile(*t) if len(t) < 4 else plan.FwdTile(*t) for t in TILE_CANDIDATES.get(head_dim, ())]
    else:
        tables, listed = (plan.BWD_TILES, plan.HOPPER_BWD_TILES), [
            plan.HopperBwdTile(*t) if len(t) < 4 else plan.BwdTile(*t) for t in BWD_TILE_CANDIDATES.get(head_dim, ())]
    defaults = [table[bucket] for table in tables if bucket in table]
    return [(tile, True) for tile in defaults] + [(tile, False) for tile in listed if tile not in defaults]


def tile_rows(pass_, dtype, head_dim, causal, seqlen, candidates, flush, budget_ms):
    """cuflash's forward or backward (deterministic=False) with each candidate tile on the same
    inputs; a candidate that raises (registers, shared memory, warp grid) shows its error. The
    inputs die with this frame."""
    batch, nheads = TOKENS // seqlen, HIDDEN // head_dim
    flops = attention_flops(batch, nheads, seqlen, seqlen, head_dim, causal, pass_=pass_)
    q, k, v, dout = random_qkv(batch, seqlen, nheads, head_dim, dtype, count=4)

    def make(tile):
        if pass_ == "fwd":
            return make_cuflash(q, k, v, causal, tile=tile)
        return make_cuflash_bwd(deterministic=False, tile=tile)(q, k, v, dout, causal)

    return [{"pass": pass_, "dtype": dtype, "head_dim": head_dim, "causal": causal, "seqlen": seqlen,
             "batch": batch, "nheads": nheads, "flops": flops, "default": is_default,
             "tile": list(dataclasses.astuple(tile)),
             "result": measure(lambda tile=tile: make(tile), flops, flush, budget_ms)}
            for tile, is_default in candidates]


def run_tiles(config, passes, budget_ms, rows, save):
    """Append one row per (pass, dtype, d, causal, seqlen, tile) to rows; print a table per
    (pass, dtype, d, causal)."""
    flush = l2_flusher()
    for pass_ in passes:
        for dtype in config["dtype"]:
            for head_dim in config["hdim"]:
                for causal in config["causal"]:
                    table, group = [], []
                    try:
                        candidates = tile_candidates(head_dim, pass_)
                    except Exception as error:  # e.g. a head dim the plan has no tile for
                        print(f"\nno {pass_} tiles for d={head_dim}: {type(error).__name__}: {error}", flush=True)
                        continue
                    for seqlen in config["seqlen"]:
                        group += tile_rows(pass_, dtype, head_dim, causal, seqlen, candidates, flush, budget_ms)
                        free_device_memory()
                    for tile, is_default in candidates:
                        key = list(dataclasses.astuple(tile))
                        label = str(tuple(key)) + (" default" if is_default else "")
                        table.append([label, *(cell(g["result"]) for g in group if g["tile"] == key)])
                    notes = error_notes((f"tile {tuple(g['tile'])} s={g['seqlen']}", g["result"]) for g in group)
                    name = "forward" if pass_ == "fwd" else "backward (deterministic=False)"
                    print_table(f"cuflash {name} TFLOP/s by tile {TILE_FIELDS[pass_]}, {dtype}, "
                                f"d={head_dim}, causal={causal}",
                                ["tile", *(f"s={s}" for s in config["seqlen"])], table, notes)
                    rows += group
                    save()


# --------------------------------------------------------------------------------------------
# Peak extra device memory (CuPy's pool, tracked)


class PeakTracker:
    """A CuPy allocator that forwards to the memory pool and records the pool's peak usage."""

    def __init__(self, pool):
        self.pool = pool
        self.base = self.peak = 0

    def malloc(self, nbytes):
        memory = self.pool.malloc(nbytes)
        self.peak = max(self.peak, self.pool.used_bytes())
        return memory

    def reset(self):
        self.base = self.peak = self.pool.used_bytes()


def peak_extra_bytes(tracker, fn):
    """Device bytes fn() allocates beyond what is live before it (its outputs included)."""
    import cupy

    out = fn()                      # warm: compile, library workspaces
    del out
    cupy.cuda.Device().synchronize()
    tracker.pool.free_all_blocks()
    tracker.reset()
    out = fn()
    cupy.cuda.Device().synchronize()
    extra = tracker.peak - tracker.base
    del out
    tracker.pool.free_all_blocks()
    return extra


def guarded(tracker, fn, what=""):
    """(fn(), None), or (None, the table cell) when fn runs out of memory or fails; the pool is
    emptied after a failure. `what` prefixes the error text."""
    import cupy

    try:
        return fn(), None
    except cupy.cuda.memory.OutOfMemoryError:
        tracker.pool.free_all_blocks()
        return None, {"skip": "OOM"}
    except Exception as error:
        tracker.pool.free_all_blocks()
        return None, {"error": f"{what}{type(error).__name__}: {error}".splitlines()[0][:200]}


def memory_cell(tracker, fn, skip_reason=None):
    if skip_reason:
        return {"skip": skip_reason}
    peak, failed = guarded(tracker, lambda: peak_extra_bytes(tracker, fn))
    return failed or {"bytes": peak}


def backward_memory_cell(tracker, q, k, v):
    """Peak extra memory of cuflash.backward (deterministic=False) above dout, q, k, v, out, lse."""
    import cupy

    def inputs():
        dout = cupy.random.standard_normal(q.shape, dtype=cupy.float32).astype(q.dtype)
        return (dout, *cuflash.forward(q, k, v))

    made, failed = guarded(tracker, inputs, "forward: ")
    if failed:
        return failed
    dout, out, lse = made
    tracker.pool.free_all_blocks()
    return memory_cell(tracker, lambda: cuflash.backward(dout, q, k, v, out, lse))


def memory_row(tracker, seqlen, passes=("fwd",)):
    """cuflash's forward, naive attention and (with "bwd" in passes) cuflash's backward on the
    same CuPy inputs; the inputs die with this frame."""
    import cupy

    batch, nheads, head_dim, dtype = (MEMORY_SHAPE[key] for key in ("batch", "nheads", "head_dim", "dtype"))
    itemsize = np.dtype(dtype).itemsize
    shape = (batch, seqlen, nheads, head_dim)
    q, k, v = (cupy.random.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(3))
    naive_peak = naive_peak_bytes(batch, nheads, seqlen, seqlen, itemsize)
    row = {
        "seqlen": seqlen, **MEMORY_SHAPE,
        "cuflash": memory_cell(tracker, lambda: cuflash.forward(q, k, v)),
        "naive": memory_cell(tracker, lambda: naive_attention(q, k, v),
                             "OOM-skip" if naive_peak > NAIVE_PEAK_LIMIT else None),
        "expected_cuflash": tiled_extra_bytes(batch, seqlen, nheads, head_dim, itemsize),
        "expected_naive": naive_peak,
    }
    if "bwd" in passes:
        row["cuflash_bwd"] = backward_memory_cell(tracker, q, k, v)
        row["expected_cuflash_bwd"] = tiled_bwd_extra_bytes(batch, seqlen, nheads, head_dim, itemsize)
    return row


def run_memory(seqlens, passes, rows, save):
    """Append one row per seqlen to rows, then print the table."""
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    tracker = PeakTracker(pool)
    cupy.cuda.set_allocator(tracker.malloc)
    try:
        for seqlen in seqlens:
            rows.append(memory_row(tracker, seqlen, passes))
            pool.free_all_blocks()
            save()
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    print_memory_table(rows)


def memory_text(result):
    if "bytes" in result:
        return fmt_bytes(result["bytes"])
    return result.get("skip", "n/a")


def print_memory_table(rows):
    backward = any("cuflash_bwd" in row for row in rows)
    names = ("cuflash", "naive", "cuflash_bwd") if backward else ("cuflash", "naive")
    table = []
    for row in rows:
        c, n = row["cuflash"], row["naive"]
        factor = f"{n['bytes'] / c['bytes']:.0f}x" if "bytes" in c and "bytes" in n and c["bytes"] else ""
        line = [row["seqlen"], memory_text(c), fmt_bytes(row["expected_cuflash"]),
                memory_text(n), fmt_bytes(row["expected_naive"]), factor]
        if backward:
            b = row.get("cuflash_bwd", {"skip": "-"})
            line += [memory_text(b), fmt_bytes(row["expected_cuflash_bwd"]) if "expected_cuflash_bwd" in row else "-"]
        table.append(line)
    notes = error_notes((name, row[name]) for row in rows for name in names if name in row)
    notes.append("expected: cuflash O + LSE; naive S (fp16) + its float32 softmax copy. Measured: peak of "
                 "CuPy's pool above the inputs (cuBLAS workspaces outside the pool are not seen).")
    if backward:
        notes.append("cuflash bwd (deterministic=False): peak above dO, Q, K, V, O, LSE; expected dQ + dK + dV + "
                     "the float32 dQ accumulator (b*h*s*d*4) + D and lse2 (2*b*h*ceil4(s)*4).")
    headers = ["seqlen", "cuflash fwd", "expected O+LSE", "naive", "expected S+fp32", "naive/cuflash"]
    if backward:
        headers += ["cuflash bwd", "expected bwd"]
    print_table("Peak extra device memory, b=1 h=16 d=128 fp16, not causal", headers, table, notes)


# --------------------------------------------------------------------------------------------
# Plot, JSON, summary


def _style(ax, title, xlabel, ylabel):
    ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_timings(ax, rows, backends, title):
    for dtype, linestyle in (("bf16", "-"), ("fp16", "--")):
        mine = [r for r in rows if r["dtype"] == dtype]
        for name in backends:
            points = [(r["seqlen"], r["results"][name]["tflops"]) for r in mine if "tflops" in r["results"][name]]
            if points:
                ax.plot(*zip(*points), linestyle, marker="o", color=PLOT_STYLE[name], label=f"{name} {dtype}")
    _style(ax, title, "seqlen (batch*seqlen = 16k, hidden 2048)", "TFLOP/s")


def _plot_memory(ax, rows, series, title):
    for name, expected, color in series:
        label = name.replace("_", " ")
        points = [(r["seqlen"], r[name]["bytes"] / 2**20) for r in rows if "bytes" in r.get(name, {})]
        if points:
            ax.plot(*zip(*points), "-", marker="o", color=color, label=f"{label} measured")
        ax.plot([r["seqlen"] for r in rows if expected in r], [r[expected] / 2**20 for r in rows if expected in r],
                ":", color=color, label=f"{label} expected")
    ax.set_yscale("log")
    _style(ax, title, "seqlen", "MiB")


def make_plot(forward_rows, backward_rows, memory_rows, path, dropout_p=0.0):
    """One row of panels per pass (a panel per (d, causal), bf16 solid, fp16 dashed), then the
    memory panels: 3 x 4 for the default grid."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_rows = []
    for label, rows, backends in (("forward", forward_rows, BACKENDS),
                                  ("backward (2.5x fwd FLOPs)", backward_rows, BWD_BACKENDS)):
        cases = sorted({(r["head_dim"], r["causal"]) for r in rows})
        panel_rows.append([
            (lambda ax, case=case, rows=rows, backends=backends, label=label: _plot_timings(
                ax, [r for r in rows if (r["head_dim"], r["causal"]) == case], backends,
                f"{label}, d={case[0]}, causal={case[1]}{dropout_text(dropout_p)}"))
            for case in cases])
    if memory_rows:
        memory_panels = [lambda ax: _plot_memory(
            ax, memory_rows, (("cuflash", "expected_cuflash", PLOT_STYLE["cuflash"]),
                              ("naive", "expected_naive", PLOT_STYLE["naive"])),
            "forward peak extra memory, b=1 h=16 d=128 fp16")]
        if any("cuflash_bwd" in r for r in memory_rows):
            memory_panels.append(lambda ax: _plot_memory(
                ax, memory_rows, (("cuflash_bwd", "expected_cuflash_bwd", PLOT_STYLE["cuflash"]),),
                "backward peak extra memory, b=1 h=16 d=128 fp16"))
        panel_rows.append(memory_panels)
    panel_rows = [row for row in panel_rows if row]
    if not panel_rows:
        return
    nrows, ncols = len(panel_rows), max(map(len, panel_rows))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for axes_row, panels in zip(axes, panel_rows):
        for ax, draw in zip(axes_row, panels):
            draw(ax)
        for ax in axes_row[len(panels):]:
            ax.set_visible(False)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot saved to {path}", flush=True)


def environment():
    import cupy

    info = {"cuflash": cuflash.__version__, "cupy": cupy.__version__,
            "device": cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def json_saver(path, results):
    def save():
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(results, indent=1, default=str))

    return save


def geomean(values):
    values = [x for x in values if x]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def ratio_text(x):
    return "n/a" if x is None else f"{x:.2f}"


def training_rows(forward_rows, backward_rows):
    """fwd+bwd rows: each backend's forward and backward times of one (dtype, d, causal, seqlen)
    added, over 3.5x the forward FLOPs (cuflash-det: cuflash's forward, the deterministic backward)."""
    forward = {(r["dtype"], r["head_dim"], r["causal"], r["seqlen"]): r for r in forward_rows}
    rows = []
    for bwd in backward_rows:
        fwd = forward.get((bwd["dtype"], bwd["head_dim"], bwd["causal"], bwd["seqlen"]))
        if fwd is None:
            continue
        flops = fwd["flops"] * FLOP_FACTOR["fwd+bwd"]
        results = {}
        for name, result in bwd["results"].items():
            first = fwd["results"]["cuflash" if name == "cuflash-det" else name]
            if "ms" in first and "ms" in result:
                ms = first["ms"] + result["ms"]
                results[name] = {"ms": ms, "tflops": tflops(flops, ms)}
            else:
                results[name] = {"skip": "needs both passes"}
        rows.append({**bwd, "flops": flops, "results": results})
    return rows


def print_summary(forward_rows, backward_rows, memory_rows, dropout_p=0.0):
    """Per (dtype, d, causal): a forward, a backward and a fwd+bwd line at the longest seqlen, with
    cuflash / SDPA there and the geomean of cuflash / SDPA over seqlens >= ACCEPT_SEQLEN."""
    table = []
    passes = (("fwd", forward_rows), ("bwd", backward_rows), ("fwd+bwd", training_rows(forward_rows, backward_rows)))
    cases = sorted({(r["dtype"], r["head_dim"], r["causal"]) for _, rows in passes for r in rows})
    for case in cases:
        dtype, head_dim, causal = case
        for pass_, all_rows in passes:
            rows = sorted((r for r in all_rows if (r["dtype"], r["head_dim"], r["causal"]) == case),
                          key=lambda r: r["seqlen"])
            if not rows:
                continue
            last, long_rows = rows[-1], [r for r in rows if r["seqlen"] >= ACCEPT_SEQLEN]
            results = last["results"]
            table.append([f"{dtype} d{head_dim} {'causal' if causal else 'full'} s={last['seqlen']}", pass_,
                          cell(results["cuflash"]), cell(results["cuflash-det"]) if "cuflash-det" in results else "",
                          cell(results["sdpa-flash"]), cell(results["sdpa-cudnn"]),
                          ratio_text(ratio(last)), ratio_text(ratio(last, b="sdpa-cudnn")),
                          ratio_text(geomean(ratio(r) for r in long_rows)),
                          ratio_text(geomean(ratio(r, b="sdpa-cudnn") for r in long_rows))])
    notes = []
    measured = [r for r in memory_rows if "bytes" in r["cuflash"]]
    if measured:
        row = measured[-1]
        text = (f"peak extra memory at s={row['seqlen']} (b1 h16 d128 fp16): "
                f"cuflash fwd {fmt_bytes(row['cuflash']['bytes'])}")
        if "bytes" in row["naive"]:
            text += f" (naive {fmt_bytes(row['naive']['bytes'])})"
        if "bytes" in row.get("cuflash_bwd", {}):
            text += (f", cuflash bwd {fmt_bytes(row['cuflash_bwd']['bytes'])} "
                     f"(expected {fmt_bytes(row['expected_cuflash_bwd'])})")
        notes.append(text)
    if table:
        notes.insert(0, "bwd TFLOP/s count 2.5x the forward FLOPs, fwd+bwd 3.5x over the sum of the two times; "
                        "cuflash = deterministic=False, cuflash det = deterministic=True.")
        print_table(f"Summary{dropout_text(dropout_p)}: TFLOP/s at the longest seqlen, cuflash/SDPA there, and the "
                    f"geomean of cuflash/SDPA over seqlens >= {ACCEPT_SEQLEN} (acceptance is judged at seqlen >= "
                    f"{ACCEPT_SEQLEN})",
                    ["case", "pass", "cuflash", "cuflash det", "sdpa-flash", "sdpa-cudnn", "/flash", "/cudnn",
                     f"geomean /flash s>={ACCEPT_SEQLEN}", f"geomean /cudnn s>={ACCEPT_SEQLEN}"], table, notes)
    elif notes:
        print(f"\nSummary\n  {notes[0]}", flush=True)


def print_tiles_summary(rows):
    table = []
    order = {"fwd": 0, "bwd": 1}
    cases = sorted({(r["pass"], r["dtype"], r["head_dim"], r["causal"], r["seqlen"]) for r in rows},
                   key=lambda case: (order[case[0]], *case[1:]))
    for case in cases:
        group = [r for r in rows if (r["pass"], r["dtype"], r["head_dim"], r["causal"], r["seqlen"]) == case]
        timed = [r for r in group if "tflops" in r["result"]]
        default = next((r for r in group if r["default"]), None)
        best = max(timed, key=lambda r: r["result"]["tflops"], default=None)
        gain = (f"{best['result']['tflops'] / default['result']['tflops']:.2f}"
                if best and default and "tflops" in default["result"] else "n/a")
        pass_, dtype, head_dim, causal, seqlen = case
        table.append([f"{pass_} {dtype} d{head_dim} {'causal' if causal else 'full'} s={seqlen}",
                      cell(default["result"]) if default else "n/a",
                      str(tuple(best["tile"])) if best else "n/a",
                      cell(best["result"]) if best else "n/a", gain])
    if table:
        print_table("Summary: default tile vs the best candidate (TFLOP/s; bwd: deterministic=False, 2.5x fwd FLOPs)",
                    ["case", "default", "best tile", "best", "best/default"], table,
                    [f"tile fields: fwd {TILE_FIELDS['fwd']}, bwd {TILE_FIELDS['bwd']}"])


# --------------------------------------------------------------------------------------------


def check_shape_args(parser, seqlens, head_dims):
    """--seqlen and --hdim must split the fixed token count and hidden size into whole shapes."""
    for seqlen in seqlens:
        if seqlen <= 0 or TOKENS % seqlen:
            parser.error(f"--seqlen {seqlen}: must divide batch*seqlen = {TOKENS}")
    for head_dim in head_dims:
        if head_dim <= 0 or HIDDEN % head_dim:
            parser.error(f"--hdim {head_dim}: must divide hidden = {HIDDEN}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, help="default: fp16 bf16 (--tiles: bf16)")
    parser.add_argument("--hdim", nargs="+", type=int, help="head dims; default 64 128 (--tiles: 64 128 192 256)")
    parser.add_argument("--seqlen", nargs="+", type=int, help=f"default {SEQLENS} (--tiles: {TILE_SEQLENS})")
    causal = parser.add_mutually_exclusive_group()
    causal.add_argument("--causal", dest="causal", action="store_const", const=(True,), help="causal only")
    causal.add_argument("--no-causal", dest="causal", action="store_const", const=(False,), help="non-causal only")
    parser.add_argument("--quick", action="store_true", help="small subset: bf16, d 64 128, seqlen 1024 4096")
    parser.add_argument("--pass", dest="passes", choices=tuple(PASSES), default="both",
                        help="which timing tables (and, with --tiles, which tile sweeps) run: forward, backward "
                             "or both (default); the memory table adds the backward columns unless fwd")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiles", action="store_true",
                      help="time FwdTile / BwdTile candidates (per --pass) instead of the backends")
    mode.add_argument("--memory-only", action="store_true", help="only the peak-memory table")
    mode.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    parser.add_argument("--dropout", type=float, default=0.0, metavar="P",
                        help="dropout probability of every backend in the forward and backward tables (default 0; "
                             "the naive attention is skipped)")
    parser.add_argument("--plot", default=str(ROOT / "bench" / "bench.png"),
                        help="PNG path (default bench/bench.png)")
    parser.add_argument("--json", help="write all results as JSON to this path")
    args = parser.parse_args(argv)
    check_shape_args(parser, args.seqlen or (), args.hdim or ())
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout {args.dropout}: must be in [0, 1)")
    if args.dropout and (args.tiles or args.memory_only):
        parser.error("--dropout applies to the forward and backward tables, not to --tiles or --memory-only")
    return args


def config_from(args):
    """Explicit flags win; then --quick; then the defaults of the chosen mode."""
    if args.tiles:
        defaults = {"dtype": ("bf16",), "hdim": tuple(TILE_CANDIDATES), "seqlen": TILE_SEQLENS}
    else:
        defaults = QUICK if args.quick else {"dtype": DTYPES, "hdim": HEAD_DIMS, "seqlen": SEQLENS}
    return {
        "dtype": tuple(args.dtype or defaults["dtype"]),
        "hdim": tuple(args.hdim or defaults["hdim"]),
        "seqlen": tuple(args.seqlen or defaults["seqlen"]),
        "causal": tuple(args.causal or (False, True)),
        "dropout": args.dropout,
    }


def warm_compile(config):
    try:
        seconds = cuflash.warmup(dtypes=tuple(DTYPE_NAMES[d] for d in config["dtype"]),
                                 head_dims=config["hdim"], causal=config["causal"])
        print(f"compiled the default cuflash variants in {seconds:.1f} s", flush=True)
    except Exception as error:  # the tables show per-call errors
        print(f"cuflash.warmup failed: {type(error).__name__}: {error}", flush=True)


def run_timings(args, config, results, save):
    """Forward and backward tables, or the tile sweeps; all need torch (inputs, SDPA, CUDA
    events). The backward builds SDPA's graph with grad enabled; the forward runs under no_grad."""
    import torch

    budget_ms = QUICK_RUN_BUDGET_MS if args.quick else RUN_BUDGET_MS
    passes = PASSES[args.passes]
    with torch.no_grad():
        warm_compile(config)
    if args.tiles:
        run_tiles(config, passes, budget_ms, results["tiles"], save)
    else:
        if "fwd" in passes:
            with torch.no_grad():
                run_grid(forward_row, print_forward_table, config, budget_ms, results["forward"], save)
        if "bwd" in passes:
            run_grid(backward_row, print_backward_table, config, budget_ms, results["backward"], save)
    free_device_memory()


def main(argv=None):
    args = parse_args(argv)
    if not cuflash.cuda_available():
        print("no CUDA GPU found: running the CPU demo of the tiled algorithm", flush=True)
        cpu_demo()
        return 0

    config = config_from(args)
    env = environment()
    results = {"environment": env, "config": config, "pass": args.passes, "forward": [], "backward": [],
               "memory": [], "tiles": []}
    save = json_saver(args.json, results)
    print(f"device: {env['device']}; cuflash {env['cuflash']}, cupy {env['cupy']}, torch {env['torch']}", flush=True)
    if not args.memory_only:
        if env["torch"] is None:
            print("torch is not installed: the timing tables need it (SDPA, CUDA events); try --memory-only")
            return 1
        run_timings(args, config, results, save)
    if not (args.tiles or args.no_memory):
        run_memory(MEMORY_SEQLENS_QUICK if args.quick else MEMORY_SEQLENS, PASSES[args.passes], results["memory"], save)
    if args.json:
        print(f"results saved to {args.json}", flush=True)
    if args.tiles:
        print_tiles_summary(results["tiles"])
        return 0
    make_plot(results["forward"], results["backward"], results["memory"], args.plot, config["dropout"])
    print_summary(results["forward"], results["backward"], results["memory"], config["dropout"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
