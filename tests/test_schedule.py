"""CPU: the kernels' work schedules and scratch buffers (cuflash/schedule.py): the persistent
forward's units and their order, the causal row shift, the dQ accumulator, its converters and
synchronisation words, and the dK/dV flushes."""
import heapq
import itertools

import pytest
from hypothesis import given, strategies as st

from cuflash import plan, schedule

H100_SMEM_OPTIN = plan.SMEM_OPTIN_BY_CC[90]


def claimed_makespan(costs, grid, lead):
    """When the last of `grid` CTAs finishes units of these costs (in K/V tiles), claimed as the
    kernel does: CTA c starts with unit c and claims the next unclaimed unit `lead` tiles before
    it finishes its current one (when its producer has issued the last copy of it)."""
    claims = [(max(0, costs[cta] - lead), cta, costs[cta]) for cta in range(min(grid, len(costs)))]
    heapq.heapify(claims)  # (when the CTA claims, cta, when its current unit ends)
    end, unit = 0, len(claims)
    while claims:
        claim, cta, finish = heapq.heappop(claims)
        end = max(end, finish)
        if unit < len(costs):
            finish += costs[unit]
            unit += 1
            heapq.heappush(claims, (max(claim, finish - lead), cta, finish))
    return end


@given(num_m_blocks=st.integers(1, 40), num_bh=st.integers(1, 40), grid=st.integers(1, 140), causal=st.booleans())
def test_persistent_order_covers_every_tile_once(num_m_blocks, num_bh, grid, causal):
    tail_heads = schedule.persistent_tail_heads(num_bh, num_m_blocks, grid, causal)
    units = schedule.persistent_order(num_m_blocks, num_bh, tail_heads, causal)
    assert len(units) == schedule.persistent_units(num_bh, num_m_blocks, causal, tail_heads)
    tiles = [tile for unit in units for tile in unit]
    assert sorted(tiles) == sorted(itertools.product(range(num_bh), range(num_m_blocks)))
    for unit in units:  # a causal pair runs its longer m block first
        assert [m for _, m in unit] == sorted((m for _, m in unit), reverse=True)


@pytest.mark.parametrize("seqlen, block_m, block_n, num_bh", [
    (2048, 192, 128, 256), (4096, 192, 128, 128), (16384, 192, 128, 32),   # d64, hidden 2048
    (2048, 128, 128, 128), (4096, 128, 128, 64), (16384, 128, 128, 16),    # d128
    (1024, 128, 128, 140), (1000, 128, 128, 3), (333, 64, 128, 40)])
def test_persistent_causal_claims_keep_the_grid_busy(seqlen, block_m, block_n, num_bh):
    """Under causal (seqlen_q = seqlen_k) an m block costs its K/V tiles plus one for its Q load
    and epilogue; its rows end at seqlen_q (schedule.causal_row_shift). With 132 CTAs claiming units
    3 tiles ahead (the K/V ring's depth), the kernel takes at most 1/0.97 of its lower bound (the
    larger of a CTA's fair share and the longest unit). The static round robin of pairs before it
    took 1/0.86 in the first case, 1/0.85 in the seventh."""
    grid = 132
    num_m_blocks = -(-seqlen // block_m)
    tail_heads = schedule.persistent_tail_heads(num_bh, num_m_blocks, grid, True)
    units = schedule.persistent_order(num_m_blocks, num_bh, tail_heads, True)
    shift = schedule.causal_row_shift(seqlen, block_m)
    cost = lambda m: -(-min(seqlen, (m + 1) * block_m - shift) // block_n) + 1
    costs = [sum(cost(m) for _, m in unit) for unit in units]
    bound = max(sum(costs) / min(grid, len(costs)), max(costs))
    assert bound / claimed_makespan(costs, grid, lead=3) >= 0.97


@pytest.mark.parametrize("head_dim, seqlen_q", [(64, 1), (64, 128), (40, 129), (128, 1000), (120, 64), (256, 33), (240, 96)])
def test_dq_accum_shape(head_dim, seqlen_q):
    """The sm_90a backward's accumulator holds whole (block_m, bucket) tiles; the portable one
    is exactly (seqlen_q, head_dim) per head."""
    hopper = plan.backward_variant("bfloat16", head_dim, False, False, smem_limit=H100_SMEM_OPTIN, hopper=True)
    portable = plan.backward_variant("bfloat16", head_dim, False, False, smem_limit=H100_SMEM_OPTIN)
    assert plan.is_hopper(hopper) and not plan.is_hopper(portable)
    block_m = hopper.tile.block_m
    assert schedule.dq_accum_shape(hopper, 2, 3, seqlen_q, head_dim) == (2, 3, -(-seqlen_q // block_m) * block_m,
                                                                      hopper.head_dim)
    assert schedule.dq_accum_shape(portable, 2, 3, seqlen_q, head_dim) == (2, 3, seqlen_q, head_dim)
    # After the sm_90a accumulator: a finished-CTA counter per (batch, kv head), a flag per tile.
    assert schedule.dq_sync_words(hopper, 2, 6, 3, seqlen_q) == 2 * 3 + 2 * 6 * -(-seqlen_q // block_m)
    assert schedule.dq_sync_words(portable, 2, 6, 3, seqlen_q) == 0


def test_dq_converters():
    """One converter CTA per SM after the dK/dV CTAs, never more than the dQ tiles, and none
    when the dK/dV CTAs fit one wave."""
    assert schedule.dq_converters(2048, 4096, 132) == 132
    assert schedule.dq_converters(133, 40, 132) == 40
    assert schedule.dq_converters(132, 4096, 132) == 0
    assert schedule.dq_converters(16, 108, 3) == 3
    assert schedule.dq_converters(16, 108, 0) == 0


def test_dkdv_flushes_only_past_the_row_budget():
    """A dK/dV CTA flushes its accumulators only when its keys see more than DKDV_FLUSH_ROWS rows
    (query heads of the group x queries), and then every DKDV_FLUSH_ROWS rows; the partial sums
    hold dK and dV of each CTA's (Bc, d) block in float32."""
    tile = plan.HOPPER_BWD_TILES[128]  # Br = 64
    rows = schedule.DKDV_FLUSH_ROWS
    assert schedule.dkdv_flush_every(tile, 8, 8192) == 0  # 8k queries x GQA 8: ordinary training never flushes
    assert schedule.dkdv_flush_every(tile, 1, rows) == 0
    assert schedule.dkdv_flush_every(tile, 1, rows + 1) == rows // 64
    assert schedule.dkdv_flush_every(tile, 4, 2**20) == rows // 64
    assert schedule.dkdv_flush_every(plan.BWD_TILES[64], 16, 2**20) == rows // 128
    assert schedule.dkdv_partial_floats(tile, 128, 10) == 10 * 2 * 128 * 128
