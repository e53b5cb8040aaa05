// FlashAttention forward, Hopper path (sm_90a): wgmma on tensor cores, with the second GEMM of
// one K/V tile overlapping the softmax of the next.
//
// One CTA computes one (BLOCK_M, HEAD_DIM) tile of O for one (batch, head) with BLOCK_M / 64
// warpgroups, 64 query rows each. Q, K and V sit in 128-byte-swizzled shared tiles
// (warpgroup_gemm.cuh) that wgmma reads directly; S = Q K^T comes back in registers, in the
// layout the mma.sync kernel uses, so the online softmax is shared (online_softmax.cuh), and
// O += P V takes P straight from registers. wgmma runs asynchronously, which gives the
// schedule of each iteration t (K/V tiles visited from the last, masked ones, to the first):
//   issue S_t = Q K_t^T;  issue O += P_{t-1} V_{t-1};  wait for S_t;  softmax of S_t -> P_t
//   (the tensor cores meanwhile run P_{t-1} V_{t-1});  wait for O;  O *= alpha_t.
// K and V stream through two-slot rings filled by cp.async: iteration t loads V_t and K_{t+1}
// into the slots that S_{t-1} and P_{t-2} V_{t-2}, both complete, have released.
#include "online_softmax.cuh"
#include "warpgroup_gemm.cuh"

#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_fwd_sm90.cu needs -arch=sm_90a"
#endif

// Injected by the launcher: BLOCK_M (Br), BLOCK_N (Bc), IS_CAUSAL, IS_DROPOUT.
constexpr int kBlockM = BLOCK_M;
constexpr int kBlockN = BLOCK_N;
constexpr int kThreads = BLOCK_M * 2;  // one warpgroup of 128 threads per 64 rows
constexpr int kNT = BLOCK_N / 8;
constexpr int kDT = HEAD_DIM / 8;
static_assert(BLOCK_M % 64 == 0, "whole warpgroups of 64 rows");
static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "wgmma n is a multiple of 8 up to 256; P V takes keys 16 at a time");

extern "C" __global__ void __launch_bounds__(kThreads, 1)
flash_fwd_sm90(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
               elem_t* __restrict__ o, float* __restrict__ lse,
               int64 q_batch_stride, int64 q_row_stride, int64 q_head_stride,
               int64 k_batch_stride, int64 k_row_stride, int64 k_head_stride,
               int64 v_batch_stride, int64 v_row_stride, int64 v_head_stride,
               int64 o_batch_stride, int64 o_row_stride, int64 o_head_stride,
               int seqlen_q, int seqlen_k, int num_heads, int num_heads_k, int head_dim,
               int num_m_blocks, float scale_log2,
               unsigned seed_lo, unsigned seed_hi, unsigned rng_offset, unsigned keep_threshold, float rp_dropout) {
    // Swizzle atoms must be 1024-byte aligned; the launcher adds 1 KB of slack.
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned misalign = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) % 1024;
    elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw + (misalign ? 1024 - misalign : 0));  // (Br, d), later O
    elem_t* sK = sQ + kBlockM * HEAD_DIM;   // 2 x (Bc, d)
    elem_t* sV = sK + 2 * kBlockN * HEAD_DIM;  // 2 x (Bc, d)

    const int bh = blockIdx.x / num_m_blocks;
    int m_block = blockIdx.x % num_m_blocks;
    if (IS_CAUSAL) m_block = num_m_blocks - 1 - m_block;
    const int batch = bh / num_heads, head = bh % num_heads;
    const int head_k = head / (num_heads / num_heads_k);
    const int m0 = m_block * kBlockM;

    const int wg_row0 = (threadIdx.x / 128) * 64;   // the warpgroup's rows of the tile
    const int warp_row0 = (threadIdx.x / 32) * 16;  // the warp's rows, as in the mma C layout

    const elem_t* gQ = q + batch * q_batch_stride + head * q_head_stride + m0 * q_row_stride;
    const elem_t* gK = k + batch * k_batch_stride + head_k * k_head_stride;
    const elem_t* gV = v + batch * v_batch_stride + head_k * v_head_stride;

    const int diag = seqlen_k - seqlen_q;
    const int n_tiles = kv_blocks_visited(m0, kBlockM, kBlockN, seqlen_k, diag);
    const dropout::Rng rng{seed_lo, seed_hi, rng_offset, keep_threshold};

    float acc_o[1][kDT][4];  // this thread's part of the warpgroup's (64, d) O, unnormalised
    float m_i[1][2], l_i[1][2];
    zero(acc_o);
    m_i[0][0] = m_i[0][1] = neg_inf();
    l_i[0][0] = l_i[0][1] = 0.f;

    if (n_tiles > 0) {
        auto key0 = [&](int t) { return (n_tiles - 1 - t) * kBlockN; };
        auto load_k = [&](int t) {
            load_tile_swizzled<kBlockN, kThreads>(sK + (t % 2) * kBlockN * HEAD_DIM, gK + key0(t) * k_row_stride,
                                                  k_row_stride, seqlen_k - key0(t), head_dim);
        };
        auto load_v = [&](int t) {
            load_tile_swizzled<kBlockN, kThreads>(sV + (t % 2) * kBlockN * HEAD_DIM, gV + key0(t) * v_row_stride,
                                                  v_row_stride, seqlen_k - key0(t), head_dim);
        };
        // S_t = Q K_t^T, issued; the caller commits.
        float acc_s[1][kNT][4];
        auto issue_s = [&](int t) {
            wg_gemm_abt<kBlockN, kBlockM>(acc_s[0], sQ + wg_row0 * 64, sK + (t % 2) * kBlockN * HEAD_DIM);
        };
        // S_t -> P_t in place, with m, l updated; returns nothing, leaves alpha for O.
        float alpha[1][2];
        auto softmax = [&](int t) {
            const int n0 = key0(t);
            if (tile_needs_mask(m0, n0, kBlockN, seqlen_k, diag)) mask_scores(acc_s, m0 + warp_row0, n0, seqlen_k, diag);
            softmax_update(acc_s, m_i, l_i, alpha, scale_log2);
            if (IS_DROPOUT) drop_scores(acc_s, rng, bh, m0 + warp_row0, n0);
        };
        // A landed cp.async group made visible to every thread and to the tensor cores.
        auto sync_tiles = [] {
            ptx::cp_async_wait<0>();
            ptx::fence_proxy_async();
            __syncthreads();
        };

        // Prologue: group {Q, K_0}, then group {V_0, K_1}; S_0 and its softmax.
        load_tile_swizzled<kBlockM, kThreads>(sQ, gQ, q_row_stride, seqlen_q - m0, head_dim);
        load_k(0);
        ptx::cp_async_commit();
        load_v(0);
        if (n_tiles > 1) load_k(1);
        ptx::cp_async_commit();
        ptx::cp_async_wait<1>();
        ptx::fence_proxy_async();
        __syncthreads();
        ptx::wgmma_fence();
        issue_s(0);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        fence_regs(acc_s);
        softmax(0);
        unsigned p[1][kBlockN / 16][4];  // P_{t-1}: the A operand of the P V in flight
        acc_to_a_frags(p, acc_s);

        for (int t = 1; t < n_tiles; ++t) {
            sync_tiles();  // K_t and V_{t-1} landed; S_{t-1} and P_{t-2} V_{t-2} done in every warpgroup
            load_v(t);
            if (t + 1 < n_tiles) load_k(t + 1);
            ptx::cp_async_commit();

            ptx::wgmma_fence();
            issue_s(t);
            ptx::wgmma_commit();
            wg_gemm_pv<kBlockN>(acc_o[0], p[0], sV + ((t - 1) % 2) * kBlockN * HEAD_DIM);
            ptx::wgmma_commit();
            ptx::wgmma_wait<1>();
            fence_regs(acc_s);
            softmax(t);
            ptx::wgmma_wait<0>();
            fence_regs(acc_o);
            fence_regs(p);
            rescale_rows(acc_o, alpha);
            acc_to_a_frags(p, acc_s);
        }

        sync_tiles();  // V_last landed
        ptx::wgmma_fence();
        wg_gemm_pv<kBlockN>(acc_o[0], p[0], sV + ((n_tiles - 1) % 2) * kBlockN * HEAD_DIM);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        fence_regs(acc_o);
        fence_regs(p);
    }

    // Each warp stages only its own rows of sQ, whose readers (this warpgroup's wgmma) are done.
    normalize_rows(acc_o, m_i, l_i, rp_dropout, lse + static_cast<int64>(bh) * seqlen_q, m0 + warp_row0, seqlen_q);
    store_acc_swizzled<kBlockM>(sQ, acc_o, warp_row0);
    __syncthreads();
    store_tile_swizzled<kBlockM, kThreads>(o + batch * o_batch_stride + head * o_head_stride + m0 * o_row_stride,
                                           sQ, o_row_stride, seqlen_q - m0, head_dim);
}
