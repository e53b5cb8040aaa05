// The order in which the persistent CTAs of a launch walk its (batch * head, m block) tiles.
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
