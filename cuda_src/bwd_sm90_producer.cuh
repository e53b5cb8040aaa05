// The producer warpgroup of the sm_90a dK/dV CTA (bwd_sm90_cta.cuh), in three roles: thread 0
// copies K and V once and each Q_i, dO_i by TMA into the Q/dO ring; warp 1 copies lse2_i and D_i
// into the same slot (zeros past seqlen_q) and arrives on the stats ring; warp 2 adds each dQ
// tile to the float32 accumulator by one bulk reduction, then signals the converter CTAs.
#pragma once
#include "bwd_sm90_cta.cuh"

__device__ __forceinline__ void produce(const DkDvCta& cta, const TmaMaps& maps) {
    const BwdParams& params = cta.params;
    const KvBlockWork& work = cta.work;
    const int batch = cta.batch, head_k = cta.head_k, n0 = cta.n0, n_iters = cta.n_iters, kv_head = cta.kv_head;
    const unsigned bar_kv = cta.bar_kv, bar_landed = cta.bar_landed;
    const auto& q_ring = cta.q_ring;
    const auto& stats_ring = cta.stats_ring;
    elem_t *sK = cta.sK, *sV = cta.sV, *sQ = cta.sQ, *sdO = cta.sdO;
    float *sdQ = cta.sdQ, *sStats = cta.sStats;
    if (threadIdx.x == 0) {
        if (n_iters > 0) {
            ptx::mbar_arrive_expect_tx(bar_kv, kKVBytes);
            tma_load_tile<kBlockN>(sK, maps.k, n0, head_k, batch, bar_kv);
            tma_load_tile<kBlockN>(sV, maps.v, n0, head_k, batch, bar_kv);
        }
        for (int i = 0; i < n_iters; ++i) {
            q_ring.wait_empty(i);
            elem_t* slot_q = sQ + (i % kStages) * kBlockM * HEAD_DIM;
            elem_t* slot_do = sdO + (i % kStages) * kBlockM * HEAD_DIM;
            ptx::mbar_arrive_expect_tx(q_ring.full(i), kQdOBytes);
            const int m0 = work.m_block(i) * kBlockM, head = work.head(i);
            tma_load_tile<kBlockM>(slot_q, maps.q, m0, head, batch, q_ring.full(i));
            tma_load_tile<kBlockM>(slot_do, maps.o_or_do, m0, head, batch, q_ring.full(i));
        }
        // The converter CTAs' signal, given here so that its fence delays no consumer.
        ptx::mbar_wait(bar_landed, 0);
        ptx::red_release_add(params.dq_done + kv_head, 1);
    } else if (threadIdx.x / 32 == 1) {
        const int lane = threadIdx.x % 32;
        for (int i = 0; i < n_iters; ++i) {
            q_ring.wait_empty(i);
            const int m0 = work.m_block(i) * kBlockM;
            const int64 row0 = static_cast<int64>(batch * params.num_heads + work.head(i)) * params.seqlen_q_pad + m0;
            float* slot = sStats + (i % kStages) * 2 * kBlockM;
            for (int r = lane; r < kBlockM; r += 32) {
                const bool valid = m0 + r < params.seqlen_q;
                slot[r] = valid ? params.lse2[row0 + r] : 0.f;
                slot[kBlockM + r] = valid ? params.dsum[row0 + r] : 0.f;
            }
            ptx::mbar_arrive(stats_ring.full(i));
        }
    } else if (threadIdx.x / 32 == 2) {
        // The reducing warp: one bulk reduction per dQ tile, so that no consumer thread waits for
        // its issue (~470 cycles a tile at d128, in the consumer's critical path) or its reads.
        const int lane = threadIdx.x % 32;
        for (int i = 0; i < n_iters; ++i) {
            ptx::named_barrier(kDqStored, kDqBarrierThreads);
            if (lane == 0) {
                const int m0 = work.m_block(i) * kBlockM, head = work.head(i);
                ptx::bulk_reduce_add_f32(params.dq_accum + dq_accum_offset(batch * params.num_heads + head, m0, 0, params.seqlen_q, params.head_dim),
                                         sdQ, DqTile::kFloats * 4);
                ptx::bulk_commit();
                ptx::bulk_wait_read<0>();
            }
            __syncwarp();
            if (i + 1 < n_iters) ptx::named_barrier_arrive(kDqFree, kDqBarrierThreads);
        }
        if (lane == 0) {
            ptx::bulk_wait<0>();
            ptx::fence_proxy_async_global();
            ptx::mbar_arrive(bar_landed);
        }
    }
}
