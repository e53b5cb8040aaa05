"""Tile plans: which forward kernel variant runs a problem, and how big its tiles are.

A variant is fixed at compile time by (dtype, head-dim bucket, causal, tile). The tile table is
keyed by head-dim bucket; the reason for each entry sits beside it. Registers are ptxas's count
for sm_90 (bf16, causal); "spills" means local-memory traffic in the inner loop.
"""
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
class FwdVariant:
    """Everything that selects one compiled forward kernel."""

    dtype: str
    head_dim: int  # the bucket, not the caller's head dim
    causal: bool
    tile: FwdTile


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
SMEM_OPTIN_BY_CC = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def head_dim_bucket(head_dim):
    """Smallest compiled head dim >= head_dim (the kernel zero-pads the difference)."""
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} exceeds the largest supported head dim {MAX_HEAD_DIM}")


def forward_smem_bytes(head_dim, tile):
    """Shared memory of the forward kernel: a Q tile and `stages` K and V tiles, rows padded by 16 bytes."""
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


def forward_variant(dtype, head_dim, causal, tile=None, smem_limit=None):
    """The variant that runs (dtype, caller's head_dim, causal) on a GPU with smem_limit bytes of
    opt-in shared memory per block; `tile` overrides the table (and is then not shrunk)."""
    bucket = head_dim_bucket(head_dim)
    if tile is None:
        tile = FWD_TILES[bucket] if smem_limit is None else fit_tile(FWD_TILES[bucket], bucket, smem_limit)
    tile.check(bucket)
    return FwdVariant(dtype, bucket, bool(causal), tile)


def forward_variants():
    """Every forward variant the dispatcher can pick on any sm_80+ GPU (CI compiles each for
    sm_80 and sm_90a)."""
    limits = sorted(set(SMEM_OPTIN_BY_CC.values()))
    return sorted({forward_variant(dtype, bucket, causal, smem_limit=limit)
                   for dtype in DTYPES for bucket in HEAD_DIM_BUCKETS for causal in (False, True)
                   for limit in limits}, key=repr)


def num_m_blocks(seqlen_q, tile):
    return -(-seqlen_q // tile.block_m)
