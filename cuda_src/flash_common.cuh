// Pieces shared by the forward and backward kernels: element type, tile geometry, tile copies.
#pragma once
#include "ptx.cuh"

// Injected by the launcher (cuflash/compile.py): IS_BF16, HEAD_DIM, IS_CAUSAL.
#if IS_BF16
typedef __nv_bfloat16 elem_t;
#else
typedef __half elem_t;
#endif

typedef long long int64;

// Shared-memory row pitch in elements: 16 extra bytes per row put the 8 rows that one ldmatrix
// phase reads into 8 different 4-bank groups, so tiles need no swizzle.
constexpr int kPitch = HEAD_DIM + 8;
constexpr int kChunksPerRow = HEAD_DIM / 8;  // 16-byte chunks per row
static_assert(HEAD_DIM % 32 == 0, "head-dim buckets are multiples of 32");

// -inf from its bits: NVRTC has no math.h and so no INFINITY.
__device__ __forceinline__ float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Masking, with diag = seqlen_k - seqlen_q: query row i sees key j iff j < seqlen_k and, under
// causal (aligned bottom-right), j <= i + diag. cuflash/reference.py mirrors these three.
__device__ __forceinline__ bool visible(int row, int col, int seqlen_k, int diag) { return col < seqlen_k && (!IS_CAUSAL || col <= row + diag); }

// Number of K/V tiles of block_n keys that the query rows [m0, m0 + rows) visit.
__device__ __forceinline__ int kv_blocks_visited(int m0, int rows, int block_n, int seqlen_k, int diag) {
    int n_max = ceil_div(seqlen_k, block_n);
    if (IS_CAUSAL) {
        const int last_key = m0 + rows - 1 + diag;  // the last row's last visible key
        n_max = min(n_max, last_key < 0 ? 0 : last_key / block_n + 1);
    }
    return n_max;
}

// True if some key of [n0, n0 + block_n) is invisible to some row from m0 on.
__device__ __forceinline__ bool tile_needs_mask(int m0, int n0, int block_n, int seqlen_k, int diag) {
    return n0 + block_n > seqlen_k || (IS_CAUSAL && n0 + block_n - 1 > m0 + diag);
}

// Async copy of a (ROWS, HEAD_DIM) tile from global rows `row_stride` elements apart into a
// pitched shared tile. Rows >= rows_valid and columns >= head_dim (the caller's head dim, a
// multiple of 8, below the bucket) are zero-filled, so they add nothing to any product.
// Where the threads divide a row's chunks evenly, each thread owns one 16-byte column chunk and
// walks rows with a running pointer: one 64-bit add per copy, no per-copy offsets in registers.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void load_tile_async(elem_t* s, const elem_t* g, int64 row_stride, int rows_valid, int head_dim) {
    if constexpr (NTHREADS % kChunksPerRow == 0) {
        constexpr int kRowStep = NTHREADS / kChunksPerRow;
        const int c = threadIdx.x % kChunksPerRow, r0 = threadIdx.x / kChunksPerRow;
        const bool col_valid = c * 8 < head_dim;
        const elem_t* src = g + r0 * row_stride + c * 8;
        const int64 step = kRowStep * row_stride;
#pragma unroll
        for (int r = r0, i = 0; i < (ROWS + kRowStep - 1) / kRowStep; ++i, r += kRowStep, src += step) {
            if (ROWS % kRowStep == 0 || r < ROWS) {
                const bool valid = col_valid && r < rows_valid;
                ptx::cp_async_16(s + r * kPitch + c * 8, valid ? src : g, valid ? 16 : 0);
            }
        }
    } else {  // head dims 96, 160, 224: a thread's chunk column changes from copy to copy
        constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
        for (int i = threadIdx.x; i < kChunks; i += NTHREADS) {
            const int r = i / kChunksPerRow, c = i % kChunksPerRow;
            const bool valid = r < rows_valid && c * 8 < head_dim;
            ptx::cp_async_16(s + r * kPitch + c * 8, valid ? g + r * row_stride + c * 8 : g, valid ? 16 : 0);
        }
    }
}

// Copy the first rows_valid rows and head_dim columns of a pitched shared tile to global memory
// with 16-byte stores.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void store_tile(elem_t* g, const elem_t* s, int64 row_stride, int rows_valid, int head_dim) {
    constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
    for (int i = threadIdx.x; i < kChunks; i += NTHREADS) {
        const int r = i / kChunksPerRow, c = i % kChunksPerRow;
        if (r < rows_valid && c * 8 < head_dim)
            *reinterpret_cast<uint4*>(g + r * row_stride + c * 8) = *reinterpret_cast<const uint4*>(s + r * kPitch + c * 8);
    }
}

// K and V rows n0 .. n0 + ROWS of one (batch, kv head), each into its shared tile.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void load_kv_tile(elem_t* sK, elem_t* sV, const elem_t* gK, const elem_t* gV, int64 k_row_stride, int64 v_row_stride,
                                             int n0, int seqlen_k, int head_dim) {
    load_tile_async<ROWS, NTHREADS>(sK, gK + n0 * k_row_stride, k_row_stride, seqlen_k - n0, head_dim);
    load_tile_async<ROWS, NTHREADS>(sV, gV + n0 * v_row_stride, v_row_stride, seqlen_k - n0, head_dim);
}
