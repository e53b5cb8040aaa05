// FlashAttention forward, Hopper path (sm_90a): a persistent grid of CTAs, TMA loads through
// mbarrier rings, a producer warpgroup, consumer warpgroups on wgmma, and the P V of one K/V tile
// overlapping the softmax of the next.
//
// Each CTA walks (BLOCK_M, HEAD_DIM) tiles of O, one SM each, claiming units of work as it goes
// (tile_scheduler.cuh), so that one tile's epilogue runs while the next one's Q and K/V arrive.
// Warpgroup 0 is the producer: one thread claims the units and issues the TMA copies of each K
// and each V tile into rings of STAGES slots (a "full" mbarrier each), reusing a K slot once
// the consumers arrive on its "empty" mbarrier after their S, a V slot after their P V; a thread
// of another warp copies each tile's Q once the consumers are done with the previous one (have
// issued its last S, or loaded it into registers: kQInRegs). setmaxnreg gives the producer 24
// registers and the consumers the rest.
// Warpgroups 1..BLOCK_M/64 are the consumers, 64 query rows each: S = Q K^T is a wgmma reading
// the 128-byte-swizzled tiles TMA wrote (warpgroup_gemm.cuh); S comes back in registers in the
// layout the mma.sync kernel uses, so the online softmax is shared (online_softmax.cuh); O += P V
// takes P from registers. Per K/V tile t (visited from the last, masked, to the first):
//   issue S_t = Q K_t^T;  issue O += P_{t-1} V_{t-1};  wait for S_t (release K_t);  softmax of
//   S_t -> P_t (the tensor cores meanwhile run P_{t-1} V_{t-1});  wait for O (release V_{t-1});
//   O *= alpha_t.
// Without causal, the last tile's alpha and P also take 1 / l, so that O leaves the last P V
// normalised (kFoldScale).
// The consumers never wait for each other, so one's softmax or epilogue runs under another's
// GEMMs. Each warpgroup writes its rows of O with stmatrix into a shared tile that one of its
// threads copies out by TMA (O_STAGED; where that tile does not fit, d256, O goes from registers
// straight to global memory, two elements per store).
#include "online_softmax.cuh"
#include "params.cuh"
#include "tile_scheduler.cuh"
#include "warpgroup_gemm.cuh"

#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_fwd_sm90.cu needs -arch=sm_90a"
#endif

// Injected by the launcher: BLOCK_M (Br), BLOCK_N (Bc), STAGES, O_STAGED, IS_CAUSAL, IS_DROPOUT, IS_SOFTCAP.
constexpr int kBlockM = BLOCK_M;
constexpr int kBlockN = BLOCK_N;
constexpr int kStages = STAGES;
constexpr bool kStageO = O_STAGED;
constexpr int kConsumers = BLOCK_M / 64;
constexpr int kConsumerThreads = 128 * kConsumers;
constexpr int kThreads = 128 + kConsumerThreads;
constexpr int kNT = BLOCK_N / 8;
constexpr int kDT = HEAD_DIM / 8;
// Registers per thread: the launch gives every thread kLaunchRegs (65536 over the block, in
// multiples of 8); setmaxnreg moves the producer's surplus to the consumers (at most 240 each).
// 24 for the producer leaves the consumers 240 at Br = 128, which measured faster than 232 with
// 40 for the producer, whose copy thread then spills a few bytes outside its copy loop.
constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = (kLaunchRegs * kThreads - kProducerRegs * 128) / kConsumerThreads / 8 * 8 < 240
                                  ? (kLaunchRegs * kThreads - kProducerRegs * 128) / kConsumerThreads / 8 * 8
                                  : 240;
static_assert(BLOCK_M % 64 == 0, "whole warpgroups of 64 rows");
static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "wgmma n is a multiple of 8 up to 256; P V takes keys 16 at a time");
constexpr unsigned kQBytes = kBlockM * HEAD_DIM * 2, kKVBytes = kBlockN * HEAD_DIM * 2;
// Where a consumer waits for V_t, which the P V of the next iteration reads. With two consumer
// warpgroups: between the softmax of S_t and the wait for the P V in flight, so that the spin
// loop ends a basic block there; without it ptxas hoisted that wgmma wait above the softmax, and
// the softmax never overlapped the P V (bench/NOTES.md, v2.7). With three (Br = 192) the other
// two warpgroups' GEMMs already cover each softmax, and the overlap measured 2-4% slower under
// causal: V_t is waited for just before its GEMM.
constexpr bool kWaitVInSoftmax = kConsumers == 2;
// Without causal, 1 / l is folded into alpha and P on a row block's last K/V tile, so that the last
// P V leaves O normalised and the epilogue starts its stores at once: +0.3-0.7% at d128 (s = 2k,
// 4k), +0.5-1.3% at d64. Under causal the same fold measured 0.3-0.9% slower (bench/NOTES.md, v2.16).
constexpr bool kFoldScale = !IS_CAUSAL;
// Under causal the m blocks end at seqlen_q (to within 64 rows) instead of starting at row 0, so
// that a partial block is the first one, which sees the fewest keys: its rows outside
// [0, seqlen_q) cost a K/V tile or two rather than a whole row of them (d64, Br = 192, s = 2k and
// 4k: 5% of the work, +2.5-3.5%; bench/NOTES.md, v2.16). The TMA copy of Q fills rows below 0
// with zeros; a TMA store that starts below row 0 is an illegal instruction, so the shift is
// whole warpgroups of 64 rows, whose stores are skipped (cuflash/schedule.py: causal_row_shift). O
// stored from registers keeps row 0.
constexpr bool kRowsEndAligned = IS_CAUSAL && kStageO;
// With two consumer warpgroups at d <= 128, each warp holds its 16 rows of Q as wgmma A fragments
// (d / 4 registers), loaded once per tile of O: S then reads only K from shared memory, a fifth
// fewer operand bytes per K/V tile, and Q's slot is free for the next tile's Q from the start
// (+2-4% at d128; bench/NOTES.md, v2.17). At Br = 192 (160 registers) ptxas serializes the wgmma,
// d256 has no 64 registers to spare, and with dropout the Philox registers make it 2-13% slower.
constexpr bool kQInRegs = HEAD_DIM <= 128 && kConsumers == 2 && !IS_DROPOUT;

// Shared memory of a CTA: the swizzled tiles back to back (Q, the K ring, the V ring and, with
// kStageO, the staged O), then the mbarriers and the unit queue's slots. The tiles start
// 1024-byte aligned (shared_storage); the launcher's size, cuflash/plan.py forward_smem_bytes,
// is sizeof plus that alignment's slack, SMEM_BYTES.
struct SharedStorage {
    elem_t tiles[(kBlockM + 2 * kStages * kBlockN + (kStageO ? kBlockM : 0)) * HEAD_DIM];
    mbar_t q_full, q_empty;                // Q's slot
    mbar_t k_full[kStages], k_empty[kStages];
    mbar_t v_full[kStages], v_empty[kStages];
    mbar_t unit_full[2], unit_empty[2];    // the unit queue's ring (tile_scheduler.cuh)
    int units[2];                          // and its slots

    __device__ __forceinline__ elem_t* q() { return tiles; }                                      // (Br, d)
    __device__ __forceinline__ elem_t* k_ring() { return tiles + kBlockM * HEAD_DIM; }            // kStages x (Bc, d)
    __device__ __forceinline__ elem_t* v_ring() { return k_ring() + kStages * kBlockN * HEAD_DIM; }  // kStages x (Bc, d)
    __device__ __forceinline__ elem_t* o() { return v_ring() + kStages * kBlockN * HEAD_DIM; }    // (Br, d) if kStageO
};
static_assert(sizeof(SharedStorage) + kSmemAlignSlack == SMEM_BYTES, "cuflash/plan.py forward_smem_bytes disagrees with SharedStorage");

// Named barriers (bar.sync ids; 0 is __syncthreads'): kOStaged + wg, consumer warpgroup wg's
// threads around their stores of O into its rows of the staged tile.
enum NamedBarrier : int { kOStaged = 1 };

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_sm90(const __grid_constant__ FwdParams params, const __grid_constant__ TmaMaps maps) {
    SharedStorage& smem = shared_storage<SharedStorage>();
    elem_t* sQ = smem.q();
    elem_t* sK = smem.k_ring();
    elem_t* sV = smem.v_ring();
    elem_t* sO = smem.o();
    // Q's position counts the CTA's tiles of O that see a key; K/V ring position r counts K/V
    // tiles over all of them.
    const ptx::MbarRing<1> q_ring{smem_u32(&smem.q_full), smem_u32(&smem.q_empty)};
    const ptx::MbarRing<kStages> k_ring{smem_u32(smem.k_full), smem_u32(smem.k_empty)};
    const ptx::MbarRing<kStages> v_ring{smem_u32(smem.v_full), smem_u32(smem.v_empty)};
    // Read by the Q thread and every consumer thread (all arrive, so that racecheck sees each
    // read ordered before the slot is rewritten).
    constexpr unsigned kUnitReaders = 1 + kConsumerThreads;
    const UnitQueue queue{smem.units, {smem_u32(smem.unit_full), smem_u32(smem.unit_empty)}, params.unit_counter};

    const TileSchedule schedule{params.num_m_blocks, params.num_bh, params.tail_heads};
    const int diag = params.seqlen_k - params.seqlen_q;
    const int group = params.num_heads / params.num_heads_k;
    const int row_shift = kRowsEndAligned ? (params.num_m_blocks * kBlockM - params.seqlen_q) / 64 * 64 : 0;
    auto row0_of = [&](int m_block) { return m_block * kBlockM - row_shift; };  // may be < 0
    auto n_tiles_of = [&](int m_block) { return kv_blocks_visited(row0_of(m_block), kBlockM, kBlockN, params.seqlen_k, diag); };

    if (threadIdx.x == 0) {
        ptx::mbar_init(q_ring.full(0), 1);
        ptx::mbar_init(q_ring.empty(0), kConsumerThreads / 32);  // lane 0 of every consumer warp
        for (int s = 0; s < kStages; ++s) {
            ptx::mbar_init(k_ring.full(s), 1);
            ptx::mbar_init(k_ring.empty(s), kConsumerThreads / 32);
            ptx::mbar_init(v_ring.full(s), 1);
            ptx::mbar_init(v_ring.empty(s), kConsumerThreads / 32);
        }
        for (int s = 0; s < 2; ++s) {
            ptx::mbar_init(queue.ring.full(s), 1);
            ptx::mbar_init(queue.ring.empty(s), kUnitReaders);
        }
        ptx::fence_mbar_init();
    }
    __syncthreads();

    if (threadIdx.x < 128) {  // producer warpgroup
        ptx::setmaxnreg_dec<kProducerRegs>();
        if (threadIdx.x == 0) {  // K/V tiles
            int ring = 0;
            for_each_tile<true>(schedule, queue, [&](int bh, int m_block) {
                const int batch = bh / params.num_heads, head_k = bh % params.num_heads / group;
                const int n_tiles = n_tiles_of(m_block);
                for (int t = 0; t < n_tiles; ++t, ++ring) {
                    const int slot = (ring % kStages) * kBlockN * HEAD_DIM, n0 = (n_tiles - 1 - t) * kBlockN;
                    k_ring.wait_empty(ring);
                    ptx::mbar_arrive_expect_tx(k_ring.full(ring), kKVBytes);
                    tma_load_tile<kBlockN>(sK + slot, maps.k, n0, head_k, batch, k_ring.full(ring));
                    v_ring.wait_empty(ring);
                    ptx::mbar_arrive_expect_tx(v_ring.full(ring), kKVBytes);
                    tma_load_tile<kBlockN>(sV + slot, maps.v, n0, head_k, batch, v_ring.full(ring));
                }
            });
        } else if (threadIdx.x == 32) {  // Q tiles, each once the last S of the previous one is issued
            int q_tiles = 0;
            for_each_tile<false>(schedule, queue, [&](int bh, int m_block) {
                if (n_tiles_of(m_block) == 0) return;
                q_ring.wait_empty(q_tiles);
                ptx::mbar_arrive_expect_tx(q_ring.full(q_tiles), kQBytes);
                tma_load_tile<kBlockM>(sQ, maps.q, row0_of(m_block), bh % params.num_heads, bh / params.num_heads, q_ring.full(q_tiles));
                ++q_tiles;
            });
        }
        return;
    }

    ptx::setmaxnreg_inc<kConsumerRegs>();
    const int tid = threadIdx.x - 128;                // among the consumers
    const int wg = tid / 128;
    const int wg_row0 = wg * 64;                      // the warpgroup's rows of the tile
    const int warp_row0 = (tid / 32) * 16;            // the warp's rows, as in the mma C layout
    const dropout::Rng rng = params.drop.rng;
    int ring = 0, q_tiles = 0;

    for_each_tile<false>(schedule, queue, [&](int bh, int m_block) {
        const int m0 = row0_of(m_block);
        const int n_tiles = n_tiles_of(m_block);
        auto key0 = [&](int t) { return (n_tiles - 1 - t) * kBlockN; };

        float acc_o[1][kDT][4];  // this thread's part of the warpgroup's (64, d) O, unnormalised
        float m_i[1][2], l_i[1][2];
        zero(acc_o);
        m_i[0][0] = m_i[0][1] = neg_inf();
        l_i[0][0] = l_i[0][1] = 0.f;

        if (n_tiles > 0) {
            float acc_s[1][kNT][4];
            float alpha[1][2];
            unsigned p[1][kBlockN / 16][4];  // P_{t-1}: the A operand of the P V in flight
            unsigned q[1][kDT / 2][4];      // with kQInRegs: the warp's rows of Q, S's A operand
            const int r0 = ring;
            // The waits for the tiles come before the wgmma_fence: ptxas injects a fence of its own
            // into a GEMM that a spin loop separates from the last one.
            auto issue_s = [&](int t) {      // S_t = Q K_t^T
                if constexpr (kQInRegs)
                    wg_gemm_rs_abt<kBlockN>(acc_s[0], q[0], sK + ((r0 + t) % kStages) * kBlockN * HEAD_DIM);
                else
                    wg_gemm_abt<kBlockN, kBlockM>(acc_s[0], sQ + wg_row0 * 64, sK + ((r0 + t) % kStages) * kBlockN * HEAD_DIM);
                ptx::wgmma_commit();
            };
            auto issue_pv = [&](int t) {     // O += P_t V_t
                wg_gemm_rs<kBlockN>(acc_o[0], p[0], sV + ((r0 + t) % kStages) * kBlockN * HEAD_DIM);
                ptx::wgmma_commit();
            };
            auto softmax = [&](int t) {      // S_t -> P_t in place; m, l updated, alpha left for O
                fence_regs(acc_s);
                const int n0 = key0(t);
                if (IS_SOFTCAP) cap_scores(acc_s, params.softcap_scale);
                if (tile_needs_mask(m0, n0, kBlockN, params.seqlen_k, diag)) mask_scores(acc_s, m0 + warp_row0, n0, params.seqlen_k, diag);
                softmax_update(acc_s, m_i, l_i, alpha, params.scale_log2);
                if (IS_DROPOUT) drop_scores(acc_s, rng, bh, m0 + warp_row0, n0);
            };
            auto release_q = [&]() {         // every S of this tile has been read out of sQ
                q_ring.release_by_warp(q_tiles);
            };

            // The wgmma operands written by ordinary instructions (acc_o, p) are pinned before each
            // wgmma_fence, or their writes may sink past it.
            fence_regs(acc_o);
            q_ring.wait_full(q_tiles);
            if constexpr (kQInRegs) {
                ldmatrix_swizzled<kBlockM>(q, sQ, warp_row0);
                __syncwarp();
                release_q();
                fence_regs(q);
            }
            k_ring.wait_full(r0);
            ptx::wgmma_fence();
            issue_s(0);
            ptx::wgmma_wait<0>();
            k_ring.release_by_warp(r0);
            if (!kQInRegs && n_tiles == 1) release_q();
            softmax(0);
            if (kFoldScale && n_tiles == 1) fold_output_scale(acc_s, l_i, alpha, params.drop.rp_dropout);
            if (kWaitVInSoftmax) v_ring.wait_full(r0);
            acc_to_a_frags(p, acc_s);
            for (int t = 1; t < n_tiles; ++t) {
                fence_regs(acc_o);
                fence_regs(p);
                if constexpr (kQInRegs) fence_regs(q);
                k_ring.wait_full(r0 + t);
                if (!kWaitVInSoftmax) v_ring.wait_full(r0 + t - 1);
                ptx::wgmma_fence();
                issue_s(t);
                issue_pv(t - 1);
                ptx::wgmma_wait<1>();
                k_ring.release_by_warp(r0 + t);
                if (!kQInRegs && t == n_tiles - 1) release_q();
                softmax(t);
                if (kWaitVInSoftmax) v_ring.wait_full(r0 + t);
                ptx::wgmma_wait<0>();
                fence_regs(acc_o);
                fence_regs(p);
                v_ring.release_by_warp(r0 + t - 1);
                if (kFoldScale && t == n_tiles - 1) fold_output_scale(acc_s, l_i, alpha, params.drop.rp_dropout);
                rescale_rows(acc_o, alpha);
                acc_to_a_frags(p, acc_s);
            }
            fence_regs(acc_o);
            fence_regs(p);
            if (!kWaitVInSoftmax) v_ring.wait_full(r0 + n_tiles - 1);
            ptx::wgmma_fence();
            issue_pv(n_tiles - 1);
            ptx::wgmma_wait<0>();
            fence_regs(acc_o);
            fence_regs(p);
            v_ring.release_by_warp(r0 + n_tiles - 1);
            ring += n_tiles;
            ++q_tiles;
        }

        const int batch = bh / params.num_heads, head = bh % params.num_heads;
        float* lse_bh = params.lse + static_cast<int64>(bh) * params.seqlen_q;
        if (!kFoldScale) {
            normalize_rows(acc_o, m_i, l_i, params.drop.rp_dropout, lse_bh, m0 + warp_row0, params.seqlen_q);
        } else {  // l_i holds row sums: fold_output_scale's, or 0 where the block saw no key
            store_lse(m_i, l_i, lse_bh, m0 + warp_row0, params.seqlen_q);
        }
        if (kStageO) {
            // The warpgroup's rows of sO are free once its last copy has read them.
            if (tid % 128 == 0) ptx::bulk_wait_read<0>();
            ptx::named_barrier(kOStaged + wg, 128);
            stmatrix_acc_swizzled<kBlockM>(sO, acc_o, warp_row0);
            ptx::fence_proxy_async();
            ptx::named_barrier(kOStaged + wg, 128);
            if (tid % 128 == 0 && (!kRowsEndAligned || m0 + wg_row0 >= 0)) {  // TMA clips rows past seqlen_q, columns past head_dim
#pragma unroll
                for (int p = 0; p < HEAD_DIM / 64; ++p)
                    ptx::tma_store_4d(&maps.o_or_do, smem_u32(sO + p * kBlockM * 64 + wg_row0 * 64), p * 64, m0 + wg_row0, head, batch);
                ptx::bulk_commit();
            }
        } else {
            store_acc_rows(params.o + batch * params.o_batch_stride + head * params.o_head_stride + m0 * params.o_row_stride, acc_o, warp_row0,
                           params.o_row_stride, params.seqlen_q - m0, params.head_dim);
        }
    });
    if (kStageO && tid % 128 == 0) ptx::bulk_wait<0>();
}
