// FlashAttention backward, portable path for sm_80+ (mma.sync, ldmatrix, cp.async).
//
// flash_bwd_preprocess  D = rowsum(dO * O); lse2 = lse * log2(e) (+inf where lse = -inf, so that
//                       P = 0 there).
// flash_bwd_dkdv        one CTA per (K/V tile j, batch, kv head). K_j and V_j stay in shared
//                       memory; the CTA walks every query head of its kv head's group and every Q
//                       tile i that can see tile j, in KvBlockWork's order (tile_scheduler.cuh),
//                       with Q_i, dO_i, lse2_i, D_i double-buffered, and recomputes P from the
//                       saved LSE instead of storing it:
//                         S^T = K_j Q_i^T     P^T = exp2(S^T * scale_log2 - lse2_i)
//                         dP^T = V_j dO_i^T   dS^T = P^T * (dP^T - D_i)
//                         dV_j += P^T dO_i    dK_j += dS^T Q_i    (dK_j scaled once at the end)
//                       With DQ_ATOMIC it also adds dQ_i += dS K_j into the float32 accumulator.
// flash_bwd_convert_dq  dQ = scale * accumulator, in the input type and the caller's strides.
// flash_bwd_dq          the deterministic dQ (DQ_ATOMIC = 0): one CTA per (Q tile, batch, head)
//                       walks the K/V tiles like the forward and sums dS_ij K_j in registers.
//
// IS_DROPOUT: every (Q tile, K/V tile) pair regenerates the forward's keep bits Z. With the
// 1 / (1 - p) of the kept values factored out of the loops (cuflash/reference.py derives it):
//     dV = 1/(1-p) (P * Z)^T dO      dS' = P * (dP * Z - D'),  D' = (1 - p) D
// so the kernels accumulate (P * Z)^T dO and dS', and the launcher folds 1 / (1 - p) into the
// scales of dV (rp_dropout) and of dK and dQ (scale = softmax_scale / (1 - p)); the preprocess
// writes D' (d_scale = 1 - p).
#include "softmax_backward.cuh"
#include "tile_scheduler.cuh"
#include "bwd_passes.cuh"
#include "dkdv_partial.cuh"
#include "params.cuh"

// Injected by the launcher: BLOCK_M (Br, query rows), BLOCK_N (Bc, keys), NWARPS, SDP_WM, KV_WM,
// DQ_WM (warps along the rows of each GEMM), DQ_ATOMIC, DQ_BLOCK_N (keys per flash_bwd_dq tile),
// IS_CAUSAL, IS_DROPOUT, IS_SOFTCAP.
constexpr int kBlockM = BLOCK_M;
constexpr int kBlockN = BLOCK_N;
constexpr int kThreads = NWARPS * 32;
constexpr int kPitchP = BLOCK_M + 8;  // rows of the P^T and dS^T tiles: Br query columns, padded
// Shared memory of flash_bwd_dkdv (cuflash/plan.py backward_smem_bytes): K, V, Q and dO twice, P^T,
// dS^T, and lse2 and D twice; the layout is written out at the top of the kernel.
static_assert((2 * kBlockN + 4 * kBlockM) * kPitch * sizeof(elem_t) + 2 * kBlockN * kPitchP * sizeof(elem_t) + 4 * kBlockM * sizeof(float) ==
                  SMEM_BYTES,
              "cuflash/plan.py backward_smem_bytes disagrees with flash_bwd_dkdv's layout");

// Warp grids over each GEMM's output: WM warps along its rows, NWARPS / WM along its columns.
// Square-ish warp blocks read fewer operand bytes from shared memory, which bounds this kernel.
template <int ROWS, int COLS, int WM>
struct WarpGrid {
    static constexpr int kWN = NWARPS / WM;
    static constexpr int kMT = ROWS / WM / 16, kNT = COLS / kWN / 8;  // m16 / n8 tiles per warp
    static_assert(WM * kWN == NWARPS && kMT * WM * 16 == ROWS && kNT * kWN * 8 == COLS && kNT % 2 == 0,
                  "the warps must tile the output in m16 x n16 pieces");
    __device__ static int row0() { return (threadIdx.x / 32) % WM * kMT * 16; }
    __device__ static int col0() { return (threadIdx.x / 32) / WM * kNT * 8; }
};
typedef WarpGrid<kBlockN, kBlockM, SDP_WM> GridSdP;  // S^T, dP^T: (Bc, Br)
typedef WarpGrid<kBlockN, HEAD_DIM, KV_WM> GridKV;   // dK, dV: (Bc, d)
typedef WarpGrid<kBlockM, HEAD_DIM, DQ_WM> GridDQ;   // dQ: (Br, d)

// Br floats of a (batch, head) row of lse2 or D (rows seqlen_q_pad apart, 16-byte aligned), rows
// past seqlen_q zero-filled.
__device__ __forceinline__ void load_row_stats_async(float* s, const float* g, int rows_valid) {
    for (int i = threadIdx.x; i < kBlockM / 4; i += kThreads) {
        const int valid = max(0, min(4, rows_valid - 4 * i));
        ptx::cp_async_16(s + 4 * i, valid ? g + 4 * i : g, valid * 4);
    }
}

extern "C" __global__ void __launch_bounds__(kThreads) flash_bwd_dkdv(const __grid_constant__ BwdParams params) {
    extern __shared__ __align__(16) unsigned char smem[];
    elem_t* sK = reinterpret_cast<elem_t*>(smem);  // (Bc, d), later the staging tile of dK
    elem_t* sV = sK + kBlockN * kPitch;             // (Bc, d), later the staging tile of dV
    elem_t* sQ = sV + kBlockN * kPitch;             // 2 x (Br, d)
    elem_t* sdO = sQ + 2 * kBlockM * kPitch;        // 2 x (Br, d)
    elem_t* sPt = sdO + 2 * kBlockM * kPitch;       // (Bc, Br): P^T
    elem_t* sdSt = sPt + kBlockN * kPitchP;         // (Bc, Br): dS^T
    float* sLse2 = reinterpret_cast<float*>(sdSt + kBlockN * kPitchP);  // 2 x Br
    float* sDsum = sLse2 + 2 * kBlockM;                                      // 2 x Br

    const KvBlockWork work(blockIdx.x, params.num_n_blocks, params.num_heads, params.num_heads_k, params.seqlen_q, params.seqlen_k, kBlockM, kBlockN);
    const int batch = work.batch, head_k = work.head_k, n0 = work.n0, n_iters = work.n_iters;
    const int diag = params.seqlen_k - params.seqlen_q;

    const elem_t* gK = params.k + batch * params.k_batch_stride + head_k * params.k_head_stride;
    const elem_t* gV = params.v + batch * params.v_batch_stride + head_k * params.v_head_stride;
    // Q_i, dO_i, lse2_i, D_i of iteration `it` into buffer `stage`.
    auto load_q_tile = [&](int it, int stage) {
        const int head = work.head(it), m0 = work.m_block(it) * kBlockM;
        const int64 stats = static_cast<int64>(batch * params.num_heads + head) * params.seqlen_q_pad + m0;
        load_tile_async<kBlockM, kThreads>(sQ + stage * kBlockM * kPitch,
                                           params.q + batch * params.q_batch_stride + head * params.q_head_stride + m0 * params.q_row_stride,
                                           params.q_row_stride, params.seqlen_q - m0, params.head_dim);
        load_tile_async<kBlockM, kThreads>(sdO + stage * kBlockM * kPitch,
                                           params.dout + batch * params.do_batch_stride + head * params.do_head_stride + m0 * params.do_row_stride,
                                           params.do_row_stride, params.seqlen_q - m0, params.head_dim);
        load_row_stats_async(sLse2 + stage * kBlockM, params.lse2 + stats, params.seqlen_q - m0);
        load_row_stats_async(sDsum + stage * kBlockM, params.dsum + stats, params.seqlen_q - m0);
    };

    load_kv_tile<kBlockN, kThreads>(sK, sV, gK, gV, params.k_row_stride, params.v_row_stride, n0, params.seqlen_k, params.head_dim);
    if (n_iters > 0) load_q_tile(0, 0);
    ptx::cp_async_commit();

    float acc_dk[GridKV::kMT][GridKV::kNT][4], acc_dv[GridKV::kMT][GridKV::kNT][4];
    zero(acc_dk);
    zero(acc_dv);
    static_assert(GridKV::kMT * GridKV::kNT * 4 * kThreads == kBlockN * HEAD_DIM, "the warps hold (Bc, d) once");
    const DkDvPartial<kThreads> partial{params.dkdv_partial + static_cast<int64>(blockIdx.x) * 2 * kBlockN * HEAD_DIM, params.flush_every};

    for (int it = 0; it < n_iters; ++it) {
        const int stage = it % 2;
        const int head = work.head(it), m0 = work.m_block(it) * kBlockM;
        // Tile i has landed; every warp is done with iteration i-1 (its buffers and sPt, sdSt).
        ptx::cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < n_iters) load_q_tile(it + 1, stage ^ 1);
        ptx::cp_async_commit();
        const elem_t* sQi = sQ + stage * kBlockM * kPitch;
        const elem_t* sdOi = sdO + stage * kBlockM * kPitch;
        const float* sLse2i = sLse2 + stage * kBlockM;
        const float* sDsumi = sDsum + stage * kBlockM;

        {
            const int r0 = GridSdP::row0(), c0 = GridSdP::col0();
            // S^T = K_j Q_i^T   (Bc, Br)
            float acc_s[GridSdP::kMT][GridSdP::kNT][4];
            zero(acc_s);
            warp_gemm_ss<GridSdP::kMT, GridSdP::kNT, HEAD_DIM, false, false>(acc_s, sK + r0 * kPitch, kPitch, sQi + c0 * kPitch, kPitch);
            // dP^T = V_j dO_i^T   (Bc, Br)
            float acc_dp[GridSdP::kMT][GridSdP::kNT][4];
            zero(acc_dp);
            warp_gemm_ss<GridSdP::kMT, GridSdP::kNT, HEAD_DIM, false, false>(acc_dp, sV + r0 * kPitch, kPitch, sdOi + c0 * kPitch, kPitch);
            softmax_backward(acc_s, acc_dp, sLse2i, sDsumi, r0, c0, m0, n0, params.seqlen_k, diag,
                             tile_needs_mask(m0, n0, kBlockN, params.seqlen_k, diag), params.drop.rng, batch * params.num_heads + head,
                             params.scale_log2, params.softcap_scale);
            store_acc(sPt + r0 * kPitchP + c0, kPitchP, acc_s, 1.f);
            store_acc(sdSt + r0 * kPitchP + c0, kPitchP, acc_dp, 1.f);
        }
        __syncthreads();

        // dV_j += P^T dO_i;  dK_j += dS^T Q_i   (Bc, d)
        {
            const int r0 = GridKV::row0(), c0 = GridKV::col0();
            warp_gemm_ss<GridKV::kMT, GridKV::kNT, kBlockM, false, true>(acc_dv, sPt + r0 * kPitchP, kPitchP, sdOi + c0, kPitch);
            warp_gemm_ss<GridKV::kMT, GridKV::kNT, kBlockM, false, true>(acc_dk, sdSt + r0 * kPitchP, kPitchP, sQi + c0, kPitch);
        }
        if (DQ_ATOMIC) {
            // dQ_i += dS K_j   (Br, d), added to the float32 accumulator
            const int r0 = GridDQ::row0(), c0 = GridDQ::col0();
            float acc_dq[GridDQ::kMT][GridDQ::kNT][4];
            zero(acc_dq);
            warp_gemm_ss<GridDQ::kMT, GridDQ::kNT, kBlockN, true, true>(acc_dq, sdSt + r0, kPitchP, sK + c0, kPitch);
            float* gdq = params.dq_accum + dq_accum_offset(batch * params.num_heads + head, m0, 0, params.seqlen_q, params.head_dim);
#pragma unroll
            for (int mt = 0; mt < GridDQ::kMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < GridDQ::kNT; ++nt)
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int row = r0 + acc_row(mt, 2 * hh), col = c0 + acc_col(nt, 0);
                        if (m0 + row < params.seqlen_q && col < params.head_dim)
                            ptx::red_add_f32x2(gdq + static_cast<int64>(row) * params.head_dim + col, acc_dq[mt][nt][2 * hh],
                                               acc_dq[mt][nt][2 * hh + 1]);
                    }
        }
        partial.after_tile(it, acc_dk, acc_dv, threadIdx.x);
    }
    partial.fold(n_iters, acc_dk, acc_dv, threadIdx.x);

    // dK_j = scale * acc_dk, dV_j = acc_dv, staged through sK and sV once every warp is done and
    // no copy is in flight (with no Q tile to visit, the loads of K and V were never waited on).
    ptx::cp_async_wait<0>();
    __syncthreads();
    {
        const int r0 = GridKV::row0(), c0 = GridKV::col0();
        store_acc(sK + r0 * kPitch + c0, kPitch, acc_dk, params.ds_scale);
        store_acc(sV + r0 * kPitch + c0, kPitch, acc_dv, params.drop.rp_dropout);
    }
    __syncthreads();
    store_tile<kBlockN, kThreads>(params.dk + batch * params.dk_batch_stride + head_k * params.dk_head_stride + n0 * params.dk_row_stride, sK,
                                  params.dk_row_stride, params.seqlen_k - n0, params.head_dim);
    store_tile<kBlockN, kThreads>(params.dv + batch * params.dv_batch_stride + head_k * params.dv_head_stride + n0 * params.dv_row_stride, sV,
                                  params.dv_row_stride, params.seqlen_k - n0, params.head_dim);
}

// ---- deterministic dQ: each warp owns 16 query rows, K/V tiles of DQ_BLOCK_N keys stream through
// a 2-stage ring as in the forward.
constexpr int kDqBlockN = DQ_BLOCK_N;
constexpr int kDqThreads = kBlockM / 16 * 32;
constexpr int kDqNT = DQ_BLOCK_N / 8;
constexpr int kDT = HEAD_DIM / 8;
// Shared memory of flash_bwd_dq (cuflash/plan.py backward_dq_smem_bytes): Q, dO and the 2-slot K and V rings.
static_assert((2 * kBlockM + 4 * kDqBlockN) * kPitch * sizeof(elem_t) == DQ_SMEM_BYTES,
              "cuflash/plan.py backward_dq_smem_bytes disagrees with flash_bwd_dq's layout");

extern "C" __global__ void __launch_bounds__(kDqThreads) flash_bwd_dq(const __grid_constant__ BwdParams params) {
    extern __shared__ __align__(16) unsigned char smem[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem);  // (Br, d), later the staging tile of dQ
    elem_t* sdO = sQ + kBlockM * kPitch;            // (Br, d)
    elem_t* sK = sdO + kBlockM * kPitch;            // 2 x (Bc, d)
    elem_t* sV = sK + 2 * kDqBlockN * kPitch;       // 2 x (Bc, d)

    const int bh = blockIdx.x / params.num_m_blocks;
    int m_block = blockIdx.x % params.num_m_blocks;
    if (IS_CAUSAL) m_block = params.num_m_blocks - 1 - m_block;  // heaviest first
    const int batch = bh / params.num_heads, head = bh % params.num_heads;
    const int head_k = head / (params.num_heads / params.num_heads_k);
    const int m0 = m_block * kBlockM, diag = params.seqlen_k - params.seqlen_q;
    const int warp_row0 = (threadIdx.x / 32) * 16;
    const elem_t* gK = params.k + batch * params.k_batch_stride + head_k * params.k_head_stride;
    const elem_t* gV = params.v + batch * params.v_batch_stride + head_k * params.v_head_stride;
    const int n_block_max = kv_blocks_visited(m0, kBlockM, kDqBlockN, params.seqlen_k, diag);

    // params.lse2 and D of this thread's two rows
    float row_lse2[2], row_dsum[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = m0 + warp_row0 + acc_row(0, 2 * hh);
        const int64 i = static_cast<int64>(bh) * params.seqlen_q_pad + r;
        row_lse2[hh] = r < params.seqlen_q ? params.lse2[i] : 0.f;
        row_dsum[hh] = r < params.seqlen_q ? params.dsum[i] : 0.f;
    }

    load_tile_async<kBlockM, kDqThreads>(sQ, params.q + batch * params.q_batch_stride + head * params.q_head_stride + m0 * params.q_row_stride,
                                         params.q_row_stride, params.seqlen_q - m0, params.head_dim);
    load_tile_async<kBlockM, kDqThreads>(sdO, params.dout + batch * params.do_batch_stride + head * params.do_head_stride + m0 * params.do_row_stride,
                                         params.do_row_stride, params.seqlen_q - m0, params.head_dim);
    if (n_block_max > 0)
        load_kv_tile<kDqBlockN, kDqThreads>(sK, sV, gK, gV, params.k_row_stride, params.v_row_stride, 0, params.seqlen_k, params.head_dim);
    ptx::cp_async_commit();

    float acc_dq[1][kDT][4];
    zero(acc_dq);
    for (int n_block = 0; n_block < n_block_max; ++n_block) {
        const int n0 = n_block * kDqBlockN, stage = n_block % 2;
        ptx::cp_async_wait<0>();
        __syncthreads();
        if (n_block + 1 < n_block_max)
            load_kv_tile<kDqBlockN, kDqThreads>(sK + (stage ^ 1) * kDqBlockN * kPitch, sV + (stage ^ 1) * kDqBlockN * kPitch, gK, gV,
                                                params.k_row_stride, params.v_row_stride, n0 + kDqBlockN, params.seqlen_k, params.head_dim);
        ptx::cp_async_commit();
        const elem_t* sKj = sK + stage * kDqBlockN * kPitch;
        const elem_t* sVj = sV + stage * kDqBlockN * kPitch;

        // S = Q_i K_j^T, dP = dO_i V_j^T   (16 rows of this warp, Bc)
        float acc_s[1][kDqNT][4], acc_dp[1][kDqNT][4];
        zero(acc_s);
        zero(acc_dp);
        warp_gemm_ss<1, kDqNT, HEAD_DIM, false, false>(acc_s, sQ + warp_row0 * kPitch, kPitch, sKj, kPitch);
        warp_gemm_ss<1, kDqNT, HEAD_DIM, false, false>(acc_dp, sdO + warp_row0 * kPitch, kPitch, sVj, kPitch);
        // dS = P * (dP - D) with P = exp2(S * params.scale_log2 - params.lse2), 0 where invisible
        // (dS' = P * (dP * Z - D') with dropout; times the cap's derivative with softcap)
        const bool need_mask = tile_needs_mask(m0, n0, kDqBlockN, params.seqlen_k, diag);
        const dropout::Rng rng = params.drop.rng;
#pragma unroll
        for (int nt = 0; nt < kDqNT; ++nt) {
            const unsigned keep = IS_DROPOUT ? dropout::keep_bits_qk(rng, bh, m0 + warp_row0, n0 + nt * 8) : 0xfu;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + warp_row0 + acc_row(0, e), key = n0 + acc_col(nt, e);
                float dcap = 1.f;
                float p = recomputed_prob(acc_s[0][nt][e], params.scale_log2, row_lse2[e / 2], params.softcap_scale, dcap);
                if (need_mask && !visible(row, key, params.seqlen_k, diag)) p = 0.f;
                const float ds = p * ((keep >> e & 1 ? acc_dp[0][nt][e] : 0.f) - row_dsum[e / 2]);
                acc_dp[0][nt][e] = IS_SOFTCAP ? ds * dcap : ds;
            }
        }
        // dQ_i += dS K_j
        unsigned ds[1][kDqBlockN / 16][4];
        acc_to_a_frags(ds, acc_dp);
        warp_gemm_rs<1, kDT, kDqBlockN, true>(acc_dq, ds, sKj, kPitch);
    }

    // Stage dQ in sQ once no copy is in flight (with no K/V tile to visit, the load of Q was never
    // waited on); each warp stages only its own rows.
    ptx::cp_async_wait<0>();
    __syncthreads();
    store_acc(sQ + warp_row0 * kPitch, kPitch, acc_dq, params.ds_scale);
    __syncthreads();
    store_tile<kBlockM, kDqThreads>(params.dq + batch * params.dq_batch_stride + head * params.dq_head_stride + m0 * params.dq_row_stride, sQ,
                                    params.dq_row_stride, params.seqlen_q - m0, params.head_dim);
}
