// FlashAttention forward, portable path for sm_80+: mma.sync m16n8k16 on tensor cores, ldmatrix
// operand loads, cp.async tile copies overlapped with the two GEMMs, online softmax in registers.
//
// One CTA computes one (BLOCK_M, HEAD_DIM) tile of O for one (batch, head). Each warp owns
// kRowsPerWarp consecutive query rows. K/V tiles are visited from the last to the first, so the
// tiles that need a mask (the seqlen_k edge, the causal diagonal) come first and the rest run
// without one. K/V tiles stream through a ring of kStages shared buffers: a tile is requested
// kStages - 1 iterations before it is used, so its load hides behind whole iterations of math.
// With IS_DROPOUT, the P that feeds P V has its dropped entries zeroed (m and l, hence lse, stay
// those of the undropped P) and O is scaled by 1 / (1 - p) once, in the epilogue.
#include "online_softmax.cuh"
#include "params.cuh"

// Injected by the launcher: BLOCK_M (Br), BLOCK_N (Bc), NWARPS, STAGES, IS_CAUSAL, IS_DROPOUT, IS_SOFTCAP.
constexpr int kBlockM = BLOCK_M;
constexpr int kBlockN = BLOCK_N;
constexpr int kStages = STAGES;  // K/V tiles in flight: tile j+1.. loads while tile j computes
constexpr int kThreads = NWARPS * 32;
constexpr int kRowsPerWarp = BLOCK_M / NWARPS;
constexpr int kMT = kRowsPerWarp / 16;  // m16 row tiles per warp
constexpr int kNT = BLOCK_N / 8;        // n8 column tiles of S
constexpr int kDT = HEAD_DIM / 8;       // n8 column tiles of O
static_assert(kRowsPerWarp % 16 == 0, "each warp owns whole m16 tiles");
static_assert(BLOCK_N % 16 == 0, "P V consumes keys 16 at a time");
// Shared memory: Q and the kStages-slot K and V rings, pitched (cuflash/plan.py forward_smem_bytes).
static_assert((kBlockM + 2 * kStages * kBlockN) * kPitch * sizeof(elem_t) == SMEM_BYTES,
              "cuflash/plan.py forward_smem_bytes disagrees with flash_fwd's layout");

extern "C" __global__ void __launch_bounds__(kThreads) flash_fwd(const __grid_constant__ FwdParams params) {
    extern __shared__ __align__(16) unsigned char smem[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem);      // (Br, d), later the staging tile of O
    elem_t* sK = sQ + kBlockM * kPitch;                 // kStages x (Bc, d)
    elem_t* sV = sK + kStages * kBlockN * kPitch;       // kStages x (Bc, d)

    // Heads of one batch entry are consecutive; within a head, causal tiles run heaviest first.
    const int bh = blockIdx.x / params.num_m_blocks;
    int m_block = blockIdx.x % params.num_m_blocks;
    if (IS_CAUSAL) m_block = params.num_m_blocks - 1 - m_block;
    const int batch = bh / params.num_heads, head = bh % params.num_heads;
    const int head_k = head / (params.num_heads / params.num_heads_k);
    const int m0 = m_block * kBlockM;

    const int warp_row0 = (threadIdx.x / 32) * kRowsPerWarp;

    const elem_t* gQ = params.q + batch * params.q_batch_stride + head * params.q_head_stride + m0 * params.q_row_stride;
    const elem_t* gK = params.k + batch * params.k_batch_stride + head_k * params.k_head_stride;
    const elem_t* gV = params.v + batch * params.v_batch_stride + head_k * params.v_head_stride;

    const int diag = params.seqlen_k - params.seqlen_q;
    const int n_block_max = kv_blocks_visited(m0, kBlockM, kBlockN, params.seqlen_k, diag);

    float acc_o[kMT][kDT][4];  // (Br, d) slice of this warp, unnormalised O
    float m_i[kMT][2];         // running row max of S * scale * log2(e)
    float l_i[kMT][2];         // running row sum of P, partial over this thread's columns
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            m_i[mt][hh] = neg_inf();
            l_i[mt][hh] = 0.f;
        }
    }

    // Prologue: Q and the first kStages - 1 K/V tiles, one cp.async group per tile (maybe empty).
    if (n_block_max > 0) load_tile_async<kBlockM, kThreads>(sQ, gQ, params.q_row_stride, params.seqlen_q - m0, params.head_dim);
#pragma unroll
    for (int stage = 0; stage < kStages - 1; ++stage) {
        const int n0 = (n_block_max - 1 - stage) * kBlockN;
        if (n0 >= 0)
            load_kv_tile<kBlockN, kThreads>(sK + stage * kBlockN * kPitch, sV + stage * kBlockN * kPitch, gK, gV, params.k_row_stride,
                                            params.v_row_stride, n0, params.seqlen_k, params.head_dim);
        ptx::cp_async_commit();
    }

    for (int n_block = n_block_max - 1, it = 0; n_block >= 0; --n_block, ++it) {
        const int n0 = n_block * kBlockN;
        // Tile j has landed and is visible to all warps; every warp is done with tile j+1's buffer.
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();
        {
            const int n_next = n0 - (kStages - 1) * kBlockN;
            const int stage_next = (it + kStages - 1) % kStages;
            if (n_next >= 0)
                load_kv_tile<kBlockN, kThreads>(sK + stage_next * kBlockN * kPitch, sV + stage_next * kBlockN * kPitch, gK, gV, params.k_row_stride,
                                                params.v_row_stride, n_next, params.seqlen_k, params.head_dim);
            ptx::cp_async_commit();
        }
        const elem_t* sKj = sK + (it % kStages) * kBlockN * kPitch;
        const elem_t* sVj = sV + (it % kStages) * kBlockN * kPitch;

        // S = Q K_j^T   (Br, Bc), fp32
        float acc_s[kMT][kNT][4];
        zero(acc_s);
        warp_gemm_ss<kMT, kNT, HEAD_DIM, false, false>(acc_s, sQ + warp_row0 * kPitch, kPitch, sKj, kPitch);

        if (IS_SOFTCAP) cap_scores(acc_s, params.softcap_scale);
        if (tile_needs_mask(m0, n0, kBlockN, params.seqlen_k, diag)) mask_scores(acc_s, m0 + warp_row0, n0, params.seqlen_k, diag);
        float alpha[kMT][2];
        softmax_update(acc_s, m_i, l_i, alpha, params.scale_log2);
        rescale_rows(acc_o, alpha);
        if (IS_DROPOUT) drop_scores(acc_s, params.drop.rng, bh, m0 + warp_row0, n0);

        // O += P V_j   (Br, d); P rounded to the input type, straight from the S registers.
        unsigned p[kMT][kBlockN / 16][4];
        acc_to_a_frags(p, acc_s);
        warp_gemm_rs<kMT, kDT, kBlockN, true>(acc_o, p, sVj, kPitch);
    }

    // Each warp stages only its own rows of sQ, which only it has read; the trailing cp.async
    // groups are empty. The warp's lanes store into rows that other lanes' ldmatrix read, so the
    // warp syncs first (without it racecheck reports each such pair as a warp-level hazard).
    // rp_dropout is 1 / (1 - p), and 1 without dropout.
    normalize_rows(acc_o, m_i, l_i, params.drop.rp_dropout, params.lse + static_cast<int64>(bh) * params.seqlen_q, m0 + warp_row0, params.seqlen_q);
    __syncwarp();
    store_acc(sQ + warp_row0 * kPitch, kPitch, acc_o, 1.f);
    __syncthreads();
    store_tile<kBlockM, kThreads>(params.o + batch * params.o_batch_stride + head * params.o_head_stride + m0 * params.o_row_stride, sQ,
                                  params.o_row_stride, params.seqlen_q - m0, params.head_dim);
}
