// The sm_90a dK/dV CTA, shared by its two kernel files: flash_bwd_sm90.cu (Bc = 128: d64, d128)
// and flash_bwd_sm90_split_d.cu (Bc = 64: d256). Here: the CTA's constants, shared storage and
// named barriers, and DkDvCta, the state every role reads; the producer warpgroup's roles are in
// bwd_sm90_producer.cuh, the converter CTAs in bwd_sm90_converter.cuh. The dK/dV kernel adds dQ
// by bulk reductions, on wgmma with TMA loads; the row passes before and after it are those of the
// portable path (bwd_passes.cuh). The algorithm and the dropout algebra are flash_bwd.cu's.
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
// At d256 (Bc = 64, Br = 32: kSplitD) the consumer warpgroups split the head dim instead of the
// keys, and S^T and dP^T by role (flash_bwd_sm90_split_d.cu).
// One bulk reduction per dQ tile replaces 16-32 red.global.add.v2 per thread, which cost 30-40%
// of the kernel's time (bench/NOTES.md, v2.4, v2.5; 7-13% at d128 again in v2.17). Its issue
// stalls the issuing thread ~470 cycles, hence a warp of its own (+4-10% at d128, v2.17).
#pragma once
#include "softmax_backward.cuh"
#include "tile_scheduler.cuh"
#include "warpgroup_gemm.cuh"
#include "bwd_passes.cuh"
#include "dkdv_partial.cuh"
#include "params.cuh"

#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "the sm_90a backward needs -arch=sm_90a"
#endif

// Injected by the launcher: BLOCK_M (Br, queries), BLOCK_N (Bc, keys), STAGES, IS_CAUSAL, IS_DROPOUT,
// IS_SOFTCAP.
constexpr int kBlockM = BLOCK_M;
constexpr int kBlockN = BLOCK_N;
constexpr int kStages = STAGES;
// At d256 (Bc = 64, Br = 32: kSplitD) the two consumer warpgroups split the head dim instead of the
// keys: dK and dV of all 64 keys would need 256 registers per thread in one warpgroup.
constexpr bool kSplitD = BLOCK_N == 64;
constexpr int kConsumers = 2;
constexpr int kWgCols = kSplitD ? HEAD_DIM / 2 : HEAD_DIM;  // columns of dK and dV per warpgroup
constexpr int kWgDT = kWgCols / 8;
constexpr int kConsumerThreads = 128 * kConsumers;
constexpr int kThreads = 128 + kConsumerThreads;
constexpr int kQT = BLOCK_M / 8;   // n8 tiles of queries in S^T
constexpr int kDqN = DqTile::kCols;
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;
// At d128 (Br = 64, DqTile::kWarpgroups = 1) warpgroup 0 alone computes dQ, as m64n128 GEMMs over
// both warpgroups' keys: named barriers kDsFull + b and kDsFree + b then replace kConsumersSync in
// the loop, so that warpgroup 1 runs up to a tile ahead and the two pointwise steps drift apart.
constexpr bool kSoloDq = DqTile::kWarpgroups < kConsumers;
// Named barriers (bar.sync ids; 0 is __syncthreads'):
//   kConsumersSync   every consumer thread
//   kDqStored        a tile's dQ block is in sdQ (the dQ warpgroups, then the reducing warp waits)
//   kDqFree          its bulk reduction has read sdQ (the reducing warp, then the dQ warpgroups wait)
//   kDsFull + b      kSoloDq: warpgroup 1's dS^T rows are in buffer b
//   kDsFree + b      kSoloDq: warpgroup 0's dQ GEMM has read buffer b
//   kPReady          kSplitD: warpgroup 0's P^T is in sPx
enum NamedBarrier : int { kConsumersSync = 1, kDqStored = 2, kDqFree = 3, kDsFull = 4, kDsFree = 6, kPReady = 8 };
constexpr int kDqBarrierThreads = DqTile::kWarpgroups * 128 + 32;
template <bool B>
struct Flag {
    static constexpr bool value = B;
};
constexpr int kInStep = IS_CAUSAL ? 1 : 2;  // CTAs that walk their Q tiles in step (KvBlockWork's pair)
static_assert(kSplitD ? BLOCK_M == 32 && kWgCols % 64 == 0 : BLOCK_N == 128 && BLOCK_M % 64 == 0 && kDqN % 64 == 0,
              "two consumer warpgroups of 64 keys and dQ blocks of whole 64-row, 64-column panels, or of 64-column panels "
              "of dK, dV and dQ^T");
constexpr unsigned kKVBytes = 2 * kBlockN * HEAD_DIM * 2, kQdOBytes = 2 * kBlockM * HEAD_DIM * 2;
constexpr int kPtBuffers = kSplitD ? 2 : 0;  // P^T leaves registers only with kSplitD
constexpr int kPxFloats = kSplitD ? kBlockN * kBlockM : 0;  // kSplitD: P^T handed from warpgroup 0 to 1

// Shared memory of a dK/dV CTA: its 16-bit tiles back to back, then its float32 ones, then the
// mbarriers. The tiles start 1024-byte aligned (shared_storage); the launcher's size,
// cuflash/plan.py backward_smem_bytes, is sizeof plus that alignment's slack, SMEM_BYTES.
struct SharedStorage {
    elem_t tiles[(2 * kBlockN + 2 * kStages * kBlockM) * HEAD_DIM + (2 + kPtBuffers) * kBlockN * kBlockM];
    float floats[kPxFloats + DqTile::kFloats + kStages * 2 * kBlockM];
    mbar_t kv_full;                                                  // K and V have landed
    mbar_t q_full[kStages], stats_full[kStages], q_empty[kStages];   // the Q/dO ring; its stats share q_empty
    mbar_t dq_landed;                                                // the dQ reductions have landed

    __device__ __forceinline__ elem_t* k() { return tiles; }                                        // (Bc, d), later dK
    __device__ __forceinline__ elem_t* v() { return tiles + kBlockN * HEAD_DIM; }                   // (Bc, d), later dV
    __device__ __forceinline__ elem_t* q_ring() { return tiles + 2 * kBlockN * HEAD_DIM; }          // kStages x (Br, d)
    __device__ __forceinline__ elem_t* do_ring() { return q_ring() + kStages * kBlockM * HEAD_DIM; }  // kStages x (Br, d)
    // 2 x dS^T (Bc, Br); with kSplitD 2 x dS (Br, Bc)
    __device__ __forceinline__ elem_t* dst() { return do_ring() + kStages * kBlockM * HEAD_DIM; }
    __device__ __forceinline__ elem_t* p() { return dst() + 2 * kBlockN * kBlockM; }  // kPtBuffers x P (Br, Bc)
    __device__ __forceinline__ float* px() { return floats; }                         // kPxFloats
    __device__ __forceinline__ float* dq() { return floats + kPxFloats; }             // a DqTile
    __device__ __forceinline__ float* stats() { return dq() + DqTile::kFloats; }      // kStages x (lse2, D) x Br
};
static_assert(sizeof(SharedStorage) + kSmemAlignSlack == SMEM_BYTES, "cuflash/plan.py backward_smem_bytes disagrees with SharedStorage");

// One warp's rows r0 .. r0 + 15 of a block of the dQ tile as computed (dQ^T with
// DqTile::kTransposed), columns c0 .., into the shared tile sdq, two floats per store.
template <int NT>
__device__ __forceinline__ void store_dq_rows(float* sdq, const float (&acc)[NT][4], int r0, int c0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
            *reinterpret_cast<float2*>(sdq + DqTile::computed_offset(r0 + acc_row(0, 2 * hh), c0 + acc_col(nt, 0))) =
                make_float2(acc[nt][2 * hh], acc[nt][2 * hh + 1]);
}

// What every role of a dK/dV CTA reads: the parameters, the shared tiles and rings, and the CTA's
// work (KvBlockWork). The constructor initialises the mbarriers (thread 0) and syncs the CTA.
struct DkDvCta {
    const BwdParams& params;
    elem_t *sK, *sV, *sQ, *sdO, *sdSt, *sP;
    float *sPx, *sdQ, *sStats;
    unsigned bar_kv, bar_landed;  // K and V have landed; the dQ reductions have landed
    // Q_i and dO_i land on q_ring's full barrier, lse2_i and D_i (written by the producer's
    // stats warp) on stats_ring's; the two rings share their empty barriers.
    ptx::MbarRing<kStages> q_ring, stats_ring;
    KvBlockWork work;
    int batch, head_k, n0, n_iters, diag, kv_head;

    __device__ __forceinline__ explicit DkDvCta(const BwdParams& p, SharedStorage& smem = shared_storage<SharedStorage>())
        : params(p),
          sK(smem.k()),
          sV(smem.v()),
          sQ(smem.q_ring()),
          sdO(smem.do_ring()),
          sdSt(smem.dst()),
          sP(smem.p()),
          sPx(smem.px()),
          sdQ(smem.dq()),
          sStats(smem.stats()),
          bar_kv(smem_u32(&smem.kv_full)),
          bar_landed(smem_u32(&smem.dq_landed)),
          q_ring{smem_u32(smem.q_full), smem_u32(smem.q_empty)},
          stats_ring{smem_u32(smem.stats_full), smem_u32(smem.q_empty)},
          work(blockIdx.x, p.num_n_blocks, p.num_heads, p.num_heads_k, p.seqlen_q, p.seqlen_k, kBlockM, kBlockN, kInStep),
          batch(work.batch),
          head_k(work.head_k),
          n0(work.n0),
          n_iters(work.n_iters),
          diag(p.seqlen_k - p.seqlen_q),
          kv_head(blockIdx.x / p.num_n_blocks) {
        if (threadIdx.x == 0) {
            ptx::mbar_init(bar_kv, 1);
            for (int s = 0; s < kStages; ++s) {
                ptx::mbar_init(q_ring.full(s), 1);
                ptx::mbar_init(stats_ring.full(s), 32);
                ptx::mbar_init(q_ring.empty(s), kConsumerThreads);
            }
            ptx::mbar_init(bar_landed, kConsumers - DqTile::kWarpgroups + 1);  // the reducing warp, the other consumers
            ptx::fence_mbar_init();
        }
        __syncthreads();
    }

    // Tile i of the CTA's walk: its query head and first row, its Q and dO slots, its lse2 and D.
    struct QTile {
        int head, m0;
        const elem_t *q, *dout;
        const float* stats;
    };
    __device__ __forceinline__ QTile q_tile(int i) const {
        return QTile{work.head(i), work.m_block(i) * kBlockM, sQ + (i % kStages) * kBlockM * HEAD_DIM, sdO + (i % kStages) * kBlockM * HEAD_DIM,
                     sStats + (i % kStages) * 2 * kBlockM};
    }
};

// A consumer thread: its index among the consumers, its warpgroup, its warp's first key in the
// tile (as in the mma C layout), and the flushes of its dK/dV accumulators (dkdv_partial.cuh).
struct ConsumerThread {
    int tid, wg, warp_key0;
    DkDvPartial<kConsumerThreads> partial;

    __device__ __forceinline__ explicit ConsumerThread(const BwdParams& params)
        : tid(threadIdx.x - 128),
          wg(tid / 128),
          warp_key0((kSplitD ? tid / 32 % 4 : tid / 32) * 16),
          partial{params.dkdv_partial + static_cast<int64>(blockIdx.x) * 2 * kBlockN * HEAD_DIM, params.flush_every} {}
};
static_assert(kWgDT * 4 * kConsumerThreads == kBlockN * HEAD_DIM, "the consumers hold (Bc, d) once");

// dK = ds_scale * acc_dk, dV = rp_dropout * acc_dv (the warpgroup's keys and columns), staged
// through sK and sV once no warpgroup reads them.
__device__ __forceinline__ void store_dk_dv_of(const DkDvCta& cta, const ConsumerThread& me, float (&acc_dk)[1][kWgDT][4],
                                               float (&acc_dv)[1][kWgDT][4]) {
    const BwdParams& params = cta.params;
#pragma unroll
    for (int dt = 0; dt < kWgDT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc_dk[0][dt][e] *= params.ds_scale;
            acc_dv[0][dt][e] *= params.drop.rp_dropout;
        }
    const int panel0 = kSplitD ? me.wg * kWgCols / 64 : 0;
    const int batch = cta.batch, head_k = cta.head_k, n0 = cta.n0;
    ptx::named_barrier(kConsumersSync, kConsumerThreads);
    stmatrix_acc_swizzled<kBlockN>(cta.sK + panel0 * kBlockN * 64, acc_dk, me.warp_key0);
    stmatrix_acc_swizzled<kBlockN>(cta.sV + panel0 * kBlockN * 64, acc_dv, me.warp_key0);
    ptx::named_barrier(kConsumersSync, kConsumerThreads);
    store_tile_swizzled<kBlockN, kConsumerThreads>(
        params.dk + batch * params.dk_batch_stride + head_k * params.dk_head_stride + n0 * params.dk_row_stride, cta.sK, params.dk_row_stride,
        params.seqlen_k - n0, params.head_dim, me.tid);
    store_tile_swizzled<kBlockN, kConsumerThreads>(
        params.dv + batch * params.dv_batch_stride + head_k * params.dv_head_stride + n0 * params.dv_row_stride, cta.sV, params.dv_row_stride,
        params.seqlen_k - n0, params.head_dim, me.tid);
}
