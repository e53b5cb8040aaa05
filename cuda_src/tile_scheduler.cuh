// The order in which CTAs walk their tiles: the persistent forward's (batch * head, m block)
// tiles (TileSchedule, UnitQueue), and the (query head, Q tile) pairs of a backward dK/dV CTA
// (KvBlockWork).
//
// The persistent forward's work comes in units, claimed one at a time: CTA c starts with unit
// c, and each CTA claims the next unclaimed unit as it runs out of work (an atomic counter in
// global memory), so a CTA that drew short units takes more of them. Without causal
// every tile costs the same and a unit is one tile. Under causal an m block's cost grows with
// its index; a unit is the pair of m blocks p and num_m_blocks - 1 - p of one head, which
// together visit the same number of K/V tiles whatever p is, except in the tail: the last
// tail_heads heads come as single m blocks, the longest first over all of them, so that the
// CTAs finish within a short tile of each other (a static round robin of pairs left 3-14% of
// the grid idle at the end; bench/NOTES.md, v2.7). Units run head by head, so the CTAs working
// at one time read the K and V of a few heads, which stay in L2. cuflash/schedule.py
// (persistent_order) mirrors the order for the CPU tests.
#pragma once
#include "ptx.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
struct TileSchedule {
    static constexpr int kTilesPerUnit = IS_CAUSAL ? 2 : 1;
    int num_m_blocks, num_bh, tail_heads;

    __device__ __forceinline__ int units_per_head() const { return (num_m_blocks + kTilesPerUnit - 1) / kTilesPerUnit; }
    __device__ __forceinline__ int body_units() const { return (num_bh - tail_heads) * units_per_head(); }
    __device__ __forceinline__ int num_units() const { return body_units() + tail_heads * num_m_blocks; }

    // Tile `which` of unit u (under causal 0 is the m block that sees more keys, 1 its partner),
    // or false if the unit has no such tile (the middle m block of an odd count, a tail unit).
    __device__ __forceinline__ bool tile(int u, int which, int& bh, int& m_block) const {
        if (u >= body_units()) {
            const int t = u - body_units();
            bh = num_bh - tail_heads + t % tail_heads;
            m_block = num_m_blocks - 1 - t / tail_heads;
            return which == 0;
        }
        const int p = u % units_per_head();
        bh = u / units_per_head();
        m_block = !IS_CAUSAL ? p : which == 0 ? num_m_blocks - 1 - p : p;
        return which == 0 || p != num_m_blocks - 1 - p;
    }
};

// How a CTA's threads agree on its units: one thread claims them (CLAIM) and posts each in a
// 2-slot ring in shared memory; the others read them from there (full: 1 arrival, empty: one per
// reader). The counter is zero at launch, and the grid leaves it at zero.
struct UnitQueue {
    int* slots;
    ptx::MbarRing<2> ring;
    int* counter;
};

// f(bh, m_block) for each tile of this CTA's units, in order. Unit number num_units() or above
// ends the walk. The claiming thread is the K/V producer: it claims the next unit once it has
// issued the copies of this one's tiles, a few tiles before the consumers finish them, so the
// counter hands out units nearly in the order the CTAs run out of work. (The loops stay rolled:
// unrolling copies the consumers' whole tile body.)
template <bool CLAIM, typename F>
__device__ __forceinline__ void for_each_tile(const TileSchedule& schedule, const UnitQueue& queue, F&& f) {
    int u = blockIdx.x;
#pragma unroll 1
    for (int k = 0;; ++k) {
        if (CLAIM) {
            queue.ring.wait_empty(k);
            queue.slots[k % 2] = u;
            ptx::mbar_arrive(queue.ring.full(k));
        } else {
            queue.ring.wait_full(k);
            u = queue.slots[k % 2];
            ptx::mbar_arrive(queue.ring.empty(k));
        }
        if (u >= schedule.num_units()) return;
#pragma unroll 1
        for (int which = 0; which < TileSchedule::kTilesPerUnit; ++which) {
            int bh, m_block;
            if (schedule.tile(u, which, bh, m_block)) f(bh, m_block);
        }
        if (CLAIM) {
            // The grid (at most num_units CTAs) claims num_units numbers in all: one per unit past
            // its first and one failed claim per CTA. The last one drawn leaves the counter at
            // zero, for the next launch that is handed the same counter (cuflash/work_counters.py).
            const int claimed = atomicAdd(queue.counter, 1);
            if (claimed == schedule.num_units() - 1) *queue.counter = 0;
            u = gridDim.x + claimed;
        }
    }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The work of the backward's dK/dV CTA number `block`: Bc = block_n keys (from n0) of one
// (batch, kv head), seen by every query head of its group and, under causal, by the Q tiles of
// block_m rows from m_block_min on: n_iters (query head, Q tile) pairs. The CTAs of one kv head
// begin apart and wrap around, so that at any time they add their dQ tiles into different rows
// of the float32 accumulator rather than all into the first Q tile's: CTA n_block begins at
// iteration n_block, or, in groups of `pair` CTAs, at its group's first n_block. Groups of two
// walk the same Q tiles in step, which on the sm_90a kernel without causal runs 1% (d128) to 4%
// (d64) faster than every CTA a tile apart (bench/NOTES.md, v2.14; v2.4 found the spreading
// itself worth nothing).
struct KvBlockWork {
    int batch, head_k, n_block, n0, group, m_block_min, m_blocks, n_iters, rotation;

    __device__ __forceinline__ KvBlockWork(int block, int num_n_blocks, int num_heads, int num_heads_k, int seqlen_q, int seqlen_k, int block_m,
                                           int block_n, int pair = 1) {
        const int bhk = block / num_n_blocks;
        n_block = block % num_n_blocks;
        batch = bhk / num_heads_k;
        head_k = bhk % num_heads_k;
        group = num_heads / num_heads_k;
        n0 = n_block * block_n;
        // Under causal, query row i sees key n0 only from row n0 - (seqlen_k - seqlen_q) on.
        m_block_min = IS_CAUSAL ? max(0, n0 - (seqlen_k - seqlen_q)) / block_m : 0;
        m_blocks = max(0, (seqlen_q + block_m - 1) / block_m - m_block_min);
        n_iters = group * m_blocks;
        rotation = n_block / pair * pair;
    }
    // Query head and Q tile of iteration i < n_iters.
    __device__ __forceinline__ int head(int i) const { return head_k * group + (i + rotation) % n_iters / m_blocks; }
    __device__ __forceinline__ int m_block(int i) const { return m_block_min + (i + rotation) % n_iters % m_blocks; }
};
