"""Per-call host overhead of attention on a tiny problem: cuflash.flash_attn_func against torch SDPA
(FLASH_ATTENTION and CUDNN_ATTENTION backends), each with grad off (inputs without requires_grad,
under torch.no_grad()) and on (inputs with requires_grad, forward only, the result dropped each
call). On torch tensors b=1 s=128 h=16 d=64 bf16 (SDPA on (b, h, s, d) transposed views made once)
the GPU work is a few microseconds, so N back-to-back calls are bound by the host: host us/call is
the time.perf_counter wall time of N calls, from a torch.cuda.synchronize() before them to one
after, over N; the median (and min) of R repeats, interleaved across the cases, after ~200 warmup
calls. To check that the GPU is not the bottleneck, GPU us/call times up to 200 calls between CUDA
events while torch.cuda._sleep holds the GPU until the host has queued them all, so the calls run
back to back: the GPU's busy time per call, which must stay well below host us/call. The sdpa_kernel
and grad contexts are entered once per repeat, outside the calls.

    PYTHONPATH=. python3 bench/overhead.py
    PYTHONPATH=. python3 bench/overhead.py --no-causal --calls 5000 --repeats 11 --json overhead.json
"""
import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

IMPLS = (("cuflash", None), ("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"))
MODES = ("no grad", "grad")
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
GPU_CALLS = 200                # calls queued behind the sleep: well inside CUDA's launch queue


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention (default on)")
    parser.add_argument("--calls", type=int, default=2000, metavar="N", help="back-to-back calls per repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=7, metavar="R", help="repeats; the table shows their median (default 7)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per case first (default 200)")
    parser.add_argument("--json", metavar="PATH", help="write the numbers as JSON to this path")
    args = parser.parse_args(argv)
    for name in ("batch", "seqlen", "heads", "head_dim", "calls", "repeats", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: too small")
    return args


@contextlib.contextmanager
def entered(mode, backend):
    """The case's grad mode and, for SDPA, its one allowed backend."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.enable_grad() if mode == "grad" else torch.no_grad():
        with sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext():
            yield


def make_call(backend, q, k, v, causal):
    """A zero-argument callable running one forward on q, k, v (b, s, h, d)."""
    if backend is None:
        import cuflash

        return lambda: cuflash.flash_attn_func(q, k, v, causal=causal)
    import torch.nn.functional as F

    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))      # (b, h, s, d) views, made once
    return lambda: F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)


def host_us(fn, calls):
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / calls


def gpu_us(fn, calls, host_estimate_us):
    """GPU busy time per call: the calls queued behind a sleep long enough to cover their launches, then timed by events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    cycles_per_us = 1_000_000 / (start.elapsed_time(end) * 1e3)
    torch.cuda._sleep(int(cycles_per_us * (2 * calls * host_estimate_us + 1000)))
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed: the overhead benchmark needs torch and a CUDA GPU")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU found: the overhead benchmark needs one")
        return 0
    shape = (args.batch, args.seqlen, args.heads, args.head_dim)
    dtype = getattr(torch, DTYPES[args.dtype])
    cases = []
    for mode in MODES:
        q, k, v = (torch.randn(shape, dtype=dtype, device="cuda", requires_grad=mode == "grad") for _ in range(3))
        for impl, backend in IMPLS:
            case = {"impl": impl, "mode": mode, "backend": backend, "host_us": []}
            try:                                  # warmup doubles as the probe: a backend that raises shows n/a
                with entered(mode, backend):
                    case["fn"] = make_call(backend, q, k, v, args.causal)
                    for _ in range(max(args.warmup, 1)):
                        case["fn"]()
                torch.cuda.synchronize()
            except Exception as error:
                case["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            cases.append(case)
    live = [c for c in cases if "error" not in c]
    for _ in range(args.repeats):                 # interleaved, so drift reaches every case alike
        for case in live:
            with entered(case["mode"], case["backend"]):
                case["host_us"].append(host_us(case["fn"], args.calls))
    for case in live:
        case["host_us_median"], case["host_us_min"] = statistics.median(case["host_us"]), min(case["host_us"])
        with entered(case["mode"], case["backend"]):
            case["gpu_us"] = gpu_us(case["fn"], min(args.calls, GPU_CALLS), case["host_us_median"])
    flash = {c["mode"]: c.get("host_us_median") for c in cases if c["impl"] == "sdpa-flash"}
    for case in live:
        case["ratio_to_sdpa_flash"] = case["host_us_median"] / flash[case["mode"]] if flash[case["mode"]] else None
    for case in cases:
        case.pop("fn", None)

    device = torch.cuda.get_device_name()
    config = {**vars(args), "shape_bshd": shape, "device": device, "torch": torch.__version__}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": config, "results": cases}, indent=1))
        print(f"results saved to {args.json}")
    rows = [[f"{c['impl']} ({c['mode']})"] + (["n/a"] * 4 if "error" in c else [
        f"{c['host_us_median']:.1f}", f"{c['host_us_min']:.1f}", f"{c['gpu_us']:.1f}",
        "n/a" if c["ratio_to_sdpa_flash"] is None else f"{c['ratio_to_sdpa_flash']:.2f}"]) for c in cases]
    headers = ["impl (mode)", "host us/call (median)", "min", "GPU us/call", "/sdpa-flash"]
    cells = [headers] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\nHost overhead per call on {device}, torch {torch.__version__}: b={args.batch} s={args.seqlen} h={args.heads} "
          f"d={args.head_dim} {args.dtype} causal={args.causal}; {args.calls} calls x {args.repeats} repeats")
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for case in cases:
        if "error" in case:
            print(f"  {case['impl']} ({case['mode']}): {case['error']}")
        elif case["gpu_us"] > 0.5 * case["host_us_median"]:
            print(f"  {case['impl']} ({case['mode']}): GPU us/call is over half the host's: the GPU may bound this row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
