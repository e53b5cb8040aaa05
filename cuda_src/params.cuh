// The kernels' interface: one parameter struct per kernel family, passed by value as a
// __grid_constant__ kernel parameter (read in place from the constant bank, as FlashAttention's
// Flash_fwd_params and ThunderKittens' globals are).
//
// cuflash/params.py describes every field (name, kind, order); compile.py appends to each program
// a static_assert per field generated from that description, checking its offset and kind, and one
// on the struct's size. A field added, dropped, moved or retyped on one side alone fails the build,
// on the CPU too (tests/test_params.py), before any launch can read a scalar from the wrong place.
#pragma once
#include "flash_common.cuh"
#include "philox.cuh"
#include "field_kind.cuh"

// A CUtensorMap: 128 opaque bytes that the launcher encodes (cuflash/tma.py); TMA copies a
// (rows, 64) box of it into one panel of a swizzled tile.
struct __align__(64) TmaDesc {
    unsigned long long bits[16];
};

// The dropout state of a launch: the Philox key and counter word, the keep threshold (philox.cuh),
// and 1 / (1 - p), which is 1 without dropout.
struct DropoutParams {
    dropout::Rng rng;
    float rp_dropout;
};

// flash_fwd (mma.sync) and flash_fwd_sm90 (wgmma; its q, k, v and o are read through TmaMaps).
// q, o: (batch, seqlen_q, num_heads, head_dim); k, v: (batch, seqlen_k, num_heads_k, head_dim);
// lse: float32 (batch, num_heads, seqlen_q). Strides in elements.
struct FwdParams {
    const elem_t* q;
    const elem_t* k;
    const elem_t* v;
    elem_t* o;
    float* lse;
    int* unit_counter;  // sm_90a: the persistent grid's next unit of work, zero at launch and left at zero
    int64 q_batch_stride, q_row_stride, q_head_stride;
    int64 k_batch_stride, k_row_stride, k_head_stride;
    int64 v_batch_stride, v_row_stride, v_head_stride;
    int64 o_batch_stride, o_row_stride, o_head_stride;
    int seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim;
    int num_m_blocks;
    int num_bh, tail_heads;  // sm_90a: the tile schedule (cuflash/schedule.py: persistent_tail_heads)
    float scale_log2;        // softmax_scale * log2(e); IS_SOFTCAP: softcap * log2(e)
    DropoutParams drop;
    float softcap_scale;     // IS_SOFTCAP: softmax_scale / softcap (last: the fields above keep their offsets)
};

// Every backward kernel: flash_bwd_preprocess, the dK/dV kernels (flash_bwd_dkdv,
// flash_bwd_dkdv_sm90), flash_bwd_dq (deterministic dQ) and the dQ conversions. lse2 and dsum
// (D = rowsum(dO * O)) are float32 (batch, num_heads, seqlen_q_pad); dq_accum and the dQ
// synchronisation words are laid out by bwd_passes.cuh.
struct BwdParams {
    const elem_t* q;
    const elem_t* k;
    const elem_t* v;
    const elem_t* o;
    const elem_t* dout;
    elem_t* dq;
    elem_t* dk;
    elem_t* dv;
    const float* lse;
    float* lse2;          // lse * log2(e), +inf where lse = -inf
    float* dsum;          // D, times 1 - p with dropout
    float* dq_accum;      // float32 dQ / scale (DQ_ATOMIC)
    int* dq_done;         // sm_90a: per (batch, kv head), its dK/dV CTAs whose dQ reductions landed
    int* dq_converted;    // sm_90a: per dQ tile, set by the converter CTA that converted it
    float* dkdv_partial;  // DKDV_FLUSH: per dK/dV CTA, float32 partial sums of dK and dV
    int64 q_batch_stride, q_row_stride, q_head_stride;
    int64 k_batch_stride, k_row_stride, k_head_stride;
    int64 v_batch_stride, v_row_stride, v_head_stride;
    int64 o_batch_stride, o_row_stride, o_head_stride;
    int64 do_batch_stride, do_row_stride, do_head_stride;
    int64 dq_batch_stride, dq_row_stride, dq_head_stride;
    int64 dk_batch_stride, dk_row_stride, dk_head_stride;
    int64 dv_batch_stride, dv_row_stride, dv_head_stride;
    int seqlen_q, seqlen_q_pad, seqlen_k, num_heads, num_heads_k, head_dim;
    int num_m_blocks, num_n_blocks;
    int rows_total;       // batch * num_heads * seqlen_q: the row passes' rows
    int num_dq_tiles;     // sm_90a: batch * num_heads * m blocks of the tiled dQ accumulator
    int num_converters;   // sm_90a: converter CTAs at the end of the dK/dV grid
    int flush_every;      // DKDV_FLUSH: Q tiles between flushes
    float scale_log2;     // softmax_scale * log2(e); IS_SOFTCAP: softcap * log2(e)
    float ds_scale;       // softmax_scale / (1 - p): the scale of dK and dQ
    float d_scale;        // 1 - p: the preprocess's factor of D
    DropoutParams drop;
    float softcap_scale;  // IS_SOFTCAP: softmax_scale / softcap (last: the fields above keep their offsets)
};

// The tensor maps of the sm_90a kernels, their second parameter: q, k, v and o (forward) or dO
// (backward), each read (or, for o, written) in boxes of rows x 64 columns.
struct TmaMaps {
    TmaDesc q, k, v, o_or_do;
};

template <>
struct FieldKind<TmaDesc> {
    static constexpr char value = 's';
};
