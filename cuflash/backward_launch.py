"""Backward launcher: picks the variant, allocates D, lse2 and the float32 dQ accumulator (all
O(seqlen); the accumulator zeroed by a memset), and launches preprocess -> dK/dV (+ dQ atomics)
-> dQ conversion, or, when deterministic, preprocess -> dK/dV -> a separate dQ pass with no
atomics. On compute capability 9.0 the dK/dV kernel of the non-deterministic path is the sm_90a
one (d 64, 128 and 256); when its grid is more than one wave, one CTA per SM more in it converts the
dQ tiles of the heads already done, and a last pass converts the tiles those CTAs left."""
import dataclasses
import math
import threading

from . import compile as compile_
from . import dropout, params, plan, schedule, tma
from .device import check_arch, hopper_runs, sm_count, smem_limit
from .forward_launch import INT32_MAX, score_scales
from .launch import allow_dynamic_smem, launch

ROWS_PER_BLOCK = 16  # preprocess and convert_dq: 4 warps of 4 rows per block (bwd_passes.cuh)
CONVERT_TILES_PER_BLOCK = 8  # flash_bwd_convert_dq_tiles: dQ tiles (converted or not) per block


def launch_backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, deterministic, empty, stream, tile=None,
                    dropout_p=0.0, seed=0, offset=0, softcap=0.0):
    """dQ, dK, dV of attention (with the forward's dropout_p, seed, offset and softcap) on CuPy's
    current device and on `stream` (a raw CUDA stream).

    Arguments are interop.ArrayInfo descriptions of validated, 16-byte aligned, non-empty arrays:
    dout, q, out, dq (batch, seqlen_q, nheads, d); k, v, dk, dv (batch, seqlen_k, nheads_k, d);
    lse contiguous float32 (batch, nheads, seqlen_q). `empty(shape, dtype)` allocates the
    statistics buffers in the caller's framework and returns (array, info).
    """
    import cupy

    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    device_id = cupy.cuda.get_device_id()
    variant = plan.backward_variant(q.dtype, head_dim, causal, deterministic, tile, smem_limit(device_id),
                                    dropout=dropout_p > 0, hopper=hopper_runs(device_id, q, k, v, dout), softcap=softcap > 0)
    flush_every = schedule.dkdv_flush_every(variant.tile, nheads // nheads_k, seqlen_q)
    if flush_every:
        variant = dataclasses.replace(variant, flush=True)
    check_arch(variant, device_id)
    kernels = _prepare(variant, device_id)
    rows = batch * nheads * seqlen_q
    n_blocks = -(-seqlen_k // variant.tile.block_n)
    m_blocks = -(-seqlen_q // variant.tile.block_m)
    hopper = plan.is_hopper(variant)
    num_tiles, dkdv_ctas = batch * nheads * m_blocks, batch * nheads_k * n_blocks
    converters = schedule.dq_converters(dkdv_ctas, num_tiles, sm_count(device_id)) if hopper else 0
    if max(rows, num_tiles, dkdv_ctas + converters) > INT32_MAX:
        raise ValueError(f"problem too large for one launch: {rows} query rows")
    # lse2 and D rows are padded to 4 floats so that each (batch, head) row is 16-byte aligned.
    # `keep` holds the buffers until the kernels are queued; the allocators reuse memory in
    # stream order after that.
    seqlen_q_pad = -(-seqlen_q // 4) * 4
    keep = [empty((batch, nheads, seqlen_q_pad), "float32") for _ in range(2)]
    lse2, dsum = (info.data_ptr for _, info in keep)
    dq_accum = dq_done = dq_converted = 0
    if not deterministic:
        floats = math.prod(schedule.dq_accum_shape(variant, batch, nheads, seqlen_q, head_dim))
        words = schedule.dq_sync_words(variant, batch, nheads, nheads_k, seqlen_q)
        keep.append(empty((floats + words,), "float32"))
        dq_accum = keep[-1][1].data_ptr
        dq_done = dq_accum + 4 * floats
        dq_converted = dq_done + 4 * schedule.dq_sync_counters(batch, nheads_k)
        cupy.cuda.runtime.memsetAsync(dq_accum, 0, 4 * (floats + words), stream)
    dkdv_partial = 0
    if flush_every:
        keep.append(empty((schedule.dkdv_partial_floats(variant.tile, variant.head_dim, dkdv_ctas),), "float32"))
        dkdv_partial = keep[-1][1].data_ptr

    # Dropout's 1 / (1 - p) is folded into the scales of dV (rp_dropout) and of dK and dQ
    # (ds_scale); the preprocess scales D by 1 - p (see flash_bwd.cu).
    seed_lo, seed_hi, offset = dropout.rng_words(seed, offset)
    packed = params.BWD.pack({
        "q": q.data_ptr, "k": k.data_ptr, "v": v.data_ptr, "o": out.data_ptr, "dout": dout.data_ptr,
        "dq": dq.data_ptr, "dk": dk.data_ptr, "dv": dv.data_ptr, "lse": lse.data_ptr, "lse2": lse2, "dsum": dsum,
        "dq_accum": dq_accum, "dq_done": dq_done, "dq_converted": dq_converted, "dkdv_partial": dkdv_partial,
        **params.strides("q", q), **params.strides("k", k), **params.strides("v", v), **params.strides("o", out),
        **params.strides("do", dout), **params.strides("dq", dq), **params.strides("dk", dk), **params.strides("dv", dv),
        "seqlen_q": seqlen_q, "seqlen_q_pad": seqlen_q_pad, "seqlen_k": seqlen_k, "num_heads": nheads,
        "num_heads_k": nheads_k, "head_dim": head_dim, "num_m_blocks": m_blocks, "num_n_blocks": n_blocks,
        "rows_total": rows, "num_dq_tiles": num_tiles, "num_converters": converters, "flush_every": flush_every,
        **score_scales(softmax_scale, softcap), "ds_scale": softmax_scale / (1.0 - dropout_p), "d_scale": 1.0 - dropout_p,
        "seed_lo": seed_lo, "seed_hi": seed_hi, "offset": offset, **dropout.static_kernel_args(dropout_p)})
    row_blocks = -(-rows // ROWS_PER_BLOCK)
    function, _ = kernels["flash_bwd_preprocess"]
    launch(function, row_blocks, 128, 0, stream, packed)
    if hopper:
        function, smem = kernels["flash_bwd_dkdv_sm90"]
        tile = variant.tile
        maps = b"".join(tma.tensor_map(a, rows) for a, rows in ((q, tile.block_m), (k, tile.block_n), (v, tile.block_n),
                                                                (dout, tile.block_m)))
        launch(function, dkdv_ctas + converters, tile.threads, smem, stream, packed, maps)
    else:
        function, smem = kernels["flash_bwd_dkdv"]
        launch(function, dkdv_ctas, variant.tile.threads, smem, stream, packed)
    if deterministic:
        function, smem = kernels["flash_bwd_dq"]
        launch(function, num_tiles, variant.tile.dq_threads, smem, stream, packed)
    elif hopper:
        function, _ = kernels["flash_bwd_convert_dq_tiles"]
        launch(function, -(-num_tiles // CONVERT_TILES_PER_BLOCK), 128, 0, stream, packed)
    else:
        function, _ = kernels["flash_bwd_convert_dq"]
        launch(function, row_blocks, 128, 0, stream, packed)


_prepared = {}
_prepare_lock = threading.Lock()


def _prepare(variant, device_id):
    """{kernel name: (function, shared-memory bytes)} of a backward variant, compiled once."""
    key = (device_id, variant)
    prepared = _prepared.get(key)
    if prepared is not None:
        return prepared
    if plan.is_hopper(variant):
        smem = {"flash_bwd_dkdv_sm90": plan.backward_smem_bytes(variant.head_dim, variant.tile)}
    else:
        smem = {"flash_bwd_dkdv": plan.backward_smem_bytes(variant.head_dim, variant.tile),
                "flash_bwd_dq": plan.backward_dq_smem_bytes(variant.head_dim, variant.tile)}
    limit = smem_limit(device_id)
    for name, size in smem.items():
        if size > limit:
            raise ValueError(f"backward tile {variant.tile} needs {size} bytes of shared memory in {name} "
                             f"at head dim {variant.head_dim}; device {device_id} allows {limit}")
    program = compile_.backward_program(variant)
    prepared = {}
    with _prepare_lock:
        for name in program.names:
            function = compile_.get_function(program, device_id, name)
            size = smem.get(name, 0)
            if size:
                allow_dynamic_smem(function, size)
            prepared[name] = (function, size)
        _prepared[key] = prepared
    return prepared
