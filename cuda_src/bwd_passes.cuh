// The backward's two row-parallel passes around the dK/dV kernels (mma.sync or wgmma):
// flash_bwd_preprocess before them, flash_bwd_convert_dq after them (DQ_ATOMIC mode).
#pragma once
#include "flash_common.cuh"

constexpr float kLog2e = 1.4426950408889634f;

// D = rowsum(dO * O) * d_scale; lse2 = lse * log2(e) (+inf where lse = -inf, so that P = 0
// there); with DQ_ATOMIC, zeroes the float32 dQ accumulator.
extern "C" __global__ void __launch_bounds__(128)
flash_bwd_preprocess(const elem_t* __restrict__ o, const elem_t* __restrict__ dout, const float* __restrict__ lse,
                     float* __restrict__ lse2, float* __restrict__ dsum, float* __restrict__ dq_accum,
                     int64 o_batch_stride, int64 o_row_stride, int64 o_head_stride,
                     int64 do_batch_stride, int64 do_row_stride, int64 do_head_stride,
                     int seqlen_q, int seqlen_q_pad, int num_heads, int head_dim, int rows_total, float d_scale) {
    // One warp per query row; lane l holds columns 8l .. 8l + 7.
    const int row_id = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row_id >= rows_total) return;
    const int bh = row_id / seqlen_q, r = row_id % seqlen_q;
    const int batch = bh / num_heads, head = bh % num_heads;
    const int c = lane * 8;
    float acc = 0.f;
    if (c < head_dim) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + batch * o_batch_stride + r * o_row_stride + head * o_head_stride + c);
        const uint4 dv = *reinterpret_cast<const uint4*>(dout + batch * do_batch_stride + r * do_row_stride + head * do_head_stride + c);
        const elem_t* oe = reinterpret_cast<const elem_t*>(&ov);
        const elem_t* de = reinterpret_cast<const elem_t*>(&dv);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc += static_cast<float>(oe[i]) * static_cast<float>(de[i]);
        if (DQ_ATOMIC) {
            float4* dq = reinterpret_cast<float4*>(dq_accum + static_cast<int64>(row_id) * head_dim + c);
            dq[0] = make_float4(0.f, 0.f, 0.f, 0.f);
            dq[1] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffff, acc, offset);
    if (lane == 0) {
        const int64 i = static_cast<int64>(bh) * seqlen_q_pad + r;
        const float l = lse[static_cast<int64>(row_id)];
        dsum[i] = acc * d_scale;
        lse2[i] = l == neg_inf() ? -neg_inf() : l * kLog2e;
    }
}

// dQ = scale * accumulator, in the input type and the caller's strides.
extern "C" __global__ void __launch_bounds__(128)
flash_bwd_convert_dq(const float* __restrict__ dq_accum, elem_t* __restrict__ dq,
                     int64 dq_batch_stride, int64 dq_row_stride, int64 dq_head_stride,
                     int seqlen_q, int num_heads, int head_dim, int rows_total, float scale) {
    // One warp per (batch, head, row) of the accumulator; lane l converts columns 8l .. 8l + 7.
    const int row_id = blockIdx.x * 4 + threadIdx.x / 32, c = (threadIdx.x % 32) * 8;
    if (row_id >= rows_total || c >= head_dim) return;
    const int bh = row_id / seqlen_q, r = row_id % seqlen_q;
    const float4* src = reinterpret_cast<const float4*>(dq_accum + static_cast<int64>(row_id) * head_dim + c);
    const float4 a = src[0], b = src[1];
    uint4 packed;
    packed.x = ptx::pack2<elem_t>(a.x * scale, a.y * scale);
    packed.y = ptx::pack2<elem_t>(a.z * scale, a.w * scale);
    packed.z = ptx::pack2<elem_t>(b.x * scale, b.y * scale);
    packed.w = ptx::pack2<elem_t>(b.z * scale, b.w * scale);
    *reinterpret_cast<uint4*>(dq + (bh / num_heads) * dq_batch_stride + r * dq_row_stride + (bh % num_heads) * dq_head_stride + c) = packed;
}
