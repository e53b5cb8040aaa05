"""Tile plans: which forward and backward kernel variants run a problem, and their tile sizes.

A variant is fixed at compile time by (dtype, head-dim bucket, causal, dropout, tile[,
deterministic]); dropout variants share the tiles of their dropout-free twins.
The tile tables are keyed by head-dim bucket; the reason for each entry sits beside it.
Registers are ptxas's count for sm_90 (bf16, causal).
"""
import itertools
from dataclasses import dataclass, replace

HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
DTYPES = ("float16", "bfloat16")
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]


@dataclass(frozen=True)
class FwdTile:
    """Br x Bc tile of the forward kernel, run by num_warps warps (each owns Br/num_warps rows)."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int = 2  # K/V tiles in the shared-memory ring

    def check(self, bucket):
        if self.num_warps < 1 or self.block_m < 16 * self.num_warps:
            raise ValueError(f"tile: block_m={self.block_m} must give each of {self.num_warps} warps at least 16 rows")
        rows_per_warp, rem = divmod(self.block_m, self.num_warps)
        if rem or rows_per_warp % 16:
            raise ValueError(f"tile: block_m={self.block_m} must give each of {self.num_warps} warps a multiple of 16 rows")
        if self.stages < 2:
            raise ValueError(f"tile: stages={self.stages} must be at least 2")
        if self.block_n % 16 or self.block_n <= 0:
            raise ValueError(f"tile: block_n={self.block_n} must be a positive multiple of 16")
        if bucket not in HEAD_DIM_BUCKETS:
            raise ValueError(f"head-dim bucket {bucket} is not one of {HEAD_DIM_BUCKETS}")

    @property
    def threads(self):
        return 32 * self.num_warps


@dataclass(frozen=True)
class HopperFwdTile:
    """Br x Bc tile of the sm_90a forward kernel (cuda_src/flash_fwd_sm90.cu): a producer
    warpgroup loading K and V tiles into rings of `stages` slots each, and Br / 64 consumer
    warpgroups of 128 threads, each owning 64 query rows; with `o_staged`, O leaves through a
    shared (Br, d) tile copied out by TMA."""

    block_m: int
    block_n: int
    stages: int = 2
    o_staged: bool = True

    def check(self, bucket):
        if self.block_m not in (64, 128, 192):
            raise ValueError(f"tile: block_m={self.block_m} must be 64, 128 or 192 (1-3 warpgroups of 64 rows)")
        if self.block_n not in HOPPER_WGMMA_N:
            raise ValueError(f"tile: block_n={self.block_n} must be one of {HOPPER_WGMMA_N} (the wgmma widths compiled)")
        if not 2 <= self.stages <= 4:
            raise ValueError(f"tile: stages={self.stages} must be 2 to 4")
        if bucket not in HOPPER_HEAD_DIMS:
            raise ValueError(f"head-dim bucket {bucket} has no sm_90a kernel (those are {HOPPER_HEAD_DIMS})")

    @property
    def threads(self):
        return 128 * (self.block_m // 64 + 1)


@dataclass(frozen=True)
class FwdVariant:
    """Everything that selects one compiled forward kernel."""

    dtype: str
    head_dim: int  # the bucket, not the caller's head dim
    causal: bool
    tile: FwdTile
    dropout: bool = False
    softcap: bool = False  # scores capped by softcap * tanh(S / softcap) (IS_SOFTCAP)


# Forward tiles per head-dim bucket, for a GPU with >= 160 KB of shared memory per block (sm_80,
# sm_90); fit_tile shrinks them for smaller ones (sm_86/89: 99 KB). Registers are ptxas's count
# for sm_90 (bf16); each warp owns 32 rows where registers allow, because 16 rows per warp
# doubles the K/V fragment traffic through shared memory, which then bounds the kernel
# (ncu, d128: 66% of shared-memory throughput and 1 CTA/SM with 8 warps x 16 rows).
FWD_TILES = {
    32: FwdTile(128, 128, 4),   # 235 regs, 51 KB
    64: FwdTile(128, 128, 4),   # 255 regs, no spill, 92 KB; flash-attn 2's choice too
    96: FwdTile(128, 64, 4),    # 255 regs, 12 B spilled outside the hot loop, 80 KB
    128: FwdTile(128, 64, 4),   # flash-attn 2's shape; 104 KB: 2 CTAs/SM on H100. 8 warps x 16 rows: 3.9 ms vs 3.3 (ncu, s=8k)
    # 160 and up: 4 warps x 32 rows would need more than 255 registers, so 8 warps x 16 rows in
    # one 1-CTA/SM block. d256 bf16 on H100 at s=8k: 298 TFLOP/s, vs 252 for (64, 32, 4) and
    # 227 for (64, 64, 4) (bench --tiles).
    160: FwdTile(128, 64, 8),   # 178 regs, 129 KB
    192: FwdTile(128, 64, 8),   # 186 regs, 154 KB
    224: FwdTile(128, 64, 8),   # 178 KB: sm_80 runs it with Bc = 32
    256: FwdTile(128, 64, 8),   # 240 regs, 203 KB: sm_80 runs it with Bc = 32
}
# Dropout adds a Philox call per 4 scores per thread to the softmax step, and at 255 registers the
# d64 tile's 128 score registers per thread leave it nothing: with dropout (p = 0.1, fp16, s=8k,
# H100) (128, 64, 4) runs 155 TFLOP/s against 131 for the table's (128, 128, 4). Other buckets keep
# their tiles, which measured best with dropout too (d128: 211 vs 202 for (128, 32, 4)).
FWD_DROPOUT_TILES = {64: FwdTile(128, 64, 4)}
# The sm_90a forward (wgmma), picked on compute capability 9.0 for these buckets. Registers per
# consumer thread: O takes d/2, S Bc/2, P (two tiles in flight) Bc/2. With one ring for K and V
# (a slot freed after its P V), a third slot was worth 1.4x at d64 and 2x at d128 over two (bf16,
# s=16k: 445 vs 324 and 623 vs 447 TFLOP/s, bench --tiles); since K and V have rings of their own
# (a K slot freed after its S), two slots each serve d128 and leave room for the staged O, which
# measured +1-3% without causal and +4-7% causal over three slots and O stored from registers
# (bench/NOTES.md, v2.8).
HOPPER_FWD_TILES = {
    # d64: 3 consumer warpgroups (160 registers each) overlap more softmax with GEMMs than 2:
    # bf16 s = 2k / 4k / 16k, 465 / 467 / 490 TFLOP/s against 409 / 420 / 431 for (128, 128, 3).
    64: HopperFwdTile(192, 128, 3),   # 145 KB
    128: HopperFwdTile(128, 128, 2),  # 193 KB
    256: HopperFwdTile(128, 64, 2, o_staged=False),  # 193 KB (a staged O would need 257); O is 128 registers
}
# With dropout the Philox calls need registers that 3 consumer warpgroups (160 each) lack: d64's
# (192, 128) tile spills 188 bytes there, (128, 128) none. With dropout, O stored from registers
# beats the staged O (fp16, s = 8k, p = 0.1, two paired runs, TFLOP/s staged -> not): d64 178 ->
# 180, causal 175 -> 181; d128 270 -> 278, causal 272 -> 269..275 (bench/NOTES.md, v2.10).
HOPPER_FWD_DROPOUT_TILES = {64: HopperFwdTile(128, 128, 3, o_staged=False), 128: HopperFwdTile(128, 128, 2, o_staged=False)}
HOPPER_HEAD_DIMS = tuple(HOPPER_FWD_TILES)
HOPPER_WGMMA_N = (64, 128, 256)  # ptx::Wgmma<N> of cuda_src/ptx.cuh: S = Q K^T is Bc wide, O d wide
SMEM_ALIGN_SLACK = 1024  # the sm_90a kernels align their shared storage to 1 KB (warpgroup_gemm.cuh)
MBARRIER_BYTES = 8
SMEM_OPTIN_BY_CC = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _check_tile_type(tile, types):
    if tile is not None and not isinstance(tile, types):
        names = " or ".join(f"cuflash.{t.__name__}" for t in types)
        raise TypeError(f"tile must be None or a {names}; got {type(tile).__name__} {tile!r}")


def head_dim_bucket(head_dim):
    """Smallest compiled head dim >= head_dim (the kernel zero-pads the difference)."""
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} exceeds the largest supported head dim {MAX_HEAD_DIM}")


def forward_smem_bytes(head_dim, tile):
    """Shared memory of the forward kernel, which static_asserts it (SMEM_BYTES): a Q tile and
    `stages` K and V tiles, rows padded by 16 bytes; the sm_90a kernel's SharedStorage holds the
    tiles (and its staged O) swizzled, unpadded, then 6 + 4 * stages mbarriers and 2 ints, and is
    1024-byte aligned by SMEM_ALIGN_SLACK bytes of slack."""
    if isinstance(tile, HopperFwdTile):
        o_rows = tile.block_m if tile.o_staged else 0
        tiles = (tile.block_m + 2 * tile.stages * tile.block_n + o_rows) * head_dim * 2
        return tiles + MBARRIER_BYTES * (6 + 4 * tile.stages) + 2 * 4 + SMEM_ALIGN_SLACK
    pitch_bytes = (head_dim + 8) * 2
    return (tile.block_m + 2 * tile.stages * tile.block_n) * pitch_bytes


def fit_tile(tile, head_dim, smem_limit):
    """`tile`, with Bc and then Br halved until its shared memory fits smem_limit bytes."""
    while forward_smem_bytes(head_dim, tile) > smem_limit:
        if tile.block_n > 32:
            tile = replace(tile, block_n=tile.block_n // 2)
        elif tile.block_m > 16:
            block_m = tile.block_m // 2
            tile = replace(tile, block_m=block_m, num_warps=min(tile.num_warps, block_m // 16))
        else:
            raise ValueError(f"no tile for head dim {head_dim} fits {smem_limit} bytes of shared memory")
    return tile


def forward_variant(dtype, head_dim, causal, tile=None, smem_limit=None, dropout=False, hopper=False, softcap=False):
    """The variant that runs (dtype, caller's head_dim, causal, dropout, softcap) on a GPU with smem_limit
    bytes of opt-in shared memory per block: the sm_90a kernel if `hopper` and the bucket has
    one, else the portable one. `tile` overrides the table (and is then not shrunk); its type
    (FwdTile or HopperFwdTile) picks the kernel."""
    _check_tile_type(tile, (FwdTile, HopperFwdTile))
    bucket = head_dim_bucket(head_dim)
    if tile is None and hopper and bucket in HOPPER_FWD_TILES:
        tile = HOPPER_FWD_DROPOUT_TILES.get(bucket, HOPPER_FWD_TILES[bucket]) if dropout else HOPPER_FWD_TILES[bucket]
    if tile is None:
        tile = FWD_DROPOUT_TILES.get(bucket, FWD_TILES[bucket]) if dropout else FWD_TILES[bucket]
        tile = tile if smem_limit is None else fit_tile(tile, bucket, smem_limit)
    tile.check(bucket)
    return FwdVariant(dtype, bucket, bool(causal), tile, bool(dropout), bool(softcap))


def forward_variants():
    """Every forward variant the dispatcher can pick on any sm_80+ GPU (CI compiles each portable
    one for sm_80 and sm_90a, each Hopper one for sm_90a)."""
    limits = sorted(set(SMEM_OPTIN_BY_CC.values()))
    return sorted({forward_variant(dtype, bucket, causal, smem_limit=limit, dropout=dropout, hopper=hopper, softcap=softcap)
                   for dtype in DTYPES for bucket in HEAD_DIM_BUCKETS for causal in (False, True)
                   for dropout in (False, True) for limit in limits for hopper in (False, True)
                   for softcap in (False, True)}, key=repr)


def is_hopper(variant):
    """True for a forward or backward variant of the sm_90a kernel family."""
    return isinstance(variant.tile, (HopperFwdTile, HopperBwdTile))


def num_m_blocks(seqlen_q, tile):
    return -(-seqlen_q // tile.block_m)


# ---- backward -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BwdTile:
    """Tiles of the backward: each flash_bwd_dkdv CTA owns block_n keys (Bc) and walks Q tiles
    of block_m rows (Br) with num_warps warps, laid out as sdp_wm x (num_warps / sdp_wm) over
    the (Bc, Br) S^T and dP^T, kv_wm x .. over the (Bc, d) dK and dV, dq_wm x .. over the
    (Br, d) dQ; flash_bwd_dq (deterministic mode) runs Br/16 warps over K/V tiles of dq_block_n keys."""

    block_m: int
    block_n: int
    num_warps: int
    dq_block_n: int
    sdp_wm: int
    kv_wm: int
    dq_wm: int

    def grids(self, bucket):
        """(rows, columns, warps along rows) of the three GEMM outputs."""
        return ((self.block_n, self.block_m, self.sdp_wm), (self.block_n, bucket, self.kv_wm),
                (self.block_m, bucket, self.dq_wm))

    def check(self, bucket):
        if bucket not in HEAD_DIM_BUCKETS:
            raise ValueError(f"head-dim bucket {bucket} is not one of {HEAD_DIM_BUCKETS}")
        if self.dq_block_n % 16 or self.dq_block_n <= 0 or self.block_m % 16 or self.block_m <= 0:
            raise ValueError(f"tile: block_m={self.block_m} and dq_block_n={self.dq_block_n} must be positive multiples of 16")
        for rows, cols, wm in self.grids(bucket):
            if not _grid_ok(rows, cols, wm, self.num_warps):
                raise ValueError(f"tile: {wm} x {self.num_warps // max(wm, 1)} warps cannot tile a ({rows}, {cols}) "
                                 "output in m16 x n16 pieces")

    @property
    def threads(self):
        return 32 * self.num_warps

    @property
    def dq_threads(self):
        return 32 * (self.block_m // 16)


def _grid_ok(rows, cols, wm, warps):
    """The kernel's WarpGrid: wm x (warps / wm) warps, each an m16 x n16 multiple of the output."""
    return wm > 0 and warps % wm == 0 and rows % (16 * wm) == 0 and cols % (16 * (warps // wm)) == 0


@dataclass(frozen=True)
class HopperBwdTile:
    """Tiles of the sm_90a dK/dV kernel (cuda_src/flash_bwd_sm90.cu): a producer warpgroup and two
    consumer warpgroups own block_n keys and walk Q tiles of block_m rows, Q and dO in a ring of
    `stages` slots. With block_n = 128 each consumer warpgroup owns 64 keys; with block_n = 64
    (block_m = 32) the two split the head dim instead, for d256, whose dK and dV would need 256
    registers per thread. dQ tiles are added in whatever order the CTAs reach them (bulk
    reductions), so deterministic runs stay portable."""

    block_m: int
    block_n: int = 128
    stages: int = 2

    def check(self, bucket):
        if bucket not in HOPPER_BWD_HEAD_DIMS:
            raise ValueError(f"head-dim bucket {bucket} has no sm_90a backward (those are {HOPPER_BWD_HEAD_DIMS})")
        if self.block_n == 64:
            if self.block_m != 32:
                raise ValueError(f"tile: block_m={self.block_m} must be 32 with block_n=64 (warpgroups that split d)")
            if bucket % 128:
                raise ValueError(f"tile: block_n=64 at d={bucket} splits d into halves that are not whole 64-column panels")
        elif self.block_n == 128:
            if self.block_m not in (64, 128):
                raise ValueError(f"tile: block_m={self.block_m} must be 64 or 128 (wgmma n of S^T)")
            if bucket > 128:
                raise ValueError(f"tile: block_n=128 at d={bucket} needs {bucket} registers per thread for dK and dV; "
                                 "block_n=64 splits d instead")
            if (bucket * self.block_m // 64) // (self.block_n // 64) % 64:
                raise ValueError(f"tile: block_m={self.block_m} at d={bucket} cuts dQ into blocks narrower than 64 columns")
        else:
            raise ValueError(f"tile: block_n={self.block_n} must be 128 (two consumer warpgroups of 64 keys) or 64 "
                             "(two that split d)")
        if not 2 <= self.stages <= 4:
            raise ValueError(f"tile: stages={self.stages} must be 2 to 4")

    @property
    def threads(self):
        return 3 * 128


@dataclass(frozen=True)
class BwdVariant:
    dtype: str
    head_dim: int  # the bucket
    causal: bool
    deterministic: bool
    tile: BwdTile
    dropout: bool = False
    flush: bool = False  # dK/dV accumulators flushed to float32 partial sums (dkdv_flush_every)
    softcap: bool = False


# Backward tiles per head-dim bucket, for an H100 (227 KB per block); fit_bwd_tile shrinks them.
# 8 warps own Bc = 128 keys (64 at d > 128, where dK and dV need d/2 accumulators per thread).
# Warp grids as flash-attn 2's: 32 x 32 warp blocks of S^T, 32 x 64 of dK/dV and 32 x 32 of dQ
# read a quarter fewer bytes from shared memory than warps stacked along rows (16 x 64, 16 x 128).
BWD_TILES = {
    # d <= 64: Br = 128 halves the K/V passes per Q row; 238 vs 219 TFLOP/s at d64, s=4k (bench --tiles)
    32: BwdTile(128, 128, 8, 64, sdp_wm=4, kv_wm=4, dq_wm=4),   # 133 KB
    64: BwdTile(128, 128, 8, 64, sdp_wm=4, kv_wm=4, dq_wm=4),   # 182 KB
    96: BwdTile(64, 128, 8, 64, sdp_wm=4, kv_wm=4, dq_wm=4),    # 96 = 6 x n16: dQ warps 4 x 2
    128: BwdTile(64, 128, 8, 64, sdp_wm=4, kv_wm=4, dq_wm=2),   # flash-attn 2's; 177 KB: sm_80 runs Br = 32
    160: BwdTile(64, 64, 8, 32, sdp_wm=2, kv_wm=4, dq_wm=4),   # 160 = 10 x n16: 4 x 2 warps
    192: BwdTile(64, 64, 8, 32, sdp_wm=2, kv_wm=2, dq_wm=2),
    224: BwdTile(64, 64, 8, 32, sdp_wm=2, kv_wm=4, dq_wm=4),   # 224 = 14 x n16: 4 x 2 warps
    256: BwdTile(64, 64, 8, 32, sdp_wm=2, kv_wm=2, dq_wm=2),    # 222 KB; sm_80 runs Br = 32
}


# The sm_90a dK/dV kernel, picked on compute capability 9.0 (deterministic=False) for these
# buckets. Registers per consumer thread: dK and dV take d each (d / 2 at d256), S^T and dP^T
# block_m / 2 each (block_m / 4 at d256).
HOPPER_BWD_TILES = {
    64: HopperBwdTile(128),   # 195 KB; each warpgroup adds a 64-row block of dQ
    128: HopperBwdTile(64),   # 194 KB; one warpgroup adds the whole 64-row dQ block (kSoloDq)
    # d256: warpgroups that split d; a third Q/dO slot measured +0.8% (bench/NOTES.md, v2.18).
    256: HopperBwdTile(32, 64, 3),  # 218 KB; dQ^T (d, 32) from two m64n32 GEMMs per warpgroup
}
HOPPER_BWD_HEAD_DIMS = tuple(HOPPER_BWD_TILES)


def backward_smem_bytes(head_dim, tile):
    """Shared memory of the dK/dV kernel, which static_asserts it (SMEM_BYTES). flash_bwd_dkdv:
    K, V; Q and dO double-buffered; P^T and dS^T; lse2 and D double-buffered. flash_bwd_dkdv_sm90
    (SharedStorage): K, V; Q and dO in `stages` slots; two dS^T buffers (with block_n = 64 also
    two of P^T and P^T in float32); the float32 dQ tile; lse2 and D per slot; 2 + 3 * stages
    mbarriers; SMEM_ALIGN_SLACK bytes of alignment slack."""
    if isinstance(tile, HopperBwdTile):
        st_buffers, p_floats = (4, tile.block_n * tile.block_m) if tile.block_n == 64 else (2, 0)
        tiles = (2 * tile.block_n + 2 * tile.stages * tile.block_m) * head_dim * 2 + st_buffers * tile.block_n * tile.block_m * 2
        floats = p_floats + tile.block_m * head_dim + tile.stages * 2 * tile.block_m
        return tiles + floats * 4 + MBARRIER_BYTES * (2 + 3 * tile.stages) + SMEM_ALIGN_SLACK
    pitch_bytes = (head_dim + 8) * 2
    return ((2 * tile.block_n + 4 * tile.block_m) * pitch_bytes
            + 2 * tile.block_n * (tile.block_m + 8) * 2 + 4 * tile.block_m * 4)


def backward_dq_smem_bytes(head_dim, tile):
    """flash_bwd_dq: Q and dO, and a 2-stage ring of K and V tiles."""
    return (2 * tile.block_m + 4 * tile.dq_block_n) * (head_dim + 8) * 2


def _halvings(n, smallest):
    while n >= smallest:
        yield n
        n //= 2


def _fit_grids(tile, bucket):
    """`tile` with each warp grid moved to the nearest legal one (fewer warps along rows first)."""
    fitted = {}
    for field, (rows, cols, wm) in zip(("sdp_wm", "kv_wm", "dq_wm"), tile.grids(bucket)):
        choices = sorted(range(1, tile.num_warps + 1), key=lambda w: (abs(w - wm), -w))
        legal = [w for w in choices if _grid_ok(rows, cols, w, tile.num_warps)]
        if not legal:
            return None
        fitted[field] = legal[0]
    return replace(tile, **fitted)


def fit_bwd_tile(tile, head_dim, smem_limit):
    """The largest legal shrink of `tile` (Br first, then Bc; dq_block_n on its own) whose
    kernels fit smem_limit bytes of shared memory."""
    for block_n in _halvings(tile.block_n, 16):
        for block_m in _halvings(tile.block_m, 16):
            candidate = _fit_grids(replace(tile, block_m=block_m, block_n=block_n), head_dim)
            if candidate is None or backward_smem_bytes(head_dim, candidate) > smem_limit:
                continue
            for dq_block_n in _halvings(tile.dq_block_n, 16):
                candidate = replace(candidate, dq_block_n=dq_block_n)
                if backward_dq_smem_bytes(head_dim, candidate) <= smem_limit:
                    return candidate
    raise ValueError(f"the backward at head dim {head_dim} needs more than this GPU's {smem_limit} bytes "
                     "of shared memory per block")


def backward_variant(dtype, head_dim, causal, deterministic, tile=None, smem_limit=None, dropout=False, hopper=False,
                     softcap=False):
    """The backward variant for (dtype, caller's head_dim, causal, deterministic, dropout) on a GPU
    with smem_limit bytes of shared memory per block: the sm_90a dK/dV kernel if `hopper`, not
    deterministic and the bucket has one. Where the head dim's own bucket cannot fit (d224 on
    sm_80), a larger bucket that fits runs it, zero-padded; `tile` overrides the table (its type
    picks the kernel family)."""
    _check_tile_type(tile, (BwdTile, HopperBwdTile))
    bucket = head_dim_bucket(head_dim)
    flags = (bool(causal), bool(deterministic))
    if tile is None and hopper and not deterministic and bucket in HOPPER_BWD_TILES:
        tile = HOPPER_BWD_TILES[bucket]
    if isinstance(tile, HopperBwdTile) and deterministic:
        raise ValueError("tile: the sm_90a backward adds dQ tiles in no fixed order; deterministic=True needs a BwdTile")
    if tile is not None:
        tile.check(bucket)
        return BwdVariant(dtype, bucket, *flags, tile, bool(dropout), softcap=bool(softcap))
    if smem_limit is None:
        return BwdVariant(dtype, bucket, *flags, BWD_TILES[bucket], bool(dropout), softcap=bool(softcap))
    for larger in HEAD_DIM_BUCKETS[HEAD_DIM_BUCKETS.index(bucket):]:
        try:
            tile = fit_bwd_tile(BWD_TILES[larger], larger, smem_limit)
        except ValueError as error:
            reason = error
            continue
        return BwdVariant(dtype, larger, *flags, tile, bool(dropout), softcap=bool(softcap))
    raise reason


def backward_variants():
    """Every backward variant the dispatcher can pick on an sm_80+ GPU whose shared memory fits it
    (CI compiles the portable ones for sm_80 and sm_90a, the Hopper ones for sm_90a)."""
    variants = set()
    for limit in sorted(set(SMEM_OPTIN_BY_CC.values())):
        for dtype in DTYPES:
            for bucket in HEAD_DIM_BUCKETS:
                for causal in (False, True):
                    for deterministic, dropout, hopper, softcap in itertools.product((False, True), repeat=4):
                        try:
                            variant = backward_variant(dtype, bucket, causal, deterministic, smem_limit=limit,
                                                       dropout=dropout, hopper=hopper, softcap=softcap)
                        except ValueError:  # d > 192 backward does not fit 99 KB
                            continue
                        variants |= {variant, replace(variant, flush=True)}
    return sorted(variants, key=repr)
