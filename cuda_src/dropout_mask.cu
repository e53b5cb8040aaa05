// The dropout keep mask as bytes (cuflash.dropout_mask), for tests and debugging on small
// problems. One thread per (batch * nheads + head, query row, group of 4 keys) draws one Philox
// call directly, without the shuffles of the attention kernels' layouts, so that comparing the
// kernels with a reference built from this mask checks those layouts.
#include "philox.cuh"

extern "C" __global__ void __launch_bounds__(256)
dropout_mask(unsigned char* __restrict__ mask, unsigned seed_lo, unsigned seed_hi, unsigned offset,
             unsigned threshold, int seqlen_q, int seqlen_k, long long calls) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= calls) return;
    const int groups = (seqlen_k + 3) / 4;
    const long long row_id = i / groups;  // (batch * nheads + head) * seqlen_q + row
    const int group = static_cast<int>(i % groups);
    const int row = static_cast<int>(row_id % seqlen_q), bh = static_cast<int>(row_id / seqlen_q);
    const dropout::Rng rng{seed_lo, seed_hi, offset, threshold};
    const uint4 w = dropout::words(rng, bh, row, group);
    unsigned char* out = mask + row_id * seqlen_k + 4 * group;
#pragma unroll
    for (int j = 0; j < 4; ++j)
        if (4 * group + j < seqlen_k) out[j] = dropout::word_at(w, j) >= threshold;
}
