// FlashAttention backward, Hopper path (sm_90a), d64 and d128: the dK/dV kernel of bwd_sm90_cta.cuh
// with Bc = 128 keys per CTA, 64 per consumer warpgroup. The row passes before and after it are
// those of the portable path (bwd_passes.cuh); d256 runs flash_bwd_sm90_split_d.cu.
//
// One CTA owns Bc = BLOCK_N keys of one (batch, kv head) and walks every (query head of the
// group, Q tile of Br = BLOCK_M rows) that sees them, in KvBlockWork's order (tile_scheduler.cuh).
// Warpgroup 0 produces: one thread copies K and V once and each Q_i, dO_i by TMA into a ring of
// STAGES slots (a "full" mbarrier each); warp 1 copies lse2_i and D_i into the same slot (zeros
// past seqlen_q) and arrives on a stats mbarrier; warp 2 issues the dQ reductions. Warpgroups
// 1..Bc/64 consume, 64 keys each; per Q tile:
//   S^T = K Q_i^T, dP^T = V dO_i^T (wgmma SS) -> P^T, dS^T in registers (softmax_backward.cuh)
//   dV += P^T dO_i (wgmma RS: P^T straight from registers); dS^T -> shared memory meanwhile
//   once every warpgroup's dS^T rows are there: dQ_i = dS K (wgmma SS with both operands k-rows
//   first), a 64-row block of it per dQ warpgroup (DqTile, bwd_passes.cuh), then dK += dS^T Q_i
//   (RS); while dK's GEMM runs, the dQ block goes to shared memory, from which producer warp 2
//   adds the tile to the float32 accumulator by one bulk reduction (cp.reduce.async.bulk
//   .add.f32); then the slot is released.
// At d64 (Br = 128) both consumer warpgroups compute a block of dQ and meet at a barrier every
// tile. At d128 (Br = 64: kSoloDq) warpgroup 0 computes the whole tile and warpgroup 1 only hands
// over its dS^T rows, so it runs ahead and the two pointwise steps no longer coincide.
// dS^T has two shared buffers, so a warpgroup writes tile i+1's while another still reads tile i's.
#include "bwd_sm90_kernel.cuh"

static_assert(!kSplitD, "flash_bwd_sm90.cu is the Bc = 128 kernel; flash_bwd_sm90_split_d.cu runs Bc = 64");

// The consumer warpgroup's loop and epilogue; with kDq it also computes its block of dQ.
template <bool kDq>
__device__ __forceinline__ void consume_keys(const DkDvCta& cta, const ConsumerThread& me) {
    const BwdParams& params = cta.params;
    const int batch = cta.batch, n0 = cta.n0, n_iters = cta.n_iters, diag = cta.diag;
    const auto& q_ring = cta.q_ring;
    const auto& stats_ring = cta.stats_ring;
    const unsigned bar_kv = cta.bar_kv, bar_landed = cta.bar_landed;
    elem_t *sK = cta.sK, *sV = cta.sV, *sdSt = cta.sdSt;
    float* sdQ = cta.sdQ;
    const int tid = me.tid, wg = me.wg, warp_key0 = me.warp_key0;
    const auto& partial = me.partial;
    const dropout::Rng rng = params.drop.rng;
    auto q_tile = [&](int i) { return cta.q_tile(i); };
    auto store_dk_dv = [&](float (&acc_dk)[1][kWgDT][4], float (&acc_dv)[1][kWgDT][4]) { store_dk_dv_of(cta, me, acc_dk, acc_dv); };
    const int dq_wg = kSoloDq ? 0 : wg;  // the dQ warpgroup: with kSoloDq, warpgroup 0
    const int dq_row0 = DqTile::row0(dq_wg), dq_col0 = DqTile::col0(dq_wg);  // this warpgroup's block of dQ
    float acc_dk[1][kWgDT][4], acc_dv[1][kWgDT][4];  // the warpgroup's 64 keys x d
    zero(acc_dk);
    zero(acc_dv);
    if (n_iters > 0) ptx::mbar_wait(bar_kv, 0);
    for (int i = 0; i < n_iters; ++i) {
        const auto [head, m0, sQi, sdOi, stats] = q_tile(i);
        elem_t* sdSti = sdSt + (i % 2) * kBlockN * kBlockM;

        // S^T = K Q_i^T, dP^T = V dO_i^T   (64 keys of this warpgroup, Br)
        float acc_s[1][kQT][4], acc_dp[1][kQT][4];
        fence_regs(acc_dk);
        fence_regs(acc_dv);
        q_ring.wait_full(i);
        stats_ring.wait_full(i);
        ptx::wgmma_fence();
        wg_gemm_abt<kBlockM, kBlockN>(acc_s[0], sK + wg * 64 * 64, sQi);
        wg_gemm_abt<kBlockM, kBlockN>(acc_dp[0], sV + wg * 64 * 64, sdOi);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        fence_regs(acc_s);
        fence_regs(acc_dp);
        softmax_backward(acc_s, acc_dp, stats, stats + kBlockM, warp_key0, 0, m0, n0, params.seqlen_k, diag,
                         tile_needs_mask(m0, n0, kBlockN, params.seqlen_k, diag), rng, batch * params.num_heads + head, params.scale_log2,
                         params.softcap_scale);

        // dV += P^T dO_i; dS^T goes to shared memory for dQ while that GEMM runs.
        unsigned pt[1][kBlockM / 16][4], dst[1][kBlockM / 16][4];
        acc_to_a_frags(pt, acc_s);
        acc_to_a_frags(dst, acc_dp);
        fence_regs(pt);
        fence_regs(dst);
        ptx::wgmma_fence();
        wg_gemm_rs<kBlockM>(acc_dv[0], pt[0], sdOi);
        ptx::wgmma_commit();
        if (!kDq && i >= 2) ptx::named_barrier(kDsFree + i % 2, kConsumerThreads);
        stmatrix_swizzled<kBlockN>(sdSti, dst, warp_key0);
        ptx::fence_proxy_async();

        if constexpr (kDq) {
            // dQ_i (block of this warpgroup) = dS K, once every warpgroup's dS^T rows are stored.
            // dK's GEMM is issued after it, so that it runs while the dQ block goes to sdQ (once
            // the last bulk reduction has read it) and is handed to the reducing warp.
            if constexpr (kSoloDq) {
                // dV's GEMM is done first: with dV, dQ and dK in flight, ptxas would serialize wgmma (C7512).
                ptx::wgmma_wait<0>();
                fence_regs(acc_dv);
                fence_regs(pt);
                ptx::named_barrier(kDsFull + i % 2, kConsumerThreads);
            } else {
                ptx::named_barrier(kConsumersSync, kConsumerThreads);
            }
            float acc_dq[1][kDqN / 8][4];
            ptx::wgmma_fence();  // acc_dq's registers were last read by the previous tile's stores
            wg_gemm_kk<kDqN, kBlockN, kBlockN>(acc_dq[0], sdSti + (dq_row0 / 64) * kBlockN * 64, sK + (dq_col0 / 64) * kBlockN * 64);
            ptx::wgmma_commit();
            wg_gemm_rs<kBlockM>(acc_dk[0], dst[0], sQi);
            ptx::wgmma_commit();
            ptx::wgmma_wait<1>();
            fence_regs(acc_dq);
            fence_regs(acc_dv);
            fence_regs(pt);
            if (kSoloDq && i + 2 < n_iters) ptx::named_barrier_arrive(kDsFree + i % 2, kConsumerThreads);

            if (i > 0) ptx::named_barrier(kDqFree, kDqBarrierThreads);
            store_dq_rows(sdQ, acc_dq[0], dq_row0 + (tid / 32) % 4 * 16, dq_col0);
            ptx::fence_proxy_async();
            ptx::named_barrier_arrive(kDqStored, kDqBarrierThreads);
        } else {
            // Warpgroup 1 with kSoloDq: hand warpgroup 0 these dS^T rows and run ahead.
            ptx::named_barrier_arrive(kDsFull + i % 2, kConsumerThreads);
            wg_gemm_rs<kBlockM>(acc_dk[0], dst[0], sQi);
            ptx::wgmma_commit();
        }
        ptx::wgmma_wait<0>();
        fence_regs(acc_dk);
        fence_regs(dst);
        if constexpr (!kDq) {
            fence_regs(acc_dv);
            fence_regs(pt);
        }
        ptx::mbar_arrive(q_ring.empty(i));  // by every thread, each after its own reads of the slot's stats
        partial.after_tile(i, acc_dk, acc_dv, tid);
    }
    if (!kDq && tid % 128 == 0) ptx::mbar_arrive(bar_landed);  // it adds no dQ (kSoloDq)
    partial.fold(n_iters, acc_dk, acc_dv, tid);
    store_dk_dv(acc_dk, acc_dv);
}

// setmaxnreg in each role's branch with kSoloDq: ptxas then allocates the two copies of the loop
// apart (4 bytes of spills at d128 against 112 with one setmaxnreg before the branch).
__device__ __forceinline__ void consume(const DkDvCta& cta) {
    if constexpr (kSoloDq) {
        const ConsumerThread me(cta.params);
        if (me.wg == 0) {
            ptx::setmaxnreg_inc<kConsumerRegs>();
            consume_keys<true>(cta, me);
        } else {
            ptx::setmaxnreg_inc<kConsumerRegs>();
            consume_keys<false>(cta, me);
        }
    } else {
        ptx::setmaxnreg_inc<kConsumerRegs>();
        consume_keys<true>(cta, ConsumerThread(cta.params));
    }
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    flash_bwd_dkdv_sm90(const __grid_constant__ BwdParams params, const __grid_constant__ TmaMaps maps) {
    dkdv_kernel<consume>(params, maps);
}
