// FlashAttention backward, Hopper path (sm_90a): the dK/dV kernel with dQ by bulk reductions, on wgmma
// with TMA loads; the row passes before and after it are those of the portable path
// (bwd_passes.cuh). The algorithm and the dropout algebra are flash_bwd.cu's.
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
// keys, and S^T and dP^T by role (consume_split_d, below).
// One bulk reduction per dQ tile replaces 16-32 red.global.add.v2 per thread, which cost 30-40%
// of the kernel's time (bench/NOTES.md, v2.4, v2.5; 7-13% at d128 again in v2.17). Its issue
// stalls the issuing thread ~470 cycles, hence a warp of its own (+4-10% at d128, v2.17).
//
// The grid's last num_converters CTAs convert dQ (convert_dq_of_done_heads): the block
// scheduler reaches them once every dK/dV CTA has an SM, i.e. in the grid's last wave, whose
// idle SMs they fill, converting the tiles of the heads already done while the last dK/dV CTAs
// run. Each dK/dV CTA counts itself on its kv head's `done` counter once its reductions have
// landed. A converter waits for nothing: flash_bwd_convert_dq_tiles, after the kernel, converts
// the tiles of the heads that were not done yet (spinning converters would also take power from
// the dK/dV CTAs, which run at the GPU's power limit).
#include "softmax_backward.cuh"
#include "tile_scheduler.cuh"
#include "warpgroup_gemm.cuh"
#include "bwd_passes.cuh"
#include "dkdv_partial.cuh"
#include "params.cuh"

#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_bwd_sm90.cu needs -arch=sm_90a"
#endif

// Injected by the launcher: BLOCK_M (Br, queries), BLOCK_N (Bc, keys), STAGES, IS_CAUSAL, IS_DROPOUT.
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
template <bool B> struct Flag { static constexpr bool value = B; };
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
static_assert(sizeof(SharedStorage) + kSmemAlignSlack == SMEM_BYTES,
              "cuflash/plan.py backward_smem_bytes disagrees with SharedStorage");

constexpr int kConvSlots = 5;   // dQ tiles (32 KB) in flight per converter CTA
constexpr int kConvGroup = 8;   // consecutive dQ tiles per converter turn: mostly one kv head
// Shared memory of a converter CTA, in the dK/dV CTA's: a ring of dQ tiles and the tile in each slot.
struct ConverterStorage {
    float slots[kConvSlots][DqTile::kFloats];
    int slot_tile[kConvSlots];
    mbar_t full[kConvSlots], empty[kConvSlots];
};
static_assert(sizeof(ConverterStorage) <= sizeof(SharedStorage), "a converter's ring fits a dK/dV CTA's shared memory");

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

// Converter CTA `converter` of num_converters: the dQ tiles of turns converter + k *
// num_converters (kConvGroup tiles each) whose kv heads are done (dq_done: per (batch, kv head),
// its dK/dV CTAs whose dQ reductions have landed), each marked in dq_converted. Thread 0 copies
// them into a ring of kConvSlots slots; warpgroups 1 and 2 convert them into dQ.
__device__ __forceinline__ void convert_dq_of_done_heads(const BwdParams& params, int converter) {
    ConverterStorage& smem = shared_storage<ConverterStorage>();
    float* slots = smem.slots[0];
    int* slot_tile = smem.slot_tile;
    const ptx::MbarRing<kConvSlots> ring{smem_u32(smem.full), smem_u32(smem.empty)};
    if (threadIdx.x == 0) {
        for (int s = 0; s < kConvSlots; ++s) {
            ptx::mbar_init(ring.full(s), 1);
            ptx::mbar_init(ring.empty(s), kConsumerThreads);
        }
        ptx::fence_mbar_init();
    }
    __syncthreads();
    const int m_blocks = DqTile::m_blocks(params.seqlen_q), group = params.num_heads / params.num_heads_k;
    constexpr unsigned kTileBytes = DqTile::kFloats * 4;
    if (threadIdx.x == 0) {
        int k = 0;
        for (int turn = converter, kv_seen = -1, kv_done = 0; turn * kConvGroup < params.num_dq_tiles; turn += params.num_converters)
            for (int t = turn * kConvGroup; t < min(params.num_dq_tiles, (turn + 1) * kConvGroup); ++t) {
                const int bh = t / m_blocks, kv = bh / params.num_heads * params.num_heads_k + bh % params.num_heads / group;
                if (kv != kv_seen) {
                    kv_seen = kv;
                    kv_done = ptx::ld_acquire(params.dq_done + kv) == params.num_n_blocks;
                }
                if (!kv_done) continue;
                params.dq_converted[t] = 1;
                ring.wait_empty(k);
                slot_tile[k % kConvSlots] = t;
                ptx::mbar_arrive_expect_tx(ring.full(k), kTileBytes);
                ptx::bulk_load(smem_u32(slots + k % kConvSlots * DqTile::kFloats), params.dq_accum + static_cast<int64>(t) * DqTile::kFloats,
                               kTileBytes, ring.full(k));
                ++k;
            }
        ring.wait_empty(k);
        slot_tile[k % kConvSlots] = -1;
        ptx::mbar_arrive(ring.full(k));
    } else if (threadIdx.x >= 128) {
        for (int k = 0;; ++k) {
            ring.wait_full(k);
            const int t = slot_tile[k % kConvSlots];
            if (t < 0) return;
            const float* tile = slots + k % kConvSlots * DqTile::kFloats;
            for (int j = threadIdx.x - 128; j < DqTile::kFloats / 8; j += kConsumerThreads) {
                float4 a, b;
                DqTile::load_chunk(tile, j, a, b);
                store_dq_chunk(params, t, j, m_blocks, a, b);
            }
            ptx::mbar_arrive(ring.empty(k));  // by every thread, each after its own reads of the slot and slot_tile
        }
    }
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
flash_bwd_dkdv_sm90(const __grid_constant__ BwdParams params, const __grid_constant__ TmaMaps maps) {
    const int num_dkdv_ctas = gridDim.x - params.num_converters;
    if (blockIdx.x >= num_dkdv_ctas) {
        convert_dq_of_done_heads(params, blockIdx.x - num_dkdv_ctas);
        return;
    }
    SharedStorage& smem = shared_storage<SharedStorage>();
    elem_t* sK = smem.k();
    elem_t* sV = smem.v();
    elem_t* sQ = smem.q_ring();
    elem_t* sdO = smem.do_ring();
    elem_t* sdSt = smem.dst();
    elem_t* sP = smem.p();
    float* sPx = smem.px();
    float* sdQ = smem.dq();
    float* sStats = smem.stats();
    const unsigned bar_kv = smem_u32(&smem.kv_full);
    // Q_i and dO_i land on q_ring's full barrier, lse2_i and D_i (written by the producer's
    // stats warp) on stats_ring's; the two rings share their empty barriers.
    const ptx::MbarRing<kStages> q_ring{smem_u32(smem.q_full), smem_u32(smem.q_empty)};
    const ptx::MbarRing<kStages> stats_ring{smem_u32(smem.stats_full), q_ring.empty0};
    const unsigned bar_landed = smem_u32(&smem.dq_landed);

    const KvBlockWork work(blockIdx.x, params.num_n_blocks, params.num_heads, params.num_heads_k, params.seqlen_q, params.seqlen_k, kBlockM, kBlockN,
                           kInStep);
    const int batch = work.batch, head_k = work.head_k, n0 = work.n0, n_iters = work.n_iters;
    const int diag = params.seqlen_k - params.seqlen_q;

    const int kv_head = blockIdx.x / params.num_n_blocks;
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

    if (threadIdx.x < 128) {  // producer warpgroup
        ptx::setmaxnreg_dec<kProducerRegs>();
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
                    ptx::bulk_reduce_add_f32(params.dq_accum + dq_accum_offset(batch * params.num_heads + head, m0, 0, params.seqlen_q, params.head_dim), sdQ,
                                             DqTile::kFloats * 4);
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
        return;
    }

    if constexpr (!kSoloDq) ptx::setmaxnreg_inc<kConsumerRegs>();  // else in each role's branch, below
    const int tid = threadIdx.x - 128;
    const int wg = tid / 128;
    const int warp_key0 = (kSplitD ? tid / 32 % 4 : tid / 32) * 16;  // the warp's keys in the tile, as in the mma C layout
    const dropout::Rng rng = params.drop.rng;

    // Tile i of the CTA's walk: its query head and first row, its Q and dO slots, its lse2 and D.
    struct QTile {
        int head, m0;
        const elem_t *q, *dout;
        const float* stats;
    };
    auto q_tile = [&](int i) {
        return QTile{work.head(i), work.m_block(i) * kBlockM, sQ + (i % kStages) * kBlockM * HEAD_DIM,
                     sdO + (i % kStages) * kBlockM * HEAD_DIM, sStats + (i % kStages) * 2 * kBlockM};
    };

    static_assert(kWgDT * 4 * kConsumerThreads == kBlockN * HEAD_DIM, "the consumers hold (Bc, d) once");
    const DkDvPartial<kConsumerThreads> partial{params.dkdv_partial + static_cast<int64>(blockIdx.x) * 2 * kBlockN * HEAD_DIM,
                                                params.flush_every};

    // dK = scale * acc_dk, dV = rp_dropout * acc_dv (the warpgroup's keys and columns), staged
    // through sK and sV once no warpgroup reads them.
    auto store_dk_dv = [&](float (&acc_dk)[1][kWgDT][4], float (&acc_dv)[1][kWgDT][4]) {
#pragma unroll
        for (int dt = 0; dt < kWgDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc_dk[0][dt][e] *= params.ds_scale;
                acc_dv[0][dt][e] *= params.drop.rp_dropout;
            }
        const int panel0 = kSplitD ? wg * kWgCols / 64 : 0;
        ptx::named_barrier(kConsumersSync, kConsumerThreads);
        stmatrix_acc_swizzled<kBlockN>(sK + panel0 * kBlockN * 64, acc_dk, warp_key0);
        stmatrix_acc_swizzled<kBlockN>(sV + panel0 * kBlockN * 64, acc_dv, warp_key0);
        ptx::named_barrier(kConsumersSync, kConsumerThreads);
        store_tile_swizzled<kBlockN, kConsumerThreads>(params.dk + batch * params.dk_batch_stride + head_k * params.dk_head_stride + n0 * params.dk_row_stride,
                                                       sK, params.dk_row_stride, params.seqlen_k - n0, params.head_dim, tid);
        store_tile_swizzled<kBlockN, kConsumerThreads>(params.dv + batch * params.dv_batch_stride + head_k * params.dv_head_stride + n0 * params.dv_row_stride,
                                                       sV, params.dv_row_stride, params.seqlen_k - n0, params.head_dim, tid);
    };

#if BLOCK_N == 64  // kSplitD: only one consumer loop is compiled, for each names shapes the other's layout lacks
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
    auto consume_split_d = [&]() {
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
                probs(acc_x, signed_p, stats, warp_key0, 0, m0, n0, params.seqlen_k, diag, tile_needs_mask(m0, n0, kBlockN, params.seqlen_k, diag),
                      rng, batch * params.num_heads + head, params.scale_log2);
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
    };
    consume_split_d();
#else
    const int dq_wg = kSoloDq ? 0 : wg;  // the dQ warpgroup: with kSoloDq, warpgroup 0
    const int dq_row0 = DqTile::row0(dq_wg), dq_col0 = DqTile::col0(dq_wg);  // this warpgroup's block of dQ
    // The consumer warpgroup's loop and epilogue; with kDq it also computes its block of dQ.
    auto consume = [&](auto computes_dq) {
        constexpr bool kDq = decltype(computes_dq)::value;
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
                             tile_needs_mask(m0, n0, kBlockN, params.seqlen_k, diag), rng, batch * params.num_heads + head, params.scale_log2);

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
    };

    if constexpr (kSoloDq) {
        // setmaxnreg in each branch: ptxas then allocates the two copies of the loop apart (4 bytes
        // of spills at d128 against 112 with one setmaxnreg before the branch).
        if (wg == 0) {
            ptx::setmaxnreg_inc<kConsumerRegs>();
            consume(Flag<true>{});
        } else {
            ptx::setmaxnreg_inc<kConsumerRegs>();
            consume(Flag<false>{});
        }
    } else {
        consume(Flag<true>{});
    }
#endif
}
