// FlashAttention backward, Hopper path (sm_90a), d256: the dK/dV kernel of bwd_sm90_cta.cuh with
// Bc = 64 keys and Br = 32 queries per tile (kSplitD), whose two consumer warpgroups split the head
// dim instead of the keys: dK and dV of all 64 keys would need 256 registers per thread in one
// warpgroup.
// kSplitD: warpgroup 0 computes S^T = K Q_i^T and P^T, warpgroup 1 dP^T = V dO_i^T and, from
// warpgroup 0's P^T (handed over in float32 through sPx), dS^T: both m64n32 over all 64 keys
// and 32 queries, so that each reads only one of K and V (split by queries, each would read both:
// 1.6x the operand bytes of S^T and dP^T). P^T and dS^T go to shared memory, stored transposed as
// P and dS, (Br, Bc) tiles of whole 128-byte rows that wgmma reads M-major as A (P^T, dS^T) or
// K-major as B (dS^T): no operand is 32 columns wide, which no 128-byte swizzle panel describes
// read N-major. Then each warpgroup, over its own kWgCols columns of the head dim: dQ^T = K^T
// dS^T (DqTile::kTransposed), dV += P^T dO_i and dK += dS^T Q_i, all from shared memory. The two
// warpgroups meet at a barrier every tile; P and dS have two buffers, so one warpgroup writes
// tile i+1's while the other still reads tile i's.
#include "bwd_sm90_kernel.cuh"

static_assert(kSplitD, "flash_bwd_sm90_split_d.cu is the Bc = 64 kernel; flash_bwd_sm90.cu runs Bc = 128");

__device__ __forceinline__ void consume_split_d(const DkDvCta& cta) {
    ptx::setmaxnreg_inc<kConsumerRegs>();
    const BwdParams& params = cta.params;
    const int batch = cta.batch, n0 = cta.n0, n_iters = cta.n_iters, diag = cta.diag;
    const auto& q_ring = cta.q_ring;
    const auto& stats_ring = cta.stats_ring;
    const unsigned bar_kv = cta.bar_kv;
    elem_t *sK = cta.sK, *sV = cta.sV, *sdSt = cta.sdSt;
    float* sdQ = cta.sdQ;
    const ConsumerThread me(params);
    const int tid = me.tid, wg = me.wg, warp_key0 = me.warp_key0;
    const auto& partial = me.partial;
    const dropout::Rng rng = params.drop.rng;
    auto q_tile = [&](int i) { return cta.q_tile(i); };
    auto store_dk_dv = [&](float (&acc_dk)[1][kWgDT][4], float (&acc_dv)[1][kWgDT][4]) { store_dk_dv_of(cta, me, acc_dk, acc_dv); };
    elem_t* sP = cta.sP;
    float* sPx = cta.sPx;
    constexpr int kPanels = kWgCols / 64;
    const int panel0 = wg * kPanels;
    float acc_dk[1][kWgDT][4], acc_dv[1][kWgDT][4];
    zero(acc_dk);
    zero(acc_dv);
    float4* px = reinterpret_cast<float4*>(sPx) + tid % 128;  // this thread's P^T, 4 float4 128 apart
    if (n_iters > 0) ptx::mbar_wait(bar_kv, 0);
    for (int i = 0; i < n_iters; ++i) {
        const auto [head, m0, sQi, sdOi, stats] = q_tile(i);
        elem_t* sPi = sP + (i % 2) * kBlockN * kBlockM;
        elem_t* sdSi = sdSt + (i % 2) * kBlockN * kBlockM;

        float acc_x[1][kBlockM / 8][4];  // S^T (warpgroup 0), dP^T (warpgroup 1)
        fence_regs(acc_dk);
        fence_regs(acc_dv);
        q_ring.wait_full(i);
        stats_ring.wait_full(i);
        ptx::wgmma_fence();
        wg_gemm_abt<kBlockM, kBlockN>(acc_x[0], wg == 0 ? sK : sV, wg == 0 ? sQi : sdOi);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        fence_regs(acc_x);
        float signed_p[1][kBlockM / 8][4];
        if (wg == 0) {
            probs(acc_x, signed_p, stats, warp_key0, 0, m0, n0, params.seqlen_k, diag, tile_needs_mask(m0, n0, kBlockN, params.seqlen_k, diag), rng,
                  batch * params.num_heads + head, params.scale_log2, params.softcap_scale);
#pragma unroll
            for (int nt = 0; nt < kBlockM / 8; ++nt)
                px[nt * 128] = make_float4(signed_p[0][nt][0], signed_p[0][nt][1], signed_p[0][nt][2], signed_p[0][nt][3]);
            ptx::named_barrier_arrive(kPReady, kConsumerThreads);
        } else {
            ptx::named_barrier(kPReady, kConsumerThreads);
#pragma unroll
            for (int nt = 0; nt < kBlockM / 8; ++nt) {
                const float4 v = px[nt * 128];
                signed_p[0][nt][0] = v.x;
                signed_p[0][nt][1] = v.y;
                signed_p[0][nt][2] = v.z;
                signed_p[0][nt][3] = v.w;
            }
            dscores_tile(acc_x, signed_p, stats + kBlockM, 0);
        }
        unsigned frags[1][kBlockM / 16][4];
        acc_to_a_frags(frags, acc_x);
        stmatrix_t_swizzled<kBlockM>(wg == 0 ? sPi : sdSi, frags, warp_key0, 0);
        ptx::fence_proxy_async();
        ptx::named_barrier(kConsumersSync, kConsumerThreads);

        float acc_dqt[kPanels][kBlockM / 8][4];
        ptx::wgmma_fence();
#pragma unroll
        for (int p = 0; p < kPanels; ++p) wg_gemm_mk<kBlockM, kBlockN>(acc_dqt[p], sK + (panel0 + p) * kBlockN * 64, sdSi);
        ptx::wgmma_commit();
        wg_gemm_kk<kWgCols, kBlockM, kBlockM, true>(acc_dv[0], sPi, sdOi + panel0 * kBlockM * 64);
        wg_gemm_kk<kWgCols, kBlockM, kBlockM, true>(acc_dk[0], sdSi, sQi + panel0 * kBlockM * 64);
        ptx::wgmma_commit();
        ptx::wgmma_wait<1>();
        fence_regs(acc_dqt);

        // dQ^T to sdQ once the last bulk reduction has read it, then to the reducing warp (the
        // warp's 16 rows of each m64 block of dQ^T start at warp_key0, as its keys do in S^T).
        if (i > 0) ptx::named_barrier(kDqFree, kDqBarrierThreads);
#pragma unroll
        for (int p = 0; p < kPanels; ++p) store_dq_rows(sdQ, acc_dqt[p], (panel0 + p) * 64 + warp_key0, 0);
        ptx::fence_proxy_async();
        ptx::named_barrier_arrive(kDqStored, kDqBarrierThreads);
        ptx::wgmma_wait<0>();
        fence_regs(acc_dk);
        fence_regs(acc_dv);
        ptx::mbar_arrive(q_ring.empty(i));
        partial.after_tile(i, acc_dk, acc_dv, tid);
    }
    partial.fold(n_iters, acc_dk, acc_dv, tid);
    store_dk_dv(acc_dk, acc_dv);
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    flash_bwd_dkdv_sm90(const __grid_constant__ BwdParams params, const __grid_constant__ TmaMaps maps) {
    dkdv_kernel<consume_split_d>(params, maps);
}
