"""Paired A/B timing of cuflash builds: this checkout against git revisions, beside torch SDPA's
cuDNN backend, on the same tensors in one process.

    python bench/ab.py HEAD~1                    # backward, bf16, d 64 128, causal and not, s 2k 4k 16k
    python bench/ab.py main HEAD~3 --pass fwd --dtype fp16 --seqlen 2048 16384 --causal
    python bench/ab.py HEAD~1 --rounds 100
    python bench/ab.py --sustained 2             # this checkout and cuDNN only, each at its own clock

Two bench.py runs minutes apart differ by up to 5-10% for one kernel (bench/NOTES.md, "Measuring
small differences"). Here every build runs on the same tensors, call by call in rotated order
(bench.interleaved_ms, CUDA events, L2 flushed before each call), so clock and power drift reach
them alike: two builds of one kernel agree within ~0.5%. Timed this way, each build runs in the
power state that the mix of builds sets; cuDNN's d128 backward, which bench.py times back to back
under the H100's 700 W limit, gains ~4% on cuflash here (bench/NOTES.md, v2.14). Each revision's
cuflash/ and cuda_src/ are extracted with `git archive` into a temporary folder as a package
cuflash_<i> (cuflash's imports are relative, and compile.SRC_DIR finds cuda_src inside the
package), so the builds load side by side. A build's figure is its median over the rounds. The
last line gives geomeans over the rows: of every build over cuDNN, and of this checkout over
each revision. Shapes as bench.py's: batch * seqlen = 16384, hidden = 2048.

With --sustained SECONDS the builds run back to back instead, SECONDS at a time in alternating
blocks (bench.sustained_ms), as a training loop runs them: each then settles at the clock the
700 W limit leaves it, which depends on the energy its calls draw. A kernel that does more work
per clock can still lose there, and one that draws less power can win: bench/NOTES.md, v2.16.
"""
import argparse
import importlib
import io
import math
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import bench  # bench/bench.py: its timing, shapes and SDPA backends

DEFAULT_SEQLENS = (2048, 4096, 16384)


def extract(rev, name, into):
    """cuflash (with its cuda_src) at git revision `rev`, imported as package `name` from `into`."""
    archive = subprocess.run(["git", "-C", str(bench.ROOT), "archive", rev, "cuflash", "cuda_src"],
                             check=True, capture_output=True).stdout
    package = Path(into) / name
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            top, _, rest = member.name.partition("/")
            if rest and member.isfile():
                # cuflash/x.py -> name/x.py; cuda_src/x.cu -> name/cuda_src/x.cu
                target = package / rest if top == "cuflash" else package / top / rest
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def make_cuflash(module, q, k, v, dout, causal, pass_):
    if pass_ == "fwd":
        return lambda: module.forward(q, k, v, causal=causal)[0]
    o, lse = module.forward(q, k, v, causal=causal)
    return lambda: module.backward(dout, q, k, v, o, lse, causal=causal)


def make_cudnn(q, k, v, dout, causal, pass_):
    if pass_ == "fwd":
        return bench.make_sdpa("CUDNN_ATTENTION")(q, k, v, causal)
    return bench.make_sdpa_bwd("CUDNN_ATTENTION")(q, k, v, dout, causal)


def rel_diff(a, b):
    """max |a - b| / max |b| of the first output (O, or dQ), a guard against a fast wrong build."""
    a, b = (x[0] if isinstance(x, tuple) else x for x in (a, b))
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def run(args):
    import torch

    flush = bench.l2_flusher()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        builds = {"this": bench.cuflash}
        for i, rev in enumerate(args.revs):
            builds[rev] = extract(rev, f"cuflash_{i}", folder)
        for dtype in args.dtype:
            for head_dim in args.hdim:
                for causal in args.causal:
                    for seqlen in args.seqlen:
                        batch, nheads = bench.TOKENS // seqlen, bench.HIDDEN // head_dim
                        torch.manual_seed(0)
                        q, k, v, dout = bench.random_qkv(batch, seqlen, nheads, head_dim, dtype, count=4)
                        fns = {name: make_cuflash(module, q, k, v, dout, causal, args.pass_)
                               for name, module in builds.items()}
                        fns["cuDNN"] = make_cudnn(q, k, v, dout, causal, args.pass_)
                        reference = fns["cuDNN"]()
                        diffs = {name: rel_diff(fn(), reference) for name, fn in fns.items() if name != "cuDNN"}
                        if args.sustained:
                            ms = bench.sustained_ms(fns, args.sustained)
                        else:
                            ms = bench.interleaved_ms(fns, flush, args.rounds)
                        flops = bench.attention_flops(batch, nheads, seqlen, seqlen, head_dim, causal, args.pass_)
                        row = {name: bench.tflops(flops, ms[name]) for name in fns}
                        rows.append(row)
                        case = f"{args.pass_} {dtype} d{head_dim} {'causal' if causal else 'full  '} s={seqlen:<6d}"
                        figures = "  ".join(f"{name} {tf:6.1f}" for name, tf in row.items())
                        ratios = "  ".join(f"this/{name} {row['this'] / row[name]:.3f}" for name in row if name != "this")
                        worst = max(diffs.values())
                        print(f"{case} {figures}   {ratios}   max rel diff vs cuDNN {worst:.1e}", flush=True)
                        del q, k, v, dout, fns, reference
                        torch.cuda.empty_cache()
    names = list(rows[0])

    def geomean(a, b):
        return math.exp(statistics.mean(math.log(row[a] / row[b]) for row in rows))

    print("geomean: " + "  ".join(f"{name}/cuDNN {geomean(name, 'cuDNN'):.3f}" for name in names if name != "cuDNN")
          + "  " + "  ".join(f"this/{name} {geomean('this', name):.3f}" for name in args.revs))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="*", help="git revisions to time against this checkout (none: only it and cuDNN)")
    parser.add_argument("--pass", dest="pass_", choices=("fwd", "bwd"), default="bwd", help="default bwd")
    parser.add_argument("--dtype", nargs="+", choices=bench.DTYPES, default=("bf16",), help="default bf16")
    parser.add_argument("--hdim", nargs="+", type=int, default=bench.HEAD_DIMS, help="default 64 128")
    parser.add_argument("--seqlen", nargs="+", type=int, default=DEFAULT_SEQLENS, help="default 2048 4096 16384")
    causal = parser.add_mutually_exclusive_group()
    causal.add_argument("--causal", dest="causal", action="store_const", const=(True,), default=(False, True),
                        help="causal only")
    causal.add_argument("--no-causal", dest="causal", action="store_const", const=(False,), help="non-causal only")
    parser.add_argument("--rounds", type=int, default=40,
                        help="rounds per row, each timing every build once (default 40)")
    parser.add_argument("--sustained", type=float, metavar="SECONDS",
                        help="time each build back to back, SECONDS at a time in two alternating blocks per build")
    args = parser.parse_args(argv)
    bench.check_shape_args(parser, args.seqlen, args.hdim)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    if args.sustained is not None and not args.sustained > 0:
        parser.error(f"--sustained {args.sustained}: must be a positive number of seconds")
    for rev in args.revs:
        if subprocess.run(["git", "-C", str(bench.ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True).returncode:
            parser.error(f"{rev}: not a git revision of {bench.ROOT}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        print("no CUDA GPU found (with torch): nothing to time")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
