"""Forward launcher: the ForwardPlan of a problem (its kernel variant, compiled kernel, grid and
the kernel parameters fixed by shapes and strides), and the launch of a plan on a call's arrays.

A plan depends on no pointer, so a caller may keep it for every call of the same signature
(shapes, strides, dtype, device, flags). It holds its kernel's parameter buffer, built once: a
call writes its pointers (and dropout words) in place, the tensor maps of the pointers that
changed since the plan's last call, and launches.
"""
import threading
from dataclasses import dataclass

from . import compile as compile_
from . import dropout, params, plan, schedule, tma
from .device import check_arch, hopper_runs, sm_count, smem_limit
from .launch import KernelLaunch, allow_dynamic_smem

LOG2E = 1.4426950408889634
INT32_MAX = 2**31 - 1


@dataclass(frozen=True, eq=False)
class ForwardPlan:
    variant: plan.FwdVariant
    launcher: object   # launch.KernelLaunch (kernel, grid, block, shared memory) with FwdParams (and TmaMaps)
                       # filled but for _POINTERS, _RNG and the maps
    maps: tuple        # sm_90a: (shape, strides, dtype, box rows) of the tensor maps of q, k, v, o; else ()
    mapped: list       # the pointers whose maps the buffer holds (q, k, v, o), or 0s


_POINTERS_AT, _POINTERS = params.FWD.run(("q", "k", "v", "o", "lse", "unit_counter"))
_RNG_AT, _RNG = params.FWD.run(("seed_lo", "seed_hi", "offset"))
_MAP_BYTES = 128


def score_scales(softmax_scale, softcap):
    """The kernels' scale_log2 and softcap_scale: without a cap the softmax runs on S * scale
    in log2 units; with one (softcap > 0) on t = tanh(S * scale / softcap), with softcap * log2(e)
    as t's scale (cuda_src/online_softmax.cuh: cap_scores)."""
    if softcap:
        return {"scale_log2": softcap * LOG2E, "softcap_scale": softmax_scale / softcap}
    return {"scale_log2": softmax_scale * LOG2E, "softcap_scale": 0.0}


def plan_forward(q, k, v, o, softmax_scale, causal, dropout_p, device_id, tile=None, softcap=0.0):
    """The ForwardPlan of attention over arrays described by q, k, v, o (interop.ArrayInfo of
    validated, 16-byte aligned, non-empty arrays: q, o (batch, seqlen_q, nheads, d); k, v (batch,
    seqlen_k, nheads_k, d)) on device_id; pointers are not read."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    variant = plan.forward_variant(q.dtype, head_dim, causal, tile, smem_limit(device_id), dropout=dropout_p > 0,
                                   hopper=hopper_runs(device_id, q, k, v, o), softcap=softcap > 0)
    check_arch(variant, device_id)
    kernel, smem = _prepare(variant, device_id)
    m_blocks = plan.num_m_blocks(seqlen_q, variant.tile)
    tiles = batch * nheads * m_blocks
    if tiles > INT32_MAX or max(seqlen_q, seqlen_k) > INT32_MAX:
        raise ValueError(f"problem too large for one launch: {tiles} tiles, seqlens {seqlen_q} and {seqlen_k}")
    static = {**params.strides("q", q), **params.strides("k", k), **params.strides("v", v), **params.strides("o", o),
              "seqlen_q": seqlen_q, "seqlen_k": seqlen_k, "num_heads": nheads, "num_heads_k": nheads_k,
              "head_dim": head_dim, "num_m_blocks": m_blocks, **score_scales(softmax_scale, softcap),
              **dropout.static_kernel_args(dropout_p)}
    grid, maps = tiles, ()
    if plan.is_hopper(variant):
        # One persistent CTA per SM walks the tiles, claiming units of them from a counter that
        # starts at zero; q, k, v and o travel as TMA tensor maps (O: one warpgroup's rows per box).
        tail_heads = schedule.persistent_tail_heads(batch * nheads, m_blocks, sm_count(device_id), causal)
        grid = min(schedule.persistent_units(batch * nheads, m_blocks, causal, tail_heads), sm_count(device_id))
        static.update(num_bh=batch * nheads, tail_heads=tail_heads)
        rows = (variant.tile.block_m, variant.tile.block_n, variant.tile.block_n, 64)
        maps = tuple((a.shape, a.strides, a.dtype, r) for a, r in zip((q, k, v, o), rows))
    else:
        static.update(num_bh=0, tail_heads=0)
    fwd = params.FWD.pack({**static, "q": 0, "k": 0, "v": 0, "o": 0, "lse": 0, "unit_counter": 0, "seed_lo": 0,
                           "seed_hi": 0, "offset": 0})
    parts = (fwd, bytes(_MAP_BYTES * len(maps))) if maps else (fwd,)
    launcher = KernelLaunch(kernel, grid, variant.tile.threads, smem, *parts)
    return ForwardPlan(variant=variant, launcher=launcher, maps=maps, mapped=[0] * len(maps))


def launch_forward(fplan, q, k, v, o, lse, stream, seed=0, offset=0, counter=0):
    """Launch a ForwardPlan on `stream` (a raw CUDA stream) of CuPy's current device: q, k, v,
    o, lse are the pointers of arrays of the plan's shapes and strides (lse contiguous float32
    (batch, nheads, seqlen_q)); seed and offset pick the dropout mask; `counter` is a zeroed
    int32 in device memory, which the sm_90a kernel needs (ordered before it on `stream`; the
    kernel leaves it at zero)."""
    launcher = fplan.launcher
    buffer = launcher.buffer
    with launcher.lock:
        _POINTERS.pack_into(buffer, _POINTERS_AT, q, k, v, o, lse, counter)
        if fplan.variant.dropout:
            _RNG.pack_into(buffer, _RNG_AT, *dropout.rng_words(seed, offset))
        if fplan.maps:
            at, mapped = launcher.offsets[1], fplan.mapped
            for i, ptr in enumerate((q, k, v, o)):
                if mapped[i] != ptr:
                    start = at + _MAP_BYTES * i
                    buffer[start:start + _MAP_BYTES] = tma.encode(ptr, *fplan.maps[i])
                    mapped[i] = ptr
        launcher(stream)


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
