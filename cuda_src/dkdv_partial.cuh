// dK and dV summed by the CUDA cores, in float32 rounded to nearest, every `every` Q tiles: for
// keys that very many query rows see.
//
// The tensor cores add each Q tile's products into the register accumulators of dK and dV, and
// over millions of query rows per key (a long query sequence times the query heads of a GQA
// group) the accumulators' error grows with the row count, to 7-10x the error of the same
// computation in fp16 at 4 x 2^20 rows per key (bench/NOTES.md, v2.19). So every `every` Q
// tiles a CTA adds its accumulators into its own float32 slice of a buffer and restarts them
// from zero: the tensor cores never sum more than `every` tiles, and the CUDA cores sum the few
// partial sums. The launcher picks the variants compiled with DKDV_FLUSH = 1 only where a CTA
// sees more than DKDV_FLUSH_ROWS rows (cuflash/schedule.py), and sets `every` from it; with
// DKDV_FLUSH = 0 none of this is compiled (a per-tile check cost 2-5% at d128 and d256:
// bench/NOTES.md, v2.19). A CTA that sees fewer than `every` tiles never touches the buffer.
#pragma once

// One CTA's slice holds dK's accumulator elements, then dV's; each element's kThreads values are
// consecutive (thread t's at t), so that every flush is a coalesced pass.
template <int kThreads>
struct DkDvPartial {
    float* slice;  // 2 x elements-per-thread x kThreads floats (with DKDV_FLUSH; else unused)
    int every;     // Q tiles between flushes (with DKDV_FLUSH; else unused)

    // After Q tile i: on every `every`-th tile, add the accumulators into the slice (the first
    // time, store them) and zero them.
    template <int M, int N>
    __device__ __forceinline__ void after_tile(int i, float (&acc_dk)[M][N][4], float (&acc_dv)[M][N][4], int tid) const {
        if (!DKDV_FLUSH || (i + 1) % every != 0) return;
        const bool first = i + 1 == every;
        move(acc_dk, slice + tid, first);
        move(acc_dv, slice + M * N * 4 * kThreads + tid, first);
    }

    // After the last of n_iters tiles: add back what was flushed.
    template <int M, int N>
    __device__ __forceinline__ void fold(int n_iters, float (&acc_dk)[M][N][4], float (&acc_dv)[M][N][4], int tid) const {
        if (!DKDV_FLUSH || n_iters < every) return;
        add_back(acc_dk, slice + tid);
        add_back(acc_dv, slice + M * N * 4 * kThreads + tid);
    }

private:
    template <int M, int N>
    __device__ __forceinline__ static void move(float (&acc)[M][N][4], float* at, bool first) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int n = 0; n < N; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float* p = at + ((m * N + n) * 4 + e) * kThreads;
                    *p = first ? acc[m][n][e] : *p + acc[m][n][e];
                    acc[m][n][e] = 0.f;
                }
    }

    template <int M, int N>
    __device__ __forceinline__ static void add_back(float (&acc)[M][N][4], const float* at) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int n = 0; n < N; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[m][n][e] += at[((m * N + n) * 4 + e) * kThreads];
    }
};
