"""What a score modification costs: cuflash with a feature switched on, beside cuflash without it
and torch's FlexAttention (compiled) computing the same scores, in one process.

    PYTHONPATH=. python3 bench/features.py                        # softcap 50, bf16, d 64 128, s 2k 16k
    PYTHONPATH=. python3 bench/features.py --hdim 128 --seqlen 16384 --causal --rounds 30

Rows are (pass, head dim, seqlen, causal) at FlashAttention's benchmark shapes (batch * seqlen =
16k tokens, hidden 2048). Each row times its callables call by call in rotated order
(bench.interleaved_ms: CUDA events, L2 flushed before each call) and reports TFLOP/s with
FlashAttention's convention (bench.attention_flops; causal halved, backward 2.5x). "cost" is
cuflash with the feature over cuflash without it, "vs flex" cuflash with the feature over
FlexAttention with it. The backward is the backward alone: cuflash.backward from saved O and lse;
for FlexAttention, its compiled forward + backward (one torch.compile'd function) less its
forward's time.
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  bench/bench.py: timing, shapes, FLOP counts

DEFAULT_SEQLENS = (2048, 16384)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--softcap", type=float, default=50.0, help="the cap (default 50, Gemma 2's attention softcap)")
    parser.add_argument("--dtype", choices=bench.DTYPES, default="bf16")
    parser.add_argument("--hdim", nargs="+", type=int, default=bench.HEAD_DIMS)
    parser.add_argument("--seqlen", nargs="+", type=int, default=DEFAULT_SEQLENS)
    causal = parser.add_mutually_exclusive_group()
    causal.add_argument("--causal", dest="causal", action="store_const", const=(True,), default=(False, True))
    causal.add_argument("--no-causal", dest="causal", action="store_const", const=(False,))
    parser.add_argument("--pass", dest="passes", choices=tuple(bench.PASSES), default="both")
    parser.add_argument("--rounds", type=int, default=20, help="timed calls of each callable per row (default 20)")
    parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention out")
    return parser.parse_args(argv)


def flex_callables(q, k, v, causal, scale, softcap, dout):
    """(forward, forward + backward) of FlexAttention (compiled) with the cap as its score_mod,
    on (b, h, s, d) views."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, q.shape[1], k.shape[1])
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    dout_t = dout.transpose(1, 2)

    @torch.compile
    def forward(qt, kt, vt):
        return flex_attention(qt, kt, vt, score_mod=capped, block_mask=block_mask, scale=scale)

    @torch.compile
    def forward_backward(qt, kt, vt, dout_t):
        out = flex_attention(qt, kt, vt, score_mod=capped, block_mask=block_mask, scale=scale)
        return torch.autograd.grad(out, (qt, kt, vt), dout_t)

    def no_grad_forward():
        with torch.no_grad():
            return forward(qt, kt, vt)

    return no_grad_forward, lambda: forward_backward(qt, kt, vt, dout_t)


def time_rows(args, head_dim, seqlen, causal, flush):
    """The table rows (one per pass) of one shape."""
    import cuflash

    batch, nheads = bench.TOKENS // seqlen, bench.HIDDEN // head_dim
    q, k, v, dout = bench.random_qkv(batch, seqlen, nheads, head_dim, args.dtype, count=4)
    cap = args.softcap
    plain = cuflash.forward(q, k, v, causal=causal)
    capped = cuflash.forward(q, k, v, causal=causal, softcap=cap)
    passes = {
        "fwd": {"cuflash": lambda: cuflash.forward(q, k, v, causal=causal),
                "cuflash+cap": lambda: cuflash.forward(q, k, v, causal=causal, softcap=cap)},
        "bwd": {"cuflash": lambda: cuflash.backward(dout, q, k, v, *plain, causal=causal),
                "cuflash+cap": lambda: cuflash.backward(dout, q, k, v, *capped, causal=causal, softcap=cap)},
    }
    if not args.no_flex:
        passes["fwd"]["flex+cap"], passes["bwd"]["flex+cap"] = flex_callables(q, k, v, causal, 1.0 / math.sqrt(head_dim),
                                                                               cap, dout)
    rows, flex_fwd_ms = [], None
    for pass_ in ("fwd", "bwd"):
        ms = bench.interleaved_ms(passes[pass_], flush, args.rounds)
        if "flex+cap" in ms:
            if pass_ == "fwd":
                flex_fwd_ms = ms["flex+cap"]
            else:  # FlexAttention's backward: its compiled forward + backward less its forward
                ms["flex+cap"] -= flex_fwd_ms
        if pass_ not in bench.PASSES[args.passes]:
            continue
        flops = bench.attention_flops(batch, nheads, seqlen, seqlen, head_dim, causal, pass_)
        tf = {name: bench.tflops(flops, t) for name, t in ms.items()}
        row = [pass_, head_dim, seqlen, "yes" if causal else "no", f"{tf['cuflash']:.0f}", f"{tf['cuflash+cap']:.0f}",
               f"{tf['cuflash+cap'] / tf['cuflash']:.3f}"]
        if not args.no_flex:
            row += [f"{tf['flex+cap']:.0f}", f"{tf['cuflash+cap'] / tf['flex+cap']:.2f}"]
        print(" ".join(str(x) for x in row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed: the feature benchmark needs torch and a CUDA GPU")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU found: the feature benchmark needs one")
        return 0
    flush = bench.l2_flusher()
    rows = []
    for head_dim in args.hdim:
        for seqlen in args.seqlen:
            for causal in args.causal:
                rows += time_rows(args, head_dim, seqlen, causal, flush)
                torch.cuda.empty_cache()
    headers = ["pass", "d", "seqlen", "causal", "cuflash", f"+softcap {args.softcap:g}", "cost"]
    if not args.no_flex:
        headers += ["flex+softcap", "vs flex"]
    bench.print_table(f"TFLOP/s with softcap ({args.dtype}, {torch.cuda.get_device_name()}; {args.rounds} rounds, "
                      "interleaved)", headers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
