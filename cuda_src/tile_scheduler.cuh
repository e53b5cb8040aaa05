// The order in which CTAs walk their tiles: the persistent forward's (batch * head, m block)
// tiles (TileSchedule), and the (query head, Q tile) pairs of a backward dK/dV CTA (KvBlockWork).
//
// Work comes in units: under causal a unit is the pair of m blocks p and num_m_blocks - 1 - p
// of one head, which together visit the same number of K/V tiles whatever p is (without causal
// every tile costs the same and a unit is one tile). CTA c takes units c, c + gridDim.x, ...,
// so the CTAs' loads differ by one unit at most. Units run head by head, so the CTAs working
// at one time read the K and V of one or two heads, which stay in L2. cuflash/plan.py
// (persistent_schedule) mirrors this for the CPU tests.
#pragma once

struct TileSchedule {
    static constexpr int kTilesPerUnit = IS_CAUSAL ? 2 : 1;
    int num_m_blocks, num_bh;

    __device__ __forceinline__ int units_per_head() const { return (num_m_blocks + kTilesPerUnit - 1) / kTilesPerUnit; }
    __device__ __forceinline__ int num_units() const { return num_bh * units_per_head(); }

    // Tile `which` of unit u (under causal 0 is the m block that sees more keys, 1 its partner),
    // or false if the unit has no such tile (the middle m block of an odd count is alone).
    __device__ __forceinline__ bool tile(int u, int which, int& bh, int& m_block) const {
        const int p = u % units_per_head();
        bh = u / units_per_head();
        m_block = !IS_CAUSAL ? p : which == 0 ? num_m_blocks - 1 - p : p;
        return which == 0 || p != num_m_blocks - 1 - p;
    }
};

// f(bh, m_block) for each tile of this CTA, in order. (The loops stay rolled: unrolling copies
// the consumers' whole tile body.)
template <typename F>
__device__ __forceinline__ void for_each_tile(const TileSchedule& schedule, F&& f) {
#pragma unroll 1
    for (int u = blockIdx.x; u < schedule.num_units(); u += gridDim.x)
#pragma unroll 1
        for (int which = 0; which < TileSchedule::kTilesPerUnit; ++which) {
            int bh, m_block;
            if (schedule.tile(u, which, bh, m_block)) f(bh, m_block);
        }
}

// The work of the backward's dK/dV CTA number `block`: Bc = block_n keys (from n0) of one
// (batch, kv head), seen by every query head of its group and, under causal, by the Q tiles of
// block_m rows from m_block_min on: n_iters (query head, Q tile) pairs. The CTAs of one kv head
// begin n_block pairs apart and wrap around, so that at any time they add their dQ tiles into
// different rows of the float32 accumulator rather than all into the first Q tile's. (Measured
// on the sm_90a kernel: no change; the dQ additions cost 30-40% of its time through their
// number, not through contention on the same addresses; see bench/NOTES.md, v2.4.)
struct KvBlockWork {
    int batch, head_k, n_block, n0, group, m_block_min, m_blocks, n_iters;

    __device__ __forceinline__ KvBlockWork(int block, int num_n_blocks, int num_heads, int num_heads_k, int seqlen_q,
                                           int seqlen_k, int block_m, int block_n) {
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
    }
    // Query head and Q tile of iteration i < n_iters.
    __device__ __forceinline__ int head(int i) const { return head_k * group + (i + n_block) % n_iters / m_blocks; }
    __device__ __forceinline__ int m_block(int i) const { return m_block_min + (i + n_block) % n_iters % m_blocks; }
};
