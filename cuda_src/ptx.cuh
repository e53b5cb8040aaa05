// Small inline-PTX helpers shared by the cuflash kernels (sm_80+).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace ptx {

// 16-byte global->shared copy that bypasses L1; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

// Close the current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N groups of cp.async copies are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
    unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// The same, transposed: gives the B operand of a row-major (k, n) tile.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
    unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// D += A(16x16, row) * B(16x8, col) on tensor cores, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// tanh(x) on the SFU (max relative error 2^-10.987), as flash-attn's softcap uses it.
__device__ __forceinline__ float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// 2^x on the SFU; flushes denormals, exact 0 for -inf.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// dst[0] += a, dst[1] += b in global memory (8-byte aligned); one vector reduction on sm_90.
__device__ __forceinline__ void red_add_f32x2(float* dst, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
#endif
}

// Two floats rounded to one 32-bit register of packed 16-bit values (lo in the low half).
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);

template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

// ---- Hopper (sm_90a only: these assemble for no other target) ------------------------------
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#if IS_BF16
#define WGMMA_AB "bf16"
#else
#define WGMMA_AB "f16"
#endif

// Make this thread's ordinary shared-memory writes visible to the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Order this warpgroup's register writes before the wgmma that reads them (accumulators, A).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Close the group of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Wait until at most N groups of this warpgroup's wgmma are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Initialise an mbarrier that completes a phase after `count` arrivals (and the expected bytes).
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Make mbarrier initialisations visible to the async proxy (TMA) before anyone uses them.
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// Arrive on an mbarrier.
__device__ __forceinline__ void mbar_arrive(unsigned bar) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory"); }

// Arrive on an mbarrier and add `bytes` to the transaction count its phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Spin until the mbarrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// An mbarrier: 8 bytes of shared memory, named by its shared address in the calls above.
typedef unsigned long long mbar_t;

// A ring of N shared-memory slots that a producer (TMA, or a thread) fills and consumers drain:
// position i uses slot i % N in phase (i / N) & 1, with a "full" mbarrier (the slot is written)
// and an "empty" one (every consumer is done with it); slot s's barriers are 8 s bytes after
// slot 0's.
template <int N>
struct MbarRing {
    unsigned full0, empty0;  // shared addresses of slot 0's barriers

    __device__ __forceinline__ unsigned full(int i) const { return full0 + 8 * (i % N); }
    __device__ __forceinline__ unsigned empty(int i) const { return empty0 + 8 * (i % N); }
    static __device__ __forceinline__ unsigned phase(int i) { return static_cast<unsigned>(i / N) & 1; }
    // Consumer: until position i has landed.
    __device__ __forceinline__ void wait_full(int i) const { mbar_wait(full(i), phase(i)); }
    // Consumer warp, once done with position i: its lane 0 arrives for it (empty barriers that
    // count warps).
    __device__ __forceinline__ void release_by_warp(int i) const {
        if (threadIdx.x % 32 == 0) mbar_arrive(empty(i));
    }
    // Producer: until position i - N has been drained from i's slot (at once for the first N).
    __device__ __forceinline__ void wait_empty(int i) const {
        if (i >= N) mbar_wait(empty(i), phase(i) ^ 1);
    }
};

// TMA: a box of a 4-d tensor (map `tmap`, a __grid_constant__ parameter) at coordinates c0..c3
// into shared memory, completing `bytes` on mbarrier `bar`.
__device__ __forceinline__ void tma_load_4d(unsigned dst, const void* tmap, int c0, int c1, int c2, int c3, unsigned bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
                 "l"(tmap), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
                 : "memory");
}

// TMA: a box of shared memory at `src` into a 4-d tensor (map `tmap`) at coordinates c0..c3; the
// copy joins this thread's current bulk group. Out-of-bounds parts of the box are not written.
__device__ __forceinline__ void tma_store_4d(const void* tmap, unsigned src, int c0, int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(tmap), "r"(c0), "r"(c1), "r"(c2),
                 "r"(c3), "r"(src)
                 : "memory");
}

// Store four 8x8 16-bit matrices held in the mma C layout (register i: matrix i, row lane / 4,
// columns 2 (lane % 4) and +1); lane l gives the shared address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void stmatrix_x4(unsigned addr, unsigned r0, unsigned r1, unsigned r2, unsigned r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}

// The same, each matrix transposed: register i's row lane / 4 becomes column lane / 4 of
// matrix i in memory.
__device__ __forceinline__ void stmatrix_x4_trans(unsigned addr, unsigned r0, unsigned r1, unsigned r2, unsigned r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3)
                 : "memory");
}

// Add `bytes` (a multiple of 16) of float32 from shared to global memory, both 16-byte aligned,
// asynchronously; the copy joins this thread's current bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* gmem, const float* smem, unsigned bytes) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gmem), "r"(s), "r"(bytes) : "memory");
}

// Close this thread's current bulk group.
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// Wait until at most N of this thread's bulk groups may still read their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// Wait until at most N of this thread's bulk groups are still incomplete.
template <int N>
__device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copy `bytes` (a multiple of 16) from global to shared memory, both 16-byte aligned, completing on mbarrier `bar`.
__device__ __forceinline__ void bulk_load(unsigned dst, const void* gmem, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst), "l"(gmem), "r"(bytes),
                 "r"(bar)
                 : "memory");
}

// Order this thread's completed bulk (async-proxy) writes to global memory before its later generic accesses.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// A counter shared by the CTAs of a grid: add after everything this thread has seen (release),
// and read before what follows (acquire).
__device__ __forceinline__ void red_release_add(int* counter, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(counter), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_acquire(const int* counter) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(counter) : "memory");
    return v;
}

// Set this warpgroup's register count (all warps of the warpgroup execute it).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Barrier `id` among `threads` threads (a subset of the CTA; id 0 is __syncthreads').
__device__ __forceinline__ void named_barrier(int id, int threads) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory"); }

// Arrive on named barrier `id` (of `threads` threads) without waiting for it.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory"); }

// Pin a register the async tensor cores write or read: the compiler may neither move its uses
// across a wgmma_wait nor reuse it while a wgmma is in flight.
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(unsigned& r) { asm volatile("" : "+r"(r)::"memory"); }

// Accumulator operands of wgmma m64nNk16: n8 tile j of d[N / 8][4], 4 registers in the mma C layout.
#define WG_ACC(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define WG_ACC2(j) WG_ACC(j), WG_ACC(j + 1)
#define WG_ACC4(j) WG_ACC2(j), WG_ACC2(j + 2)
#define WG_ACC8(j) WG_ACC4(j), WG_ACC4(j + 4)
#define WG_D8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define WG_D16 WG_D8 ", %8, %9, %10, %11, %12, %13, %14, %15"
// clang-format off: operand lists wider than the column limit
#define WG_D32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_D64 WG_D32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_D128 WG_D64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95" \
    ", %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
// clang-format on

// D (64 x N, fp32) = A * B (+ D if scale_d): wgmma m64nNk16 of one warpgroup. ss: A and B by
// shared-memory descriptors; rs: A from registers in the mma A layout (4 per thread).
// TRANS_A = 1 reads A M-major ((k, m) rows), 0 K-major ((m, k) rows); TRANS_B = 1 reads B
// N-major ((k, n) rows), 0 K-major ((n, k) rows).
template <int N>
struct Wgmma;

template <>
struct Wgmma<32> {
    template <int TRANS_A, int TRANS_B>
    static __device__ __forceinline__ void ss(float (&d)[4][4], unsigned long long a, unsigned long long b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32." WGMMA_AB "." WGMMA_AB " {" WG_D16 "}, %16, %17, p, 1, 1, %19, %20;\n}\n"
            : WG_ACC4(0)
            : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B)
            : "memory");
    }
};
template <>
struct Wgmma<64> {
    template <int TRANS_A, int TRANS_B>
    static __device__ __forceinline__ void ss(float (&d)[8][4], unsigned long long a, unsigned long long b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32." WGMMA_AB "." WGMMA_AB " {" WG_D32 "}, %32, %33, p, 1, 1, %35, %36;\n}\n"
            : WG_ACC8(0)
            : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B)
            : "memory");
    }
    template <int TRANS_B>
    static __device__ __forceinline__ void rs(float (&d)[8][4], const unsigned (&a)[4], unsigned long long b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32." WGMMA_AB "." WGMMA_AB " {" WG_D32 "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
            : WG_ACC8(0)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TRANS_B)
            : "memory");
    }
};
template <>
struct Wgmma<128> {
    template <int TRANS_A, int TRANS_B>
    static __device__ __forceinline__ void ss(float (&d)[16][4], unsigned long long a, unsigned long long b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." WGMMA_AB "." WGMMA_AB " {" WG_D64 "}, %64, %65, p, 1, 1, %67, %68;\n}\n"
            : WG_ACC8(0), WG_ACC8(8)
            : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B)
            : "memory");
    }
    template <int TRANS_B>
    static __device__ __forceinline__ void rs(float (&d)[16][4], const unsigned (&a)[4], unsigned long long b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." WGMMA_AB "." WGMMA_AB " {" WG_D64 "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
            : WG_ACC8(0), WG_ACC8(8)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TRANS_B)
            : "memory");
    }
};
template <>
struct Wgmma<256> {
    template <int TRANS_A, int TRANS_B>
    static __device__ __forceinline__ void ss(float (&d)[32][4], unsigned long long a, unsigned long long b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n256k16.f32." WGMMA_AB "." WGMMA_AB " {" WG_D128 "}, %128, %129, p, 1, 1, %131, %132;\n}\n"
            : WG_ACC8(0), WG_ACC8(8), WG_ACC8(16), WG_ACC8(24)
            : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B)
            : "memory");
    }
    template <int TRANS_B>
    static __device__ __forceinline__ void rs(float (&d)[32][4], const unsigned (&a)[4], unsigned long long b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n256k16.f32." WGMMA_AB "." WGMMA_AB " {" WG_D128 "}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"
            : WG_ACC8(0), WG_ACC8(8), WG_ACC8(16), WG_ACC8(24)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TRANS_B)
            : "memory");
    }
};
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace ptx
