// The dropout keep mask as bytes (cuflash.dropout_mask), for tests and debugging on small
// problems. One thread per (batch * nheads + head, query row, group of 4 keys) draws one Philox
// call directly, without the shuffles of the attention kernels' layouts, so that comparing the
// kernels with a reference built from this mask checks those layouts.
#include "philox.cuh"
#include "field_kind.cuh"

// The kernel's parameters (cuflash/params.py: MASK). mask: bool (batch, nheads, seqlen_q,
// seqlen_k); calls: batch * nheads * seqlen_q * ceil(seqlen_k / 4).
struct MaskParams {
    unsigned char* mask;
    long long calls;
    int seqlen_q, seqlen_k;
    dropout::Rng rng;
};

extern "C" __global__ void __launch_bounds__(256) dropout_mask(const __grid_constant__ MaskParams params) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= params.calls) return;
    const int groups = (params.seqlen_k + 3) / 4;
    const long long row_id = i / groups;  // (batch * nheads + head) * seqlen_q + row
    const int group = static_cast<int>(i % groups);
    const int row = static_cast<int>(row_id % params.seqlen_q), bh = static_cast<int>(row_id / params.seqlen_q);
    const uint4 w = dropout::words(params.rng, bh, row, group);
    unsigned char* out = params.mask + row_id * params.seqlen_k + 4 * group;
#pragma unroll
    for (int j = 0; j < 4; ++j)
        if (4 * group + j < params.seqlen_k) out[j] = dropout::word_at(w, j) >= params.rng.threshold;
}
