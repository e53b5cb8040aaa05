"""Forward launcher: picks the kernel variant and tiles, checks shared memory, launches the grid."""
import threading

from . import compile as compile_
from . import dropout, plan, tma
from .device import check_arch, hopper_runs, sm_count, smem_limit
from .launch import allow_dynamic_smem, launch

LOG2E = 1.4426950408889634
INT32_MAX = 2**31 - 1


def launch_forward(q, k, v, o, lse, softmax_scale, causal, empty, stream, tile=None, dropout_p=0.0, seed=0, offset=0):
    """O and LSE of softmax(Q K^T * scale [+ causal mask]) V, with P dropped out at rate
    dropout_p by the keep bits of (seed, offset), on CuPy's current device and on `stream` (a raw
    CUDA stream).

    Arguments are interop.ArrayInfo descriptions (pointer, shape, element strides, dtype) of
    validated, 16-byte aligned, non-empty arrays: q, o (batch, seqlen_q, nheads, d); k, v
    (batch, seqlen_k, nheads_k, d); lse contiguous float32 (batch, nheads, seqlen_q).
    `empty(shape, dtype)` allocates scratch memory in the caller's framework and returns
    (array, info).
    """
    import cupy

    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    device_id = cupy.cuda.get_device_id()
    variant = plan.forward_variant(q.dtype, head_dim, causal, tile, smem_limit(device_id), dropout=dropout_p > 0,
                                   hopper=hopper_runs(device_id, q, k, v, o))
    check_arch(variant, device_id)
    kernel, smem = _prepare(variant, device_id)
    m_blocks = plan.num_m_blocks(seqlen_q, variant.tile)
    tiles = batch * nheads * m_blocks
    if tiles > INT32_MAX or max(seqlen_q, seqlen_k) > INT32_MAX:
        raise ValueError(f"problem too large for one launch: {tiles} tiles, seqlens {seqlen_q} and {seqlen_k}")
    scale_log2 = softmax_scale * LOG2E
    rng = dropout.kernel_args(dropout_p, seed, offset)
    if plan.is_hopper(variant):
        # q, k, v and o travel as TMA tensor maps (tma.encodable holds unless a HopperFwdTile forced it);
        # one persistent CTA per SM walks the tiles, claiming units of them from a counter that
        # starts at zero. `counter` holds the scratch buffer until the kernel is queued; the
        # allocators reuse memory in stream order after that.
        maps = (tma.tensor_map(q, variant.tile.block_m), tma.tensor_map(k, variant.tile.block_n),
                tma.tensor_map(v, variant.tile.block_n), tma.tensor_map(o, 64))  # O: one warpgroup's rows
        tail_heads = plan.persistent_tail_heads(batch * nheads, m_blocks, sm_count(device_id), causal)
        grid = min(plan.persistent_units(batch * nheads, m_blocks, causal, tail_heads), sm_count(device_id))
        counter, counter_info = empty((1,), "int32")
        cupy.cuda.runtime.memsetAsync(counter_info.data_ptr, 0, 4, stream)
        launch(kernel, grid, variant.tile.threads, smem, stream, "128s128s128s128s2Q3q8iQf4If",
               *maps, o.data_ptr, lse.data_ptr, *(o.strides[axis] for axis in (0, 1, 2)),
               seqlen_q, seqlen_k, nheads, nheads_k, head_dim, m_blocks, batch * nheads, tail_heads,
               counter_info.data_ptr, scale_log2, *rng)
    else:
        launch(kernel, tiles, variant.tile.threads, smem, stream, "5Q12q6if4If",
               q.data_ptr, k.data_ptr, v.data_ptr, o.data_ptr, lse.data_ptr,
               *(a.strides[axis] for a in (q, k, v, o) for axis in (0, 1, 2)),
               seqlen_q, seqlen_k, nheads, nheads_k, head_dim, m_blocks, scale_log2, *rng)


_prepared = {}
_prepare_lock = threading.Lock()


def _prepare(variant, device_id):
    """(kernel, shared-memory bytes) of a variant on a device: compiled, its shared-memory limit
    raised, and remembered, so a call pays one dictionary lookup."""
    key = (device_id, variant)
    prepared = _prepared.get(key)
    if prepared is not None:
        return prepared
    smem = plan.forward_smem_bytes(variant.head_dim, variant.tile)
    if smem > smem_limit(device_id):
        raise ValueError(f"tile {variant.tile} needs {smem} bytes of shared memory at head dim "
                         f"{variant.head_dim}; device {device_id} allows {smem_limit(device_id)}")
    kernel = compile_.get_function(compile_.forward_program(variant), device_id)
    with _prepare_lock:
        allow_dynamic_smem(kernel, smem)
        _prepared[key] = (kernel, smem)
    return kernel, smem
