// The backward's pointwise step, on one warp's transposed scores in the mma C layout (MT m16
// tiles of keys x NT n8 tiles of queries): from S^T and dP^T to P^T and dS^T, shared by the
// mma.sync and the wgmma dK/dV kernels.
#pragma once
#include "warp_gemm.cuh"
#include "philox.cuh"

// P^T = exp2(S^T * scale_log2 - lse2), 0 where the key is invisible to the query (checked only
// with MASK); dS^T = P^T * (dP^T - D). With dropout (keep bits Z regenerated from rng), s becomes
// P^T * Z^T (what dV reads) and dp becomes P^T * (dP^T * Z^T - D'). key0 and query0 are the warp's
// first key and query within the tile at (n0, m0); lse2 and dsum are indexed by the tile's query.
template <bool MASK, int MT, int NT>
__device__ __forceinline__ void softmax_backward_tile(float (&s)[MT][NT][4], float (&dp)[MT][NT][4], const float* lse2,
                                                      const float* dsum, int key0, int query0, int m0, int n0,
                                                      int seqlen_k, int diag, const dropout::Rng& rng, int bh,
                                                      float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const unsigned keep = IS_DROPOUT ? dropout::keep_bits_kq(rng, bh, n0 + key0 + mt * 16, m0 + query0 + nt * 8) : 0xfu;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = key0 + acc_row(mt, e), row = query0 + acc_col(nt, e);
                float p = ptx::exp2_approx(fmaf(s[mt][nt][e], scale_log2, -lse2[row]));
                if (MASK && !visible(m0 + row, n0 + key, seqlen_k, diag)) p = 0.f;
                const bool kept = keep >> e & 1;
                s[mt][nt][e] = kept ? p : 0.f;
                dp[mt][nt][e] = p * ((kept ? dp[mt][nt][e] : 0.f) - dsum[row]);
            }
        }
}

// The pointwise step of a tile, compiled twice: with the per-element visibility checks for the
// tiles that need_mask (tile_needs_mask: the causal diagonal, the last keys), without for the
// others. (A run-time `need_mask` inside one copy kept the checks in every causal tile: +17-25%
// causal backward once hoisted, bench/NOTES.md v2.6.)
template <int MT, int NT>
__device__ __forceinline__ void softmax_backward(float (&s)[MT][NT][4], float (&dp)[MT][NT][4], const float* lse2,
                                                 const float* dsum, int key0, int query0, int m0, int n0, int seqlen_k,
                                                 int diag, bool need_mask, const dropout::Rng& rng, int bh, float scale_log2) {
    if (need_mask)
        softmax_backward_tile<true>(s, dp, lse2, dsum, key0, query0, m0, n0, seqlen_k, diag, rng, bh, scale_log2);
    else
        softmax_backward_tile<false>(s, dp, lse2, dsum, key0, query0, m0, n0, seqlen_k, diag, rng, bh, scale_log2);
}
