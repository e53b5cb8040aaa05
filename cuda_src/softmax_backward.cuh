// The backward's pointwise step, on one warp's transposed scores in the mma C layout (MT m16
// tiles of keys x NT n8 tiles of queries): from S^T and dP^T to P^T and dS^T, shared by the
// mma.sync and the wgmma dK/dV kernels.
#pragma once
#include "warp_gemm.cuh"
#include "philox.cuh"

// P = exp2(S * scale_log2 - lse2) of a recomputed score S. IS_SOFTCAP: of the capped score
// t = tanh(S * softcap_scale) (the forward's cap_scores), and dcap = 1 - t^2, the derivative of
// the cap, by which dS is multiplied; without softcap dcap is left alone.
__device__ __forceinline__ float recomputed_prob(float s, float scale_log2, float lse2, float softcap_scale, float& dcap) {
    if (IS_SOFTCAP) {
        s = ptx::tanh_approx(s * softcap_scale);
        dcap = 1.f - s * s;
    }
    return ptx::exp2_approx(fmaf(s, scale_log2, -lse2));
}

// Calls f(mt, nt, e, row, p, kept, dcap) for every element of one warp's S^T s: p = P^T
// (recomputed_prob), 0 where the key is invisible to the query (checked only with MASK); kept
// its dropout keep bit Z^T (regenerated from rng; always set without dropout); dcap the cap's
// derivative (IS_SOFTCAP). key0 and query0 are the warp's first key and query within the tile
// at (n0, m0); lse2 is indexed by the tile's query (row).
template <bool MASK, int MT, int NT, typename F>
__device__ __forceinline__ void for_each_prob(const float (&s)[MT][NT][4], const float* lse2, int key0, int query0, int m0, int n0, int seqlen_k,
                                              int diag, const dropout::Rng& rng, int bh, float scale_log2, float softcap_scale, F&& f) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const unsigned keep = IS_DROPOUT ? dropout::keep_bits_kq(rng, bh, n0 + key0 + mt * 16, m0 + query0 + nt * 8) : 0xfu;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = key0 + acc_row(mt, e), row = query0 + acc_col(nt, e);
                float dcap = 1.f;
                float p = recomputed_prob(s[mt][nt][e], scale_log2, lse2[row], softcap_scale, dcap);
                if (MASK && !visible(m0 + row, n0 + key, seqlen_k, diag)) p = 0.f;
                f(mt, nt, e, row, p, static_cast<bool>(keep >> e & 1), dcap);
            }
        }
}

// P^T and dS^T = P^T * (dP^T - D) (times dcap with softcap). With dropout, s becomes P^T * Z^T
// (what dV reads) and dp becomes P^T * (dP^T * Z^T - D'); dsum is indexed like lse2.
template <bool MASK, int MT, int NT>
__device__ __forceinline__ void softmax_backward_tile(float (&s)[MT][NT][4], float (&dp)[MT][NT][4], const float* lse2, const float* dsum, int key0,
                                                      int query0, int m0, int n0, int seqlen_k, int diag, const dropout::Rng& rng, int bh,
                                                      float scale_log2, float softcap_scale) {
    for_each_prob<MASK>(s, lse2, key0, query0, m0, n0, seqlen_k, diag, rng, bh, scale_log2, softcap_scale,
                        [&](int mt, int nt, int e, int row, float p, bool kept, float dcap) {
                            s[mt][nt][e] = kept ? p : 0.f;
                            const float ds = p * ((kept ? dp[mt][nt][e] : 0.f) - dsum[row]);
                            dp[mt][nt][e] = IS_SOFTCAP ? ds * dcap : ds;
                        });
}

// The same step split between two warpgroups that hold S^T and dP^T of the same keys and queries
// in the same layout (the d256 kernel): probs_tile turns s into P^T (times Z^T with dropout: what
// dV reads) and writes signed_p, P^T (times dcap with softcap) with every dropped entry negated
// (-0 for a dropped 0), from which the other warpgroup's dscores_tile turns dp into dS^T, as
// softmax_backward_tile does.
template <bool MASK, int MT, int NT>
__device__ __forceinline__ void probs_tile(float (&s)[MT][NT][4], float (&signed_p)[MT][NT][4], const float* lse2, int key0, int query0, int m0,
                                           int n0, int seqlen_k, int diag, const dropout::Rng& rng, int bh, float scale_log2, float softcap_scale) {
    for_each_prob<MASK>(s, lse2, key0, query0, m0, n0, seqlen_k, diag, rng, bh, scale_log2, softcap_scale,
                        [&](int mt, int nt, int e, int, float p, bool kept, float dcap) {
                            s[mt][nt][e] = kept ? p : 0.f;
                            const float ds_factor = IS_SOFTCAP ? p * dcap : p;
                            signed_p[mt][nt][e] = kept ? ds_factor : -ds_factor;
                        });
}

template <int MT, int NT>
__device__ __forceinline__ void dscores_tile(float (&dp)[MT][NT][4], const float (&signed_p)[MT][NT][4], const float* dsum, int query0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float sp = signed_p[mt][nt][e];
                const bool kept = !IS_DROPOUT || !signbit(sp);
                dp[mt][nt][e] = fabsf(sp) * ((kept ? dp[mt][nt][e] : 0.f) - dsum[query0 + acc_col(nt, e)]);
            }
}

// The pointwise step of a tile, compiled twice: with the per-element visibility checks for the
// tiles that need_mask (tile_needs_mask: the causal diagonal, the last keys), without for the
// others. (A run-time `need_mask` inside one copy kept the checks in every causal tile: +17-25%
// causal backward once hoisted, bench/NOTES.md v2.6.)
template <int MT, int NT>
__device__ __forceinline__ void softmax_backward(float (&s)[MT][NT][4], float (&dp)[MT][NT][4], const float* lse2, const float* dsum, int key0,
                                                 int query0, int m0, int n0, int seqlen_k, int diag, bool need_mask, const dropout::Rng& rng, int bh,
                                                 float scale_log2, float softcap_scale) {
    if (need_mask)
        softmax_backward_tile<true>(s, dp, lse2, dsum, key0, query0, m0, n0, seqlen_k, diag, rng, bh, scale_log2, softcap_scale);
    else
        softmax_backward_tile<false>(s, dp, lse2, dsum, key0, query0, m0, n0, seqlen_k, diag, rng, bh, scale_log2, softcap_scale);
}

// probs_tile, compiled twice likewise.
template <int MT, int NT>
__device__ __forceinline__ void probs(float (&s)[MT][NT][4], float (&signed_p)[MT][NT][4], const float* lse2, int key0, int query0, int m0, int n0,
                                      int seqlen_k, int diag, bool need_mask, const dropout::Rng& rng, int bh, float scale_log2,
                                      float softcap_scale) {
    if (need_mask)
        probs_tile<true>(s, signed_p, lse2, key0, query0, m0, n0, seqlen_k, diag, rng, bh, scale_log2, softcap_scale);
    else
        probs_tile<false>(s, signed_p, lse2, key0, query0, m0, n0, seqlen_k, diag, rng, bh, scale_log2, softcap_scale);
}
