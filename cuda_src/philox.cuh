// Dropout keep bits from Philox4x32-10, as cuflash/reference.py specifies them: for query row r,
// key c of (batch * nheads + head) bh, the word c % 4 of
//     philox(counter = (c / 4, r, bh, offset), key = (seed_lo, seed_hi)),
// kept iff word >= threshold (threshold = floor(p * 2^32), computed by the launcher). The bits
// depend only on (seed, offset, bh, r, c): never on tile sizes, warp layout or launch order, so
// the backward regenerates exactly the forward's mask.
//
// One call gives the words of 4 consecutive keys. The accumulator layouts of mma.m16n8k16 spread
// those 4 keys over 2 lanes (rows = queries) or 4 lanes (rows = keys); the helpers below let each
// of those lanes draw one of the calls they need and trade words with shuffles, so a warp makes
// each Philox call once.
#pragma once

namespace dropout {

struct Rng {
    unsigned seed_lo, seed_hi, offset, threshold;
};

__device__ __forceinline__ uint4 philox4x32_10(unsigned c0, unsigned c1, unsigned c2, unsigned c3, unsigned k0, unsigned k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }  // Weyl key bumps between rounds
        const unsigned long long p0 = static_cast<unsigned long long>(0xD2511F53u) * c0;
        const unsigned long long p1 = static_cast<unsigned long long>(0xCD9E8D57u) * c2;
        const unsigned n0 = static_cast<unsigned>(p1 >> 32) ^ c1 ^ k0;
        const unsigned n2 = static_cast<unsigned>(p0 >> 32) ^ c3 ^ k1;
        c1 = static_cast<unsigned>(p1);
        c3 = static_cast<unsigned>(p0);
        c0 = n0;
        c2 = n2;
    }
    return make_uint4(c0, c1, c2, c3);
}

__device__ __forceinline__ uint4 words(const Rng& rng, int bh, int row, int key_group) {
    return philox4x32_10(static_cast<unsigned>(key_group), static_cast<unsigned>(row), static_cast<unsigned>(bh), rng.offset, rng.seed_lo,
                         rng.seed_hi);
}

__device__ __forceinline__ unsigned word_at(const uint4& w, int i) { return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w; }

// Bit e = keep of accumulator element e of an m16n8 tile whose rows are query rows row0.. and whose
// columns are keys col0.. (col0 a multiple of 8): element e sits at row lane/4 + 8(e/2), key
// 2(lane%4) + e%2. Lanes l and l^1 hold the same group of 4 keys; the even lane draws row lane/4,
// the odd one row lane/4 + 8, and each hands the other the two words it needs.
__device__ __forceinline__ unsigned keep_bits_qk(const Rng& rng, int bh, int row0, int col0) {
    const int lane = threadIdx.x % 32;
    const bool odd = lane & 1;
    const uint4 w = words(rng, bh, row0 + lane / 4 + (odd ? 8 : 0), col0 / 4 + (lane % 4) / 2);
    // even lanes keep words 0, 1 (keys 2t, 2t+1 with t even) and send 2, 3; odd lanes the reverse
    const unsigned got0 = __shfl_xor_sync(0xffffffff, odd ? w.x : w.z, 1);
    const unsigned got1 = __shfl_xor_sync(0xffffffff, odd ? w.y : w.w, 1);
    const unsigned e0 = odd ? got0 : w.x, e1 = odd ? got1 : w.y;  // row lane/4
    const unsigned e2 = odd ? w.z : got0, e3 = odd ? w.w : got1;  // row lane/4 + 8
    const unsigned t = rng.threshold;
    return unsigned(e0 >= t) | unsigned(e1 >= t) << 1 | unsigned(e2 >= t) << 2 | unsigned(e3 >= t) << 3;
}

// The same for a transposed tile: rows are keys row0.. (a multiple of 16), columns query rows
// col0..; element e sits at key lane/4 + 8(e/2), query 2(lane%4) + e%2, so its word is (lane/4) % 4
// of call (key group row0/4 + lane/16 + 2(e/2), query col0 + 2(lane%4) + e%2). The 4 lanes that
// differ in bits 2-3 (a = (lane/4) % 4) need the same 4 calls, one word each: lane a draws call
// e = a, and in round r it receives from lane a^r the word a of that lane's call (element a^r).
__device__ __forceinline__ unsigned keep_bits_kq(const Rng& rng, int bh, int row0, int col0) {
    const int lane = threadIdx.x % 32;
    const int a = (lane / 4) % 4;
    const uint4 w = words(rng, bh, col0 + 2 * (lane % 4) + a % 2, row0 / 4 + lane / 16 + 2 * (a / 2));
    const unsigned t = rng.threshold;
    unsigned bits = unsigned(word_at(w, a) >= t) << a;
#pragma unroll
    for (int r = 1; r < 4; ++r) {
        const unsigned got = __shfl_xor_sync(0xffffffff, word_at(w, a ^ r), 4 * r);
        bits |= unsigned(got >= t) << (a ^ r);
    }
    return bits;
}

}  // namespace dropout
