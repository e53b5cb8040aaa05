// The backward's passes around the dK/dV kernels (mma.sync or wgmma): flash_bwd_preprocess
// before them; after them (DQ_ATOMIC mode) the conversion of the float32 dQ accumulator, whose
// layout is defined here (the launcher zeroes it): flash_bwd_convert_dq by rows for the portable
// kernel; for the sm_90a one, converter CTAs in the dK/dV kernel's own grid
// (flash_bwd_sm90.cu) and, for the tiles they leave, flash_bwd_convert_dq_tiles.
#pragma once
#include "flash_common.cuh"
#include "params.cuh"

constexpr float kLog2e = 1.4426950408889634f;

#if DQ_TILED
// The sm_90a kernel's dQ tile of BLOCK_M x HEAD_DIM floats: consumer warpgroup wg < kWarpgroups
// computes its rows row0(wg) .. + 64, all columns (at d128, Br = 64, one warpgroup computes the
// whole tile and the other none: flash_bwd_sm90.cu, kSoloDq). The accumulator keeps each tile in
// the order the warpgroups hold it in registers, (warpgroup, warp, n8 tile, row half, lane,
// pair), so that a warp stores 256 contiguous bytes to shared memory and a warpgroup's part goes
// to global memory as one bulk reduction. Columns 8j .. 8j + 7 of a row stay 8 contiguous floats
// (lane = 4 * (row % 8) + column % 8 / 2).
// A tile of fewer than 64 rows (d256: Br = 32) is computed transposed, dQ^T = K^T dS^T (wgmma's M
// is at least 64), each warpgroup 128 of its head-dim rows, and kept in the same order as dQ^T:
// the 8 floats of a dQ row's columns 8j .. 8j + 7 then lie 8 apart.
struct DqTile {
    static constexpr bool kTransposed = BLOCK_M < 64;
    static constexpr int kRows = kTransposed ? HEAD_DIM : BLOCK_M;  // as computed
    static constexpr int kRowBlocks = kRows / 64, kWarpgroups = kTransposed ? 2 : kRowBlocks;
    static constexpr int kCols = kTransposed ? BLOCK_M : HEAD_DIM;   // each dQ warpgroup's columns: all
    static constexpr int kFloats = BLOCK_M * HEAD_DIM;

    // Tiles per (batch, head): the last one's rows past seqlen_q are scratch.
    static __device__ __forceinline__ int m_blocks(int seqlen_q) { return (seqlen_q + BLOCK_M - 1) / BLOCK_M; }
    static __device__ __forceinline__ int row0(int wg) { return wg % kRowBlocks * 64; }
    // col0 and offset's column-block term are 0 for every dQ warpgroup. They keep this form: the
    // d64 kernel compiled from the equal, shorter formulas ran 7% slower (bench/NOTES.md, v2.15).
    static __device__ __forceinline__ int col0(int wg) { return wg / kRowBlocks * kCols; }
    // Offset of element (r, c) of the tile as computed (dQ^T when kTransposed).
    static __device__ __forceinline__ int computed_offset(int r, int c) {
        const int wg = c / kCols * kRowBlocks + r / 64, warp = r % 64 / 16, half = r % 16 / 8, nt = c % kCols / 8;
        return (((wg * 4 + warp) * (kCols / 8) + nt) * 2 + half) * 64 + r % 8 * 8 + c % 8;
    }
    // Offset of dQ element (row r, column c).
    static __device__ __forceinline__ int offset(int r, int c) { return kTransposed ? computed_offset(c, r) : computed_offset(r, c); }
    // Row and first column of the 8 dQ elements that chunk q of a tile holds (load_chunk reads them).
    static __device__ __forceinline__ void chunk(int q, int& r, int& c) {
        const int half = q / 8 % 2, nt = q / 16 % (kCols / 8), warp = q / 16 / (kCols / 8) % 4;
        const int wg = q / 16 / (kCols / 8) / 4;
        r = wg % kRowBlocks * 64 + warp * 16 + half * 8 + q % 8;
        c = wg / kRowBlocks * kCols + nt * 8;
        if (kTransposed) {
            const int d = r - q % 8;
            r = c + q % 8;
            c = d;
        }
    }
    // The 8 floats of chunk q of `tile`.
    static __device__ __forceinline__ void load_chunk(const float* tile, int q, float4& a, float4& b) {
        if (kTransposed) {
            const float* p = tile + 8 * (q - q % 8) + q % 8;
            a = make_float4(p[0], p[8], p[16], p[24]);
            b = make_float4(p[32], p[40], p[48], p[56]);
        } else {
            a = *reinterpret_cast<const float4*>(tile + 8 * q);
            b = *reinterpret_cast<const float4*>(tile + 8 * q + 4);
        }
    }
};
#endif

// Offset of dQ element (r, c) of (batch * head) bh in the accumulator: whole DqTiles of
// ceil(seqlen_q / BLOCK_M) * BLOCK_M rows per head for the sm_90a kernel (the rows and columns
// past seqlen_q and head_dim are scratch, never read), else (seqlen_q, head_dim) row-major.
__device__ __forceinline__ int64 dq_accum_offset(int bh, int r, int c, int seqlen_q, int head_dim) {
#if DQ_TILED
    return (static_cast<int64>(bh) * DqTile::m_blocks(seqlen_q) + r / BLOCK_M) * DqTile::kFloats + DqTile::offset(r % BLOCK_M, c);
#else
    return (static_cast<int64>(bh) * seqlen_q + r) * head_dim + c;
#endif
}

// The row passes' geometry: blocks of 4 warps, each warp 4 rows. kLanesPerRow lanes (the power of
// two that covers the bucket's 16-byte chunks) share a row, lane l of them holding columns
// 8l .. 8l + 7, so that every lane has a load in flight at d <= 128 too; a warp issues the loads
// of all its rows before it reduces or stores any.
constexpr int kRowsPerBlock = 16;  // cuflash/backward_launch.py: ROWS_PER_BLOCK
constexpr int kLanesPerRow = HEAD_DIM <= 64 ? 8 : HEAD_DIM <= 128 ? 16 : 32;
constexpr int kRowsPerPass = 32 / kLanesPerRow, kPasses = 4 / kRowsPerPass;

// Row of pass p of this thread, and its first column.
__device__ __forceinline__ int pass_row(int p) {
    return blockIdx.x * kRowsPerBlock + threadIdx.x / 32 * 4 + p * kRowsPerPass + threadIdx.x % 32 / kLanesPerRow;
}
__device__ __forceinline__ int lane_col() { return threadIdx.x % kLanesPerRow * 8; }

// D = rowsum(dO * O) * d_scale; lse2 = lse * log2(e) (+inf where lse = -inf, so that P = 0
// there).
extern "C" __global__ void __launch_bounds__(128) flash_bwd_preprocess(const __grid_constant__ BwdParams params) {
    const int c = lane_col();
    float acc[kPasses];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
        const int row_id = pass_row(p);
        acc[p] = 0.f;
        if (row_id >= params.rows_total || c >= params.head_dim) continue;
        const int bh = row_id / params.seqlen_q, r = row_id % params.seqlen_q;
        const int batch = bh / params.num_heads, head = bh % params.num_heads;
        const uint4 ov =
            *reinterpret_cast<const uint4*>(params.o + batch * params.o_batch_stride + r * params.o_row_stride + head * params.o_head_stride + c);
        const uint4 dv = *reinterpret_cast<const uint4*>(params.dout + batch * params.do_batch_stride + r * params.do_row_stride +
                                                         head * params.do_head_stride + c);
        const elem_t* oe = reinterpret_cast<const elem_t*>(&ov);
        const elem_t* de = reinterpret_cast<const elem_t*>(&dv);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[p] += static_cast<float>(oe[i]) * static_cast<float>(de[i]);
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
#pragma unroll
        for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) acc[p] += __shfl_xor_sync(0xffffffff, acc[p], offset);
        const int row_id = pass_row(p);
        if (c == 0 && row_id < params.rows_total) {
            const int64 i = static_cast<int64>(row_id / params.seqlen_q) * params.seqlen_q_pad + row_id % params.seqlen_q;
            const float l = params.lse[static_cast<int64>(row_id)];
            params.dsum[i] = acc[p] * params.d_scale;
            params.lse2[i] = l == neg_inf() ? -neg_inf() : l * kLog2e;
        }
    }
}

// scale * 8 floats, packed in the input type.
__device__ __forceinline__ uint4 pack8_scaled(float4 a, float4 b, float scale) {
    uint4 packed;
    packed.x = ptx::pack2<elem_t>(a.x * scale, a.y * scale);
    packed.y = ptx::pack2<elem_t>(a.z * scale, a.w * scale);
    packed.z = ptx::pack2<elem_t>(b.x * scale, b.y * scale);
    packed.w = ptx::pack2<elem_t>(b.z * scale, b.w * scale);
    return packed;
}

// dQ[bh][r][c .. c + 7] = ds_scale * the accumulator's 8 floats a, b, in the input type.
__device__ __forceinline__ void store_dq8(const BwdParams& params, int bh, int r, int c, float4 a, float4 b) {
    *reinterpret_cast<uint4*>(params.dq + (bh / params.num_heads) * params.dq_batch_stride + r * params.dq_row_stride +
                              (bh % params.num_heads) * params.dq_head_stride + c) = pack8_scaled(a, b, params.ds_scale);
}

#if DQ_TILED
// The same for chunk j of accumulator tile t ((batch * head) t / m_blocks, m block t % m_blocks),
// where it lies inside dQ.
__device__ __forceinline__ void store_dq_chunk(const BwdParams& params, int t, int j, int m_blocks, float4 a, float4 b) {
    int r, c;
    DqTile::chunk(j, r, c);
    r += t % m_blocks * BLOCK_M;
    if (r < params.seqlen_q && c < params.head_dim) store_dq8(params, t / m_blocks, r, c, a, b);
}

// The accumulator's tiles that the dK/dV kernel's converter CTAs left (dq_converted[t] == 0), one
// per block at a time; each thread has all its loads of a tile in flight before its first store.
extern "C" __global__ void __launch_bounds__(128) flash_bwd_convert_dq_tiles(const __grid_constant__ BwdParams params) {
    constexpr int kPerThread = DqTile::kFloats / 8 / 128;
    const int m_blocks = DqTile::m_blocks(params.seqlen_q);
    for (int t = blockIdx.x; t < params.num_dq_tiles; t += gridDim.x) {
        if (params.dq_converted[t]) continue;
        const float* tile = params.dq_accum + static_cast<int64>(t) * DqTile::kFloats;
        float4 v[kPerThread][2];
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) DqTile::load_chunk(tile, threadIdx.x + k * 128, v[k][0], v[k][1]);
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) store_dq_chunk(params, t, threadIdx.x + k * 128, m_blocks, v[k][0], v[k][1]);
    }
}
#else
// dQ = ds_scale * accumulator, in the input type and the caller's strides.
extern "C" __global__ void __launch_bounds__(128) flash_bwd_convert_dq(const __grid_constant__ BwdParams params) {
    const int c = lane_col();
    if (c >= params.head_dim) return;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
        const int row_id = pass_row(p);
        if (row_id >= params.rows_total) continue;
        const int bh = row_id / params.seqlen_q, r = row_id % params.seqlen_q;
        const float4* src = reinterpret_cast<const float4*>(params.dq_accum + dq_accum_offset(bh, r, c, params.seqlen_q, params.head_dim));
        store_dq8(params, bh, r, c, src[0], src[1]);
    }
}
#endif
