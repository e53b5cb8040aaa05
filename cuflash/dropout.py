"""Dropout's random state: (seed, offset) pairs, where they come from, and how kernels get them.

The keep mask is a pure function of (seed, offset, batch * nheads + head, row, col) (Philox,
specified in cuflash/reference.py, drawn in cuda_src/philox.cuh), so the backward regenerates the
forward's mask from the same (seed, offset) without storing it. Sources of (seed, offset):
- an explicit seed (forward/backward take `seed` and `offset`; flash_attn_func takes `seed`);
- torch callers without a seed: torch's CUDA generator of the device, whose offset advances by
  OFFSET_STEP per call, so torch.manual_seed reproduces a run and successive calls differ;
- CuPy callers without a seed: a fresh random seed per call.
"""
import os
import threading

from .reference import dropout_threshold, philox_key

OFFSET_STEP = 4  # torch's own Philox consumers advance the generator's offset in multiples of 4
_torch_lock = threading.Lock()


def kernel_args(dropout_p, seed, offset):
    """(seed_lo, seed_hi, offset, keep_threshold, 1 / (1 - p)): the kernels' dropout arguments.
    Without dropout the RNG words are unused and the scale is 1."""
    if dropout_p == 0.0:
        return 0, 0, 0, 0, 1.0
    seed_lo, seed_hi = philox_key(seed)
    return seed_lo, seed_hi, int(offset) & 0xFFFFFFFF, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


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
    from .launch import launch

    batch, nheads, seqlen_q, seqlen_k = mask.shape
    calls = batch * nheads * seqlen_q * -(-seqlen_k // 4)
    seed_lo, seed_hi, offset, threshold, _ = kernel_args(dropout_p, seed, offset)
    function = compile_.get_function(compile_.DROPOUT_MASK_PROGRAM, cupy.cuda.get_device_id())
    launch(function, -(-calls // 256), 256, 0, stream, "Q4I2iq", mask.data_ptr, seed_lo, seed_hi, offset,
           threshold, seqlen_q, seqlen_k, calls)
