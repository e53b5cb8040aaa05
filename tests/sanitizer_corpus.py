"""Small problems that run every kernel family once, for compute-sanitizer (tests/test_faults_gpu.py
runs this file under memcheck and racecheck): the portable and sm_90a forwards and backwards,
causal and not, with and without dropout, GQA, odd sequence lengths, and an sm_90a backward
whose grid is given converter CTAs (its dK/dV CTAs made to exceed a pretended 4-SM wave), and
both backwards with their dK/dV accumulators flushed every Q tile or two.
Prints "corpus done" at the end; any error makes the process exit non-zero."""
import os

import cupy

import cuflash
from cuflash import backward_launch, schedule
from helpers import randn



def run(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype, causal, dropout_p=0.0):
    q = randn((batch, seqlen_q, nheads, head_dim), dtype, seed=1)
    k, v = (randn((batch, seqlen_k, nheads_k, head_dim), dtype, seed=seed) for seed in (2, 3))
    o, lse = cuflash.forward(q, k, v, causal=causal, dropout_p=dropout_p, seed=7)
    dout = randn(o.shape, dtype, seed=4)
    cuflash.backward(dout, q, k, v, o, lse, causal=causal, dropout_p=dropout_p, seed=7)
    cupy.cuda.runtime.deviceSynchronize()


CASES = [  # batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype, causal, dropout_p
    (1, 131, 257, 2, 1, 64, "bfloat16", True, 0.0),
    (1, 192, 129, 2, 2, 128, "float16", False, 0.0),
    (1, 130, 130, 2, 1, 256, "bfloat16", True, 0.0),
    (1, 129, 129, 2, 2, 96, "float16", True, 0.1),
    (2, 64, 200, 2, 1, 64, "bfloat16", False, 0.1),
    (1, 200, 133, 2, 2, 32, "float16", True, 0.0),     # rows that see no key (causal, sq > sk)
    (1, 133, 200, 2, 1, 160, "bfloat16", False, 0.0),  # 8-warp portable tiles
    (1, 150, 150, 2, 2, 224, "float16", True, 0.1),
]

if __name__ == "__main__":
    for portable in ("1", "0"):
        os.environ["CUFLASH_PORTABLE"] = portable
        for case in CASES:
            run(*case)
    # dK/dV accumulators flushed to their float32 partial sums every Q tile or two.
    schedule.DKDV_FLUSH_ROWS = 128
    for portable in ("1", "0"):
        os.environ["CUFLASH_PORTABLE"] = portable
        run(1, 300, 200, 4, 1, 128, "float16", True)
        run(1, 300, 200, 4, 2, 64, "bfloat16", False)
    schedule.DKDV_FLUSH_ROWS = 65536
    # The sm_90a backward with converter CTAs: 8 dK/dV CTAs on a pretended 4-SM GPU.
    backward_launch.sm_count = lambda device_id: 4
    run(1, 256, 512, 4, 2, 128, "bfloat16", False)
    run(1, 256, 512, 4, 2, 64, "float16", True)
    print("corpus done")
