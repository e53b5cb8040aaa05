"""Dropout's random state: (seed, offset) pairs, where they come from, and how kernels get them.

The keep mask is a pure function of (seed, offset, batch * nheads + head, row, col) (Philox,
specified in cuflash/reference.py, drawn in cuda_src/philox.cuh), so the backward regenerates the
forward's mask from the same (seed, offset) without storing it. Sources of (seed, offset):
- an explicit seed (forward/backward take `seed` and `offset`; flash_attn_func takes `seed`);
- torch callers without a seed: torch's CUDA generator of the device, whose offset advances by
  OFFSET_STEP per call, so torch.manual_seed reproduces a run and successive calls differ;
- CuPy callers without a seed: a fresh random seed per call.
"""
import math
import os
import threading

OFFSET_STEP = 4  # torch's own Philox consumers advance the generator's offset in multiples of 4
_torch_lock = threading.Lock()
_MASK32 = 0xFFFFFFFF


def philox_key(seed):
    """The Philox key of a 64-bit seed: (low 32 bits, high 32 bits). Python ints outside
    [0, 2^64) are taken modulo 2^64."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & _MASK32, seed >> 32


def dropout_threshold(dropout_p):
    """The uint32 t with keep iff word >= t: t = min(2^32 - 1, floor(p * 2^32)).

    For a uniform 32-bit word, P(keep) = (2^32 - t) / 2^32, and p * 2^32 - 1 < t <= p * 2^32, so
    1 - p <= P(keep) < 1 - p + 2^-32: the keep rate is 1 - p up to 2^-32 (exactly 1 - p when
    p * 2^32 is an integer, e.g. p = 0 keeps everything and p = 0.5 half the words). p * 2^32 is
    exact in float64 (a power-of-two scaling) and below 2^32 for every float64 p < 1, so the min
    only acts at p = 1, where t = 2^32 does not fit a uint32 and the keep rate is 2^-32, not 0
    (attention rejects p = 1 anyway: it divides by 1 - p). The launcher computes t here, on the
    host from the Python float, and hands the kernel the uint32 (never p rounded to float32)."""
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {dropout_p}")
    return min(2**32 - 1, math.floor(dropout_p * 2**32))


def static_kernel_args(dropout_p):
    """The dropout fields of the kernels' parameters that depend on p alone: the keep threshold
    and 1 / (1 - p) (1 without dropout)."""
    return {"threshold": dropout_threshold(dropout_p), "rp_dropout": 1.0 / (1.0 - dropout_p)}


def rng_words(seed, offset):
    """(seed_lo, seed_hi, offset): the Philox key of `seed` and the counter word of `offset` (the
    kernels use it modulo 2^32)."""
    seed_lo, seed_hi = philox_key(seed)
    return seed_lo, seed_hi, int(offset) & _MASK32


def torch_seed_offset(device):
    """(seed, offset) drawn from torch's default CUDA generator of `device`, advancing it."""
    import torch

    torch.cuda.init()  # default_generators is empty until torch initialises CUDA
    generator = torch.cuda.default_generators[device]
    with _torch_lock:
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + OFFSET_STEP)
    return seed, offset


def random_seed():
    """A fresh 64-bit seed, for callers that gave none and have no generator of their own."""
    return int.from_bytes(os.urandom(8), "little")


def launch_dropout_mask(mask, dropout_p, seed, offset, stream):
    """Fill `mask` (interop.ArrayInfo of a contiguous bool (batch, nheads, seqlen_q, seqlen_k)
    array, non-empty) with the keep bits the attention kernels draw, on `stream`."""
    import cupy

    from . import compile as compile_
    from . import params
    from .launch import launch

    batch, nheads, seqlen_q, seqlen_k = mask.shape
    calls = batch * nheads * seqlen_q * -(-seqlen_k // 4)
    seed_lo, seed_hi, offset = rng_words(seed, offset)
    packed = params.MASK.pack({"mask": mask.data_ptr, "calls": calls, "seqlen_q": seqlen_q, "seqlen_k": seqlen_k,
                               "seed_lo": seed_lo, "seed_hi": seed_hi, "offset": offset,
                               "threshold": dropout_threshold(dropout_p)})
    function = compile_.get_function(compile_.DROPOUT_MASK_PROGRAM, cupy.cuda.get_device_id())
    launch(function, -(-calls // 256), 256, 0, stream, packed)
