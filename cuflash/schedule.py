"""The kernels' work schedules and scratch buffers as the host computes them: the persistent
forward's units and their order (the CPU mirror of cuda_src/tile_scheduler.cuh), the causal row
shift of the sm_90a forward, the backward's float32 dQ accumulator and its synchronisation words,
its converter CTAs, and the flushes of dK/dV partial sums. plan.py picks the variant; these say
how a launch of it walks its work."""
from .plan import is_hopper, num_m_blocks


TAIL_ROUNDS = 2  # the causal tail's single m blocks, in units per CTA


def persistent_tail_heads(num_bh, num_m_blocks, grid, causal):
    """Heads whose m blocks the persistent forward runs one by one, longest first, at the end
    (cuda_src/tile_scheduler.cuh): under causal enough for TAIL_ROUNDS per CTA, so that the CTAs
    end within a short tile of each other. None without causal, where every tile costs the same,
    nor where the grid takes every pair at once, all of the same cost."""
    if not causal or persistent_units(num_bh, num_m_blocks, causal) <= grid:
        return 0
    return min(num_bh, -(-TAIL_ROUNDS * grid // num_m_blocks))


def persistent_units(num_bh, num_m_blocks, causal, tail_heads=0):
    """Work units of the persistent forward: pairs of m blocks under causal, single ones
    otherwise and in the tail. No more CTAs than units are launched."""
    return (num_bh - tail_heads) * ((num_m_blocks + 1) // 2 if causal else num_m_blocks) + tail_heads * num_m_blocks


def causal_row_shift(seqlen_q, block_m):
    """Rows by which the causal sm_90a forward with a staged O moves its m blocks up, so that they
    end at seqlen_q to within 64 rows and the partial block is the first, which sees the fewest
    keys (cuda_src/flash_fwd_sm90.cu, kRowsEndAligned): m block j holds rows
    [j * block_m - shift, (j + 1) * block_m - shift)."""
    return (-(-seqlen_q // block_m) * block_m - seqlen_q) // 64 * 64


def persistent_order(num_m_blocks, num_bh, tail_heads, causal):
    """The units of the persistent forward in the order the CTAs claim them, each a list of
    (bh, m_block) tiles in the order it runs them: the CPU mirror of TileSchedule
    (cuda_src/tile_scheduler.cuh)."""
    units = []
    for bh in range(num_bh - tail_heads):
        if causal:
            units += [list(dict.fromkeys([(bh, num_m_blocks - 1 - p), (bh, p)])) for p in range((num_m_blocks + 1) // 2)]
        else:
            units += [[(bh, p)] for p in range(num_m_blocks)]
    tail = range(num_bh - tail_heads, num_bh)
    units += [[(bh, m_block)] for m_block in reversed(range(num_m_blocks)) for bh in tail]
    return units


def dq_accum_shape(variant, batch, nheads, seqlen_q, head_dim):
    """Shape of the float32 dQ accumulator of a non-deterministic backward: (batch, nheads,
    seqlen_q, head_dim) row-major for the portable kernel; for the sm_90a one, whole
    block_m x bucket tiles (cuda_src/bwd_passes.cuh, DqTile), so that it adds each tile with
    bulk reductions and never needs a bounds check."""
    if is_hopper(variant):
        block_m = variant.tile.block_m
        return (batch, nheads, -(-seqlen_q // block_m) * block_m, variant.head_dim)
    return (batch, nheads, seqlen_q, head_dim)


# Query rows (times the query heads of a GQA group) whose products the tensor cores add into a
# dK/dV accumulator before the CUDA cores take the sum over (cuda_src/dkdv_partial.cuh). At
# 4 x 2^20 rows per key (2^20 queries, GQA 16/4, fp16, d64) unflushed accumulators gave dK and dV
# 6.7x and 10.5x the error of the same computation in fp16 (bench/NOTES.md, v2.19); the error
# of an accumulator grows about linearly with its rows, and 65536 rows keep it well inside the
# 2x rule, while ordinary training shapes (e.g. 8k queries x GQA 8) never flush.
DKDV_FLUSH_ROWS = 65536


def dkdv_flush_every(tile, group, seqlen_q):
    """Q tiles between the flushes of a dK/dV CTA's accumulators, or 0 where no CTA sees more
    than DKDV_FLUSH_ROWS rows (group query heads x seqlen_q rows) and none flushes. Flushing is
    compiled only into the variants with flush=True, which the launcher picks when this is not
    0, so that the kernels of every other shape carry no trace of it."""
    every = max(1, DKDV_FLUSH_ROWS // tile.block_m)
    return every if group * num_m_blocks(seqlen_q, tile) > every else 0


def dkdv_partial_floats(tile, head_dim_bucket, dkdv_ctas):
    """float32 words of the flushed partial sums: dK and dV of each dK/dV CTA's (Bc, d) block."""
    return dkdv_ctas * 2 * tile.block_n * head_dim_bucket


def dq_converters(dkdv_ctas, num_tiles, sms):
    """Converter CTAs appended to the sm_90a dK/dV grid (cuda_src/flash_bwd_sm90.cu): one per SM,
    at most one per dQ tile, and none when the dK/dV CTAs fit one wave, where the converters
    would start beside them and find no head done."""
    return min(sms, num_tiles) if dkdv_ctas > sms else 0


def dq_sync_counters(batch, nheads_k):
    """The sm_90a backward's counters of finished dK/dV CTAs, one per (batch, kv head)."""
    return batch * nheads_k


def dq_sync_words(variant, batch, nheads, nheads_k, seqlen_q):
    """int32 words after the dQ accumulator, zeroed with it: for the sm_90a backward its counters,
    then a flag per dQ tile (DqSync in cuda_src/flash_bwd_sm90.cu); none for the portable one."""
    if not is_hopper(variant):
        return 0
    return dq_sync_counters(batch, nheads_k) + batch * nheads * num_m_blocks(seqlen_q, variant.tile)
