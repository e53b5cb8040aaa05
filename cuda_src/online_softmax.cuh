// The online softmax of the forward kernels, on one warp's scores in the mma C layout
// (MT m16 row tiles x NT n8 key tiles; acc_row/acc_col give the coordinates), with its running
// statistics m (row max of S * scale * log2 e) and l (row sum of P, partial over the thread's
// columns). The mma.sync and the wgmma kernels keep S, P and O in this same layout.
#pragma once
#include "warp_gemm.cuh"
#include "philox.cuh"

constexpr float kLn2 = 0.6931471805599453f;

// Softcap (IS_SOFTCAP): S becomes tanh(S * softmax_scale / softcap), the capped score over
// softcap, before the mask; the softmax's scale_log2 is then softcap * log2(e).
template <int MT, int NT>
__device__ __forceinline__ void cap_scores(float (&s)[MT][NT][4], float softcap_scale) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nt][e] = ptx::tanh_approx(s[mt][nt][e] * softcap_scale);
}

// S = -inf where the key is invisible (past seqlen_k, or right of the causal diagonal); row0 is
// the warp's first query row, n0 the tile's first key.
template <int MT, int NT>
__device__ __forceinline__ void mask_scores(float (&s)[MT][NT][4], int row0, int n0, int seqlen_k, int diag) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (!visible(row0 + acc_row(mt, e), n0 + acc_col(nt, e), seqlen_k, diag)) s[mt][nt][e] = neg_inf();
}

// m_new = max(m, rowmax(S) * scale_log2); S becomes P = exp2(S * scale_log2 - m_new);
// l = l * alpha + rowsum(P), and alpha = exp2(m - m_new) is the factor O must be rescaled by.
template <int MT, int NT>
__device__ __forceinline__ void softmax_update(float (&s)[MT][NT][4], float (&m)[MT][2], float (&l)[MT][2], float (&alpha)[MT][2], float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float mx = neg_inf();
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float m_new = fmaxf(m[mt][hh], mx * scale_log2);
            // A row that has seen only masked keys keeps m = -inf; subtract 0 to avoid inf - inf.
            const float m_use = m_new == neg_inf() ? 0.f : m_new;
            alpha[mt][hh] = ptx::exp2_approx(m[mt][hh] - m_use);
            m[mt][hh] = m_new;
            float rowsum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
                    s[mt][nt][e] = ptx::exp2_approx(fmaf(s[mt][nt][e], scale_log2, -m_use));
                    rowsum += s[mt][nt][e];
                }
            l[mt][hh] = l[mt][hh] * alpha[mt][hh] + rowsum;
        }
}

// O *= alpha, row by row.
template <int MT, int DT>
__device__ __forceinline__ void rescale_rows(float (&o)[MT][DT][4], const float (&alpha)[MT][2]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][dt][e] *= alpha[mt][e / 2];
}

// P = 0 where the keep bits of (bh, row, key) drop it (the 1 / (1 - p) waits for the epilogue).
template <int MT, int NT>
__device__ __forceinline__ void drop_scores(float (&p)[MT][NT][4], const dropout::Rng& rng, int bh, int row0, int n0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const unsigned keep = dropout::keep_bits_qk(rng, bh, row0 + mt * 16, n0 + nt * 8);
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (!(keep >> e & 1)) p[mt][nt][e] = 0.f;
        }
}

// A row's sum from the thread's partial one (the four threads of a row hold its columns).
__device__ __forceinline__ float row_sum(float l_part) {
    l_part += __shfl_xor_sync(0xffffffff, l_part, 1);
    return l_part + __shfl_xor_sync(0xffffffff, l_part, 2);
}

// out_scale / l, 0 for a row that saw no key.
__device__ __forceinline__ float output_scale(float l, float out_scale) { return l > 0.f ? out_scale / l : 0.f; }

// lse = ln(l) + m ln 2, -inf for a row that saw no key.
__device__ __forceinline__ float row_lse(float m, float l) { return l > 0.f ? m * kLn2 + logf(l) : neg_inf(); }

// lse for rows in [0, seqlen_q) (causal row blocks may start below row 0), from row sums l.
template <int MT>
__device__ __forceinline__ void store_lse(const float (&m)[MT][2], const float (&l)[MT][2], float* lse_bh, int row0, int seqlen_q) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = row0 + acc_row(mt, 2 * hh);
            if (threadIdx.x % 4 == 0 && static_cast<unsigned>(r) < seqlen_q) lse_bh[r] = row_lse(m[mt][hh], l[mt][hh]);
        }
}

// O = O * out_scale / l; lse for rows in [0, seqlen_q).
template <int MT, int DT>
__device__ __forceinline__ void normalize_rows(float (&o)[MT][DT][4], const float (&m)[MT][2], const float (&l_part)[MT][2], float out_scale,
                                               float* lse_bh, int row0, int seqlen_q) {
    float l[MT][2], inv_l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            l[mt][hh] = row_sum(l_part[mt][hh]);
            inv_l[mt][hh] = output_scale(l[mt][hh], out_scale);
        }
    rescale_rows(o, inv_l);
    store_lse(m, l, lse_bh, row0, seqlen_q);
}

// On a row block's last tile, where O is then normalised by the last P V: l becomes the row sums,
// and alpha and P take out_scale / l.
template <int MT, int NT>
__device__ __forceinline__ void fold_output_scale(float (&p)[MT][NT][4], float (&l)[MT][2], float (&alpha)[MT][2], float out_scale) {
    float inv_l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            l[mt][hh] = row_sum(l[mt][hh]);
            inv_l[mt][hh] = output_scale(l[mt][hh], out_scale);
            alpha[mt][hh] *= inv_l[mt][hh];
        }
    rescale_rows(p, inv_l);
}
