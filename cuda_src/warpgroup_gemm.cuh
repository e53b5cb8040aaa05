// Warpgroup GEMMs on Hopper tensor cores (wgmma, sm_90a), and the shared-memory tiles they read.
//
// A (ROWS, HEAD_DIM) tile is stored as HEAD_DIM / 64 panels of (ROWS, 64) elements: 128-byte rows
// whose 16-byte chunks are permuted, chunk c of row r at c ^ (r % 8). That is wgmma's 128-byte
// swizzle, which TMA writes (a 64-column box per panel): 8 consecutive rows spread over all
// banks, and every 8 rows form a 1024-byte atom, so tiles start 1024-byte aligned. The same tile
// serves as a K-major operand (Q, K: rows are the GEMM's m or n, columns its k) or an N-major one
// (V: rows are k).
// A warpgroup (4 warps, 128 threads) computes a 64-row accumulator; warp w of it owns rows
// 16w..16w+15 in the mma C layout (acc_row/acc_col), so the online softmax is shared with the
// mma.sync kernels.
#pragma once
#include "params.cuh"
#include "warp_gemm.cuh"

static_assert(HEAD_DIM % 64 == 0, "swizzled tiles are whole 64-column panels");
typedef unsigned long long desc_t;

__device__ __forceinline__ unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// The CTA's dynamic shared memory as a T, from its first 1024-byte boundary: swizzle atoms must be
// 1024-byte aligned, and the launcher adds kSmemAlignSlack bytes for the shift
// (cuflash/plan.py: SMEM_ALIGN_SLACK).
constexpr int kSmemAlignSlack = 1024;
using ptx::mbar_t;
template <class T>
__device__ __forceinline__ T& shared_storage() {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned misalign = smem_u32(smem_raw) % 1024;
    return *reinterpret_cast<T*>(smem_raw + (misalign ? 1024 - misalign : 0));
}

// Start a copy of the (ROWS, HEAD_DIM) tile at (row, col 0) of (head, batch) into a swizzled
// tile, panel by panel, completing on mbarrier `bar` (which expects ROWS * HEAD_DIM * 2 bytes).
template <int ROWS>
__device__ __forceinline__ void tma_load_tile(elem_t* s, const TmaDesc& map, int row, int head, int batch, unsigned bar) {
#pragma unroll
    for (int p = 0; p < HEAD_DIM / 64; ++p) ptx::tma_load_4d(smem_u32(s + p * ROWS * 64), &map, p * 64, row, head, batch, bar);
}

// Element offset of 16-byte chunk `chunk` (of HEAD_DIM / 8) of row r in a swizzled tile.
template <int ROWS>
__device__ __forceinline__ int swizzled(int r, int chunk) {
    return (chunk / 8) * ROWS * 64 + r * 64 + ((chunk % 8) ^ (r % 8)) * 8;
}

// Store one warp's (16, 16 KT) slice of 16-bit values, rows row0.., held as mma A fragments
// (acc_to_a_frags), into a swizzled tile: x4 stmatrix kk writes the fragment's four 8x8 matrices
// (matrix i: columns 16 kk + 8 (i / 2).., rows 8 (i % 2)..); lane l addresses row l % 8 of matrix
// l / 8. The 8 rows of a matrix sit in 8 different chunks: no bank conflicts.
template <int ROWS, int KT>
__device__ __forceinline__ void stmatrix_swizzled(elem_t* s, const unsigned (&a)[1][KT][4], int row0) {
    const int lane = threadIdx.x % 32, i = lane / 8;
    const int r = row0 + (i % 2) * 8 + lane % 8;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk)
        ptx::stmatrix_x4(smem_u32(s + swizzled<ROWS>(r, 2 * kk + i / 2)), a[0][kk][0], a[0][kk][1], a[0][kk][2], a[0][kk][3]);
}

// Load one warp's (16, 16 KT) slice of a swizzled tile, rows row0.., as mma A fragments (the
// inverse of stmatrix_swizzled: x4 ldmatrix kk reads the same four 8x8 matrices).
template <int ROWS, int KT>
__device__ __forceinline__ void ldmatrix_swizzled(unsigned (&a)[1][KT][4], const elem_t* s, int row0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) ptx::ldmatrix_x4(a[0][kk], s + swizzled<ROWS>(row0 + lane % 16, 2 * kk + lane / 16));
}

// Store one warp's (16, 16 KT) slice of A fragments, rows row0.., transposed into a swizzled
// tile: fragment rows become columns row0.. of the tile's rows col0 + 16 kk.. (x4 stmatrix.trans
// kk writes matrix i at tile rows col0 + 16 kk + 8 (i / 2).., chunk row0 / 8 + i % 2).
template <int ROWS, int KT>
__device__ __forceinline__ void stmatrix_t_swizzled(elem_t* s, const unsigned (&a)[1][KT][4], int row0, int col0) {
    const int lane = threadIdx.x % 32, i = lane / 8;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        const int r = col0 + 16 * kk + (i / 2) * 8 + lane % 8;
        ptx::stmatrix_x4_trans(smem_u32(s + swizzled<ROWS>(r, row0 / 8 + i % 2)), a[0][kk][0], a[0][kk][1], a[0][kk][2], a[0][kk][3]);
    }
}

// The same from a float32 accumulator slice, rounded.
template <int ROWS, int DT>
__device__ __forceinline__ void stmatrix_acc_swizzled(elem_t* s, const float (&acc)[1][DT][4], int row0) {
    unsigned a[1][DT / 2][4];
    acc_to_a_frags(a, acc);
    stmatrix_swizzled<ROWS>(s, a, row0);
}

// Round one warp's (16, HEAD_DIM) slice of an accumulator, rows row0.. of a tile at g, straight
// to global memory, two elements per store; rows >= rows_valid and columns >= head_dim are skipped.
template <int DT>
__device__ __forceinline__ void store_acc_rows(elem_t* g, const float (&acc)[1][DT][4], int row0, int64 row_stride, int rows_valid, int head_dim) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = row0 + acc_row(0, 2 * hh);
        if (r >= rows_valid) continue;
        elem_t* row = g + r * row_stride;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const int c = acc_col(dt, 0);
            if (c < head_dim) *reinterpret_cast<unsigned*>(row + c) = ptx::pack2<elem_t>(acc[0][dt][2 * hh], acc[0][dt][2 * hh + 1]);
        }
    }
}

// Copy the first rows_valid rows and head_dim columns of a swizzled tile to global memory, with
// NTHREADS threads numbered by tid.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void store_tile_swizzled(elem_t* g, const elem_t* s, int64 row_stride, int rows_valid, int head_dim, int tid) {
#pragma unroll
    for (int i = tid; i < ROWS * kChunksPerRow; i += NTHREADS) {
        const int r = i / kChunksPerRow, c = i % kChunksPerRow;
        if (r < rows_valid && c * 8 < head_dim)
            *reinterpret_cast<uint4*>(g + r * row_stride + c * 8) = *reinterpret_cast<const uint4*>(s + swizzled<ROWS>(r, c));
    }
}

// wgmma descriptor of a swizzled operand starting at p: 128-byte swizzle (bits 62-63 = 1), 1024
// bytes between 8-row groups (stride byte offset), `lbo` bytes between 64-column panels (leading
// byte offset: read only for N-major operands wider than one panel). Addresses are in 16 bytes.
__device__ __forceinline__ desc_t smem_desc(const elem_t* p, unsigned lbo) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    return static_cast<desc_t>((addr & 0x3FFFF) >> 4) | static_cast<desc_t>(lbo >> 4) << 16 | static_cast<desc_t>(1024 >> 4) << 32 | 1ull << 62;
}

// acc (64 x N) = A B^T over k = HEAD_DIM, both K-major swizzled tiles (S = Q K^T): sA points at
// the warpgroup's first row of a ROWS_A-row tile, sB at the first of N rows (a multiple of 8) of
// a ROWS_B-row tile. A k step of 16 is 32 bytes along a 128-byte row, then the next panel.
template <int N, int ROWS_A, int ROWS_B = N>
__device__ __forceinline__ void wg_gemm_abt(float (&acc)[N / 8][4], const elem_t* sA, const elem_t* sB) {
    const desc_t a = smem_desc(sA, 16), b = smem_desc(sB, 16);
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        const int col = (kk % 4) * 16;
        ptx::Wgmma<N>::template ss<0, 0>(acc, a + (((kk / 4) * ROWS_A * 64 + col) * 2 >> 4), b + (((kk / 4) * ROWS_B * 64 + col) * 2 >> 4), kk > 0);
    }
}

// The same with A in registers (a[kk], the mma A fragments of k columns 16kk..16kk+15; e.g. Q).
template <int N>
__device__ __forceinline__ void wg_gemm_rs_abt(float (&acc)[N / 8][4], const unsigned (&a)[HEAD_DIM / 16][4], const elem_t* sB) {
    const desc_t b = smem_desc(sB, 16);
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) ptx::Wgmma<N>::template rs<0>(acc, a[kk], b + (((kk / 4) * N * 64 + (kk % 4) * 16) * 2 >> 4), kk > 0);
}

// acc (64 x HEAD_DIM) += A B over k = K: A in registers (a[kk], the mma A fragments of k
// columns 16kk..16kk+15; e.g. P for O += P V), B a swizzled (K, HEAD_DIM) tile read N-major
// (V, or dO and Q in the backward). A k step is 16 rows (2048 bytes).
template <int K>
__device__ __forceinline__ void wg_gemm_rs(float (&acc)[HEAD_DIM / 8][4], const unsigned (&a)[K / 16][4], const elem_t* sB) {
    const desc_t b = smem_desc(sB, K * 128);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) ptx::Wgmma<HEAD_DIM>::template rs<1>(acc, a[kk], b + (kk * 2048 >> 4), 1);
}

// acc (64 x N) = A B (+= with ACCUMULATE) over k = K with both operands stored k-rows first
// (dQ = dS K from dS^T and K): sA points at the 64-column panel of A's m block in a swizzled
// (K, .) tile, sB at the first panel of B's n block in a swizzled (ROWS_B, .) tile.
template <int N, int K, int ROWS_B, bool ACCUMULATE = false>
__device__ __forceinline__ void wg_gemm_kk(float (&acc)[N / 8][4], const elem_t* sA, const elem_t* sB) {
    const desc_t a = smem_desc(sA, K * 128), b = smem_desc(sB, ROWS_B * 128);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) ptx::Wgmma<N>::template ss<1, 1>(acc, a + (kk * 2048 >> 4), b + (kk * 2048 >> 4), ACCUMULATE || kk > 0);
}

// acc (64 x N) = A B over k = K <= 64 with A stored k-rows first and B n-rows first (dQ^T = K^T
// dS^T from K and dS): sA points at the 64-column panel of A's m block in a swizzled (K, .)
// tile, sB at row 0 of a swizzled (N, K) panel.
template <int N, int K>
__device__ __forceinline__ void wg_gemm_mk(float (&acc)[N / 8][4], const elem_t* sA, const elem_t* sB) {
    const desc_t a = smem_desc(sA, K * 128), b = smem_desc(sB, 16);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) ptx::Wgmma<N>::template ss<1, 0>(acc, a + (kk * 2048 >> 4), b + (kk * 32 >> 4), kk > 0);
}

// Pin every register of an accumulator or fragment array (see ptx::fence_reg).
template <typename T, int MT, int NT>
__device__ __forceinline__ void fence_regs(T (&a)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) ptx::fence_reg(a[mt][nt][e]);
}
