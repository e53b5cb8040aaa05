// The converter CTAs of the sm_90a dK/dV grid.
//
// The grid's last num_converters CTAs convert dQ (convert_dq_of_done_heads): the block
// scheduler reaches them once every dK/dV CTA has an SM, i.e. in the grid's last wave, whose
// idle SMs they fill, converting the tiles of the heads already done while the last dK/dV CTAs
// run. Each dK/dV CTA counts itself on its kv head's `done` counter once its reductions have
// landed. A converter waits for nothing: flash_bwd_convert_dq_tiles, after the kernel, converts
// the tiles of the heads that were not done yet (spinning converters would also take power from
// the dK/dV CTAs, which run at the GPU's power limit).
#pragma once
#include "bwd_sm90_cta.cuh"

constexpr int kConvSlots = 5;   // dQ tiles (32 KB) in flight per converter CTA
constexpr int kConvGroup = 8;   // consecutive dQ tiles per converter turn: mostly one kv head
// Shared memory of a converter CTA, in the dK/dV CTA's: a ring of dQ tiles and the tile in each slot.
struct ConverterStorage {
    float slots[kConvSlots][DqTile::kFloats];
    int slot_tile[kConvSlots];
    mbar_t full[kConvSlots], empty[kConvSlots];
};
static_assert(sizeof(ConverterStorage) <= sizeof(SharedStorage), "a converter's ring fits a dK/dV CTA's shared memory");

// Converter CTA `converter` of num_converters: the dQ tiles of turns converter + k *
// num_converters (kConvGroup tiles each) whose kv heads are done (dq_done: per (batch, kv head),
// its dK/dV CTAs whose dQ reductions have landed), each marked in dq_converted. Thread 0 copies
// them into a ring of kConvSlots slots; warpgroups 1 and 2 convert them into dQ.
__device__ __forceinline__ void convert_dq_of_done_heads(const BwdParams& params, int converter) {
    ConverterStorage& smem = shared_storage<ConverterStorage>();
    float* slots = smem.slots[0];
    int* slot_tile = smem.slot_tile;
    const ptx::MbarRing<kConvSlots> ring{smem_u32(smem.full), smem_u32(smem.empty)};
    if (threadIdx.x == 0) {
        for (int s = 0; s < kConvSlots; ++s) {
            ptx::mbar_init(ring.full(s), 1);
            ptx::mbar_init(ring.empty(s), kConsumerThreads);
        }
        ptx::fence_mbar_init();
    }
    __syncthreads();
    const int m_blocks = DqTile::m_blocks(params.seqlen_q), group = params.num_heads / params.num_heads_k;
    constexpr unsigned kTileBytes = DqTile::kFloats * 4;
    if (threadIdx.x == 0) {
        int k = 0;
        for (int turn = converter, kv_seen = -1, kv_done = 0; turn * kConvGroup < params.num_dq_tiles; turn += params.num_converters)
            for (int t = turn * kConvGroup; t < min(params.num_dq_tiles, (turn + 1) * kConvGroup); ++t) {
                const int bh = t / m_blocks, kv = bh / params.num_heads * params.num_heads_k + bh % params.num_heads / group;
                if (kv != kv_seen) {
                    kv_seen = kv;
                    kv_done = ptx::ld_acquire(params.dq_done + kv) == params.num_n_blocks;
                }
                if (!kv_done) continue;
                params.dq_converted[t] = 1;
                ring.wait_empty(k);
                slot_tile[k % kConvSlots] = t;
                ptx::mbar_arrive_expect_tx(ring.full(k), kTileBytes);
                ptx::bulk_load(smem_u32(slots + k % kConvSlots * DqTile::kFloats), params.dq_accum + static_cast<int64>(t) * DqTile::kFloats,
                               kTileBytes, ring.full(k));
                ++k;
            }
        ring.wait_empty(k);
        slot_tile[k % kConvSlots] = -1;
        ptx::mbar_arrive(ring.full(k));
    } else if (threadIdx.x >= 128) {
        for (int k = 0;; ++k) {
            ring.wait_full(k);
            const int t = slot_tile[k % kConvSlots];
            if (t < 0) return;
            const float* tile = slots + k % kConvSlots * DqTile::kFloats;
            for (int j = threadIdx.x - 128; j < DqTile::kFloats / 8; j += kConsumerThreads) {
                float4 a, b;
                DqTile::load_chunk(tile, j, a, b);
                store_dq_chunk(params, t, j, m_blocks, a, b);
            }
            ptx::mbar_arrive(ring.empty(k));  // by every thread, each after its own reads of the slot and slot_tile
        }
    }
}
