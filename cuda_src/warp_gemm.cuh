// Warp-level GEMMs on tensor cores (mma.sync m16n8k16), the building block of every kernel.
//
// One warp computes acc (MT*16 x NT*8) += A (MT*16 x K) * B (K x NT*8). Operands live in pitched
// shared tiles in one of two layouts each, read with ldmatrix (transposing where needed):
//   A_KMAJOR = false: A stored [m][k] (e.g. Q for S = Q K^T)     true: stored [k][m] (dS^T for dQ = dS K)
//   B_KMAJOR = false: B stored [n][k] (e.g. K for S = Q K^T)     true: stored [k][n] (V for O = P V)
// or A comes from registers (an fp32 accumulator rounded to mma A fragments, e.g. P).
#pragma once
#include "flash_common.cuh"

// A fragments of rows m0..m0+15, k columns k0..k0+15.
template <bool A_KMAJOR>
__device__ __forceinline__ void load_a_frag(unsigned (&a)[4], const elem_t* sA, int lda, int m0, int k0) {
    const int lane = threadIdx.x % 32;
    if (A_KMAJOR)
        ptx::ldmatrix_x4_trans(a, sA + (k0 + (lane / 16) * 8 + lane % 8) * lda + m0 + ((lane / 8) % 2) * 8);
    else
        ptx::ldmatrix_x4(a, sA + (m0 + lane % 16) * lda + k0 + (lane / 16) * 8);
}

// B fragments of two n8 tiles (n0..n0+15), k rows k0..k0+15: b[0..1] for n0, b[2..3] for n0+8.
template <bool B_KMAJOR>
__device__ __forceinline__ void load_b_frag(unsigned (&b)[4], const elem_t* sB, int ldb, int n0, int k0) {
    const int lane = threadIdx.x % 32;
    if (B_KMAJOR)
        ptx::ldmatrix_x4_trans(b, sB + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * ldb + n0 + (lane / 16) * 8);
    else
        ptx::ldmatrix_x4(b, sB + (n0 + lane % 8 + (lane / 16) * 8) * ldb + k0 + ((lane / 8) % 2) * 8);
}

// acc += A * B for one k step of 16: A fragments of MT row tiles (a[mt]) against B's k rows
// k0..k0+15 of all NT n8 tiles.
template <int MT, int NT, bool B_KMAJOR>
__device__ __forceinline__ void mma_k16(float (&acc)[MT][NT][4], const unsigned (&a)[MT][4], const elem_t* sB, int ldb, int k0) {
    static_assert(NT % 2 == 0, "B is read 16 columns at a time");
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
        unsigned b[4];
        load_b_frag<B_KMAJOR>(b, sB, ldb, nn * 16, k0);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            ptx::mma_16816<elem_t>(acc[mt][2 * nn], a[mt], b[0], b[1]);
            ptx::mma_16816<elem_t>(acc[mt][2 * nn + 1], a[mt], b[2], b[3]);
        }
    }
}

// acc += A * B with both operands in shared memory; sA points at the warp's row 0 (or column 0 if
// A_KMAJOR), sB at its column 0 (row 0 if !B_KMAJOR). A fragments are reused across all of N.
template <int MT, int NT, int K, bool A_KMAJOR, bool B_KMAJOR>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[MT][NT][4], const elem_t* sA, int lda, const elem_t* sB, int ldb) {
    static_assert(K % 16 == 0, "k runs in steps of 16");
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) load_a_frag<A_KMAJOR>(a[mt], sA, lda, mt * 16, kk * 16);
        mma_k16<MT, NT, B_KMAJOR>(acc, a, sB, ldb, kk * 16);
    }
}

// acc += A * B with A in registers: a[mt][kk] are the A fragments of rows mt*16.., k kk*16...
template <int MT, int NT, int K, bool B_KMAJOR>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[MT][NT][4], const unsigned (&a)[MT][K / 16][4], const elem_t* sB, int ldb) {
    static_assert(K % 16 == 0, "k runs in steps of 16");
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned a_kk[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) a_kk[mt][i] = a[mt][kk][i];
        mma_k16<MT, NT, B_KMAJOR>(acc, a_kk, sB, ldb, kk * 16);
    }
}

// An fp32 accumulator (MT x NT n8 tiles) rounded to the A fragments of the next GEMM, whose k is
// the accumulator's n: the C layout of m16n8k16 is the A layout of two adjacent n8 tiles.
template <int MT, int NT>
__device__ __forceinline__ void acc_to_a_frags(unsigned (&a)[MT][NT / 2][4], const float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk) {
            a[mt][kk][0] = ptx::pack2<elem_t>(acc[mt][2 * kk][0], acc[mt][2 * kk][1]);
            a[mt][kk][1] = ptx::pack2<elem_t>(acc[mt][2 * kk][2], acc[mt][2 * kk][3]);
            a[mt][kk][2] = ptx::pack2<elem_t>(acc[mt][2 * kk + 1][0], acc[mt][2 * kk + 1][1]);
            a[mt][kk][3] = ptx::pack2<elem_t>(acc[mt][2 * kk + 1][2], acc[mt][2 * kk + 1][3]);
        }
}

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// Accumulator element e of tile (mt, nt) sits at row mt*16 + lane/4 + 8*(e/2), column
// nt*8 + 2*(lane%4) + e%2 of the warp's block.
__device__ __forceinline__ int acc_row(int mt, int e) { return mt * 16 + (threadIdx.x % 32) / 4 + (e / 2) * 8; }
__device__ __forceinline__ int acc_col(int nt, int e) { return nt * 8 + 2 * (threadIdx.x % 4) + (e % 2); }

// Round an accumulator to elem_t and store it into a pitched shared tile at the warp's block.
template <int MT, int NT>
__device__ __forceinline__ void store_acc(elem_t* s, int pitch, const float (&acc)[MT][NT][4], float scale) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
                *reinterpret_cast<unsigned*>(s + acc_row(mt, 2 * hh) * pitch + acc_col(nt, 0)) =
                    ptx::pack2<elem_t>(acc[mt][nt][2 * hh] * scale, acc[mt][nt][2 * hh + 1] * scale);
}
