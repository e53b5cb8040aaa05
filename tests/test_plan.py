"""CPU: the launch plan. Head dims map to the smallest bucket that holds them; every tile in the
table is legal and fits an H100's shared memory, and shrinks to fit smaller GPUs; the
dispatcher's variants cover the support matrix."""
import itertools

import pytest
from hypothesis import given, strategies as st

from cuflash import plan
from cuflash.plan import FwdTile, HopperBwdTile, HopperFwdTile

H100_SMEM_OPTIN = 232448  # bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 (227 KB)


@pytest.mark.parametrize("head_dim", range(8, 257, 8))
def test_head_dim_bucket_is_smallest_that_fits(head_dim):
    bucket = plan.head_dim_bucket(head_dim)
    assert bucket in plan.HEAD_DIM_BUCKETS and bucket >= head_dim
    assert all(b < head_dim for b in plan.HEAD_DIM_BUCKETS if b < bucket)


@pytest.mark.parametrize("head_dim", [257, 264, 512])
def test_head_dim_bucket_refuses_too_large(head_dim):
    with pytest.raises(ValueError, match=str(head_dim)):
        plan.head_dim_bucket(head_dim)


def test_buckets_ascend_and_cover_256():
    assert list(plan.HEAD_DIM_BUCKETS) == sorted(set(plan.HEAD_DIM_BUCKETS))
    assert plan.MAX_HEAD_DIM == 256 and all(b % 8 == 0 for b in plan.HEAD_DIM_BUCKETS)


def test_every_bucket_has_a_tile():
    assert set(plan.FWD_TILES) == set(plan.HEAD_DIM_BUCKETS)


@pytest.mark.parametrize("bucket", plan.HEAD_DIM_BUCKETS)
def test_table_tiles_are_legal_and_fit_h100(bucket):
    tile = plan.FWD_TILES[bucket]
    tile.check(bucket)
    smem = plan.forward_smem_bytes(bucket, tile)
    assert smem <= H100_SMEM_OPTIN, f"d{bucket} {tile}: {smem} bytes of shared memory > {H100_SMEM_OPTIN}"


def test_forward_smem_bytes():
    # A Q tile (128 rows) and `stages` K and V tiles (64 rows each), rows of 128 + 8 halves.
    assert plan.forward_smem_bytes(128, FwdTile(128, 64, 8, stages=2)) == (128 + 2 * 2 * 64) * 136 * 2
    assert plan.forward_smem_bytes(128, FwdTile(128, 64, 8, stages=3)) == (128 + 3 * 2 * 64) * 136 * 2


def test_forward_variants_cover_the_support_matrix():
    """2 dtypes x 8 head-dim buckets x causal or not x dropout or not x softcap or not, each with
    its table tile, and nothing twice."""
    variants = plan.forward_variants()
    assert len(variants) == len(set(variants))
    assert {(v.dtype, v.head_dim, v.causal, v.dropout, v.softcap) for v in variants} == {
        (dtype, bucket, causal, dropout, softcap) for dtype in ("float16", "bfloat16")
        for bucket in (32, 64, 96, 128, 160, 192, 224, 256) for causal in (False, True) for dropout in (False, True)
        for softcap in (False, True)}
    def table_tile(v):
        return plan.FWD_DROPOUT_TILES.get(v.head_dim, plan.FWD_TILES[v.head_dim]) if v.dropout else plan.FWD_TILES[v.head_dim]

    defaults = {v for v in variants if v.tile == table_tile(v)}
    assert len(defaults) == 2 * 8 * 2 * 2 * 2 == 128


@pytest.mark.parametrize("cc, smem_limit", sorted(plan.SMEM_OPTIN_BY_CC.items()))
def test_every_gpu_gets_a_tile_that_fits(cc, smem_limit):
    """On each sm_80+ GPU the dispatcher picks, for every bucket, a legal tile within the GPU's
    opt-in shared memory, and CI compiles it."""
    compiled = set(plan.forward_variants())
    for bucket in plan.HEAD_DIM_BUCKETS:
        variant = plan.forward_variant("float16", bucket, True, smem_limit=smem_limit)
        variant.tile.check(bucket)
        assert plan.forward_smem_bytes(bucket, variant.tile) <= smem_limit, f"sm_{cc} d{bucket} {variant.tile}"
        assert variant in compiled, f"sm_{cc} d{bucket} {variant.tile} is not compiled in CI"


@given(head_dim=st.integers(1, 256), causal=st.booleans(), dtype=st.sampled_from(plan.DTYPES),
       smem_limit=st.sampled_from([None, *plan.SMEM_OPTIN_BY_CC.values()]), dropout=st.booleans())
def test_forward_variant_is_one_of_the_compiled(head_dim, causal, dtype, smem_limit, dropout):
    """Whatever the caller's head dim and GPU, the dispatcher picks a variant CI compiles."""
    variant = plan.forward_variant(dtype, head_dim, causal, smem_limit=smem_limit, dropout=dropout)
    assert variant.dropout == dropout and variant in plan.forward_variants()


def test_forward_variant_tile_override():
    tile = FwdTile(64, 32, 4)
    variant = plan.forward_variant("float16", 72, 1, tile)
    assert (variant.head_dim, variant.causal, variant.tile) == (96, True, tile)
    with pytest.raises(ValueError, match="block_n"):
        plan.forward_variant("float16", 72, False, FwdTile(64, 24, 4))


@pytest.mark.parametrize("tile, bucket, message", [
    (FwdTile(96, 64, 4), 64, "block_m"),     # 24 rows per warp
    (FwdTile(64, 64, 8), 64, "block_m"),     # 8 rows per warp
    (FwdTile(100, 64, 4), 64, "block_m"),    # warps do not divide block_m
    (FwdTile(64, 24, 4), 64, "block_n"),
    (FwdTile(64, 8, 4), 64, "block_n"),
    (FwdTile(64, 0, 4), 64, "block_n"),
    (FwdTile(64, -16, 4), 64, "block_n"),
    (FwdTile(64, 64, 4, stages=1), 64, "stages"),
    (FwdTile(64, 64, 4), 100, "bucket"),
], ids=str)
def test_tile_check_rejects(tile, bucket, message):
    with pytest.raises(ValueError, match=message):
        tile.check(bucket)


# Degenerate tiles that check() lets through today (0 rows per warp is "a multiple of 16";
# divmod by 0 warps raises ZeroDivisionError). Strict: fixing plan.FwdTile.check turns these red,
# so the mark is removed with the fix.
@pytest.mark.parametrize("tile", [FwdTile(0, 64, 4), FwdTile(64, 64, 0)], ids=str)
def test_tile_check_rejects_empty(tile):
    with pytest.raises(ValueError):
        tile.check(64)


def test_tile_threads():
    assert FwdTile(128, 64, 8).threads == 256 and FwdTile(64, 64, 4).threads == 128


# ---- the sm_90a forward ------------------------------------------------------------------------

@pytest.mark.parametrize("bucket", plan.HEAD_DIM_BUCKETS)
@pytest.mark.parametrize("dropout", [False, True])
def test_hopper_dispatch(bucket, dropout):
    """On compute capability 9.0 the buckets with an sm_90a kernel get it, the others the portable
    one; elsewhere (hopper=False) nothing changes. Either way CI compiles the pick."""
    variant = plan.forward_variant("bfloat16", bucket, True, smem_limit=H100_SMEM_OPTIN, dropout=dropout, hopper=True)
    assert plan.is_hopper(variant) == (bucket in plan.HOPPER_HEAD_DIMS)
    assert variant in plan.forward_variants()
    assert not plan.is_hopper(plan.forward_variant("bfloat16", bucket, True, smem_limit=H100_SMEM_OPTIN, dropout=dropout))


def test_hopper_d64_dropout_keeps_two_consumer_warpgroups():
    """Three consumer warpgroups have 160 registers each, too few for the Philox calls."""
    assert plan.forward_variant("bfloat16", 64, False, hopper=True).tile == HopperFwdTile(192, 128, 3)
    assert plan.forward_variant("bfloat16", 64, False, hopper=True, dropout=True).tile == HopperFwdTile(128, 128, 3, o_staged=False)


def test_hopper_dropout_stores_o_from_registers():
    """With dropout, O stored from registers measured faster than O staged through shared memory."""
    for d in (64, 128, 256):
        for causal in (False, True):
            assert not plan.forward_variant("float16", d, causal, hopper=True, dropout=True).tile.o_staged
    assert plan.forward_variant("float16", 128, False, hopper=True).tile.o_staged


def test_hopper_head_dims_below_a_bucket_are_padded():
    variant = plan.forward_variant("float16", 100, False, hopper=True)
    assert variant.head_dim == 128 and variant.tile == plan.HOPPER_FWD_TILES[128]


def test_tile_type_picks_the_kernel_family():
    assert plan.is_hopper(plan.forward_variant("float16", 64, False, HopperFwdTile(64, 64)))
    assert not plan.is_hopper(plan.forward_variant("float16", 64, False, FwdTile(64, 64, 4), hopper=True))


@pytest.mark.parametrize("bucket, tile, smem_bytes",
                         [(b, t, plan.forward_smem_bytes) for b, t in plan.HOPPER_FWD_TILES.items()] +
                         [(b, t, plan.backward_smem_bytes) for b, t in plan.HOPPER_BWD_TILES.items()],
                         ids=lambda x: getattr(x, "__name__", str(x)))  # names, not reprs with addresses (xdist)
def test_hopper_tiles_are_legal_and_fit_h100(bucket, tile, smem_bytes):
    tile.check(bucket)
    assert smem_bytes(bucket, tile) <= H100_SMEM_OPTIN


def test_hopper_smem_bytes():
    # Q (128 rows), two K and two V tiles (128 rows each) and the staged O (128 rows) of 128
    # unpadded halves, 6 + 4 * stages mbarriers and the unit queue's 2 slots, plus 1 KB of
    # alignment slack (the kernels static_assert the same sum: tests/test_nvrtc.py compiles them).
    assert plan.forward_smem_bytes(128, HopperFwdTile(128, 128)) == (128 + 4 * 128 + 128) * 128 * 2 + 8 * 14 + 8 + 1024
    assert plan.forward_smem_bytes(128, HopperFwdTile(128, 64, 3, o_staged=False)) == (128 + 6 * 64) * 128 * 2 + 8 * 18 + 8 + 1024


def test_a_wrong_smem_size_fails_the_compile(monkeypatch):
    """A launcher size that disagrees with a kernel's layout fails its static_assert (NVRTC, no GPU)."""
    from cuflash import compile as compile_

    variant = plan.forward_variant("bfloat16", 128, False, hopper=True)
    size = plan.forward_smem_bytes(variant.head_dim, variant.tile)
    compile_.forward_program.cache_clear()
    monkeypatch.setattr(plan, "forward_smem_bytes", lambda head_dim, tile: size - 8)
    try:
        with pytest.raises(RuntimeError, match="forward_smem_bytes disagrees with SharedStorage"):
            compile_.compile_program(compile_.forward_program(variant), "sm_90a")
    finally:
        compile_.forward_program.cache_clear()


def test_hopper_threads():
    """A producer warpgroup and one consumer warpgroup per 64 rows."""
    assert HopperFwdTile(128, 128).threads == 384 and HopperFwdTile(64, 64).threads == 256


@pytest.mark.parametrize("tile, bucket, message", [
    (HopperFwdTile(96, 128), 128, "block_m"),
    (HopperFwdTile(256, 128), 128, "block_m"),
    (HopperFwdTile(128, 24), 128, "block_n"),
    (HopperFwdTile(128, 96), 128, "block_n"),       # no wgmma n = 96 wrapper
    (HopperFwdTile(128, 128), 96, "bucket"),
    (HopperFwdTile(128, 64, stages=1), 128, "stages"),
], ids=str)
def test_hopper_tile_check_rejects(tile, bucket, message):
    with pytest.raises(ValueError, match=message):
        tile.check(bucket)


# ---- backward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bucket", plan.HEAD_DIM_BUCKETS)
def test_backward_table_tiles_are_legal_and_fit_h100(bucket):
    tile = plan.BWD_TILES[bucket]
    tile.check(bucket)
    assert plan.backward_smem_bytes(bucket, tile) <= H100_SMEM_OPTIN
    assert plan.backward_dq_smem_bytes(bucket, tile) <= H100_SMEM_OPTIN


@pytest.mark.parametrize("cc, smem_limit", sorted(plan.SMEM_OPTIN_BY_CC.items()))
def test_backward_fits_every_gpu_that_can_hold_it(cc, smem_limit):
    """Each GPU gets a legal backward tile within its shared memory for every bucket that fits at
    all (d > 128 does not fit sm_86/89's 99 KB with 8 warps), and CI compiles it."""
    compiled = set(plan.backward_variants())
    for bucket in plan.HEAD_DIM_BUCKETS:
        for deterministic, dropout in itertools.product((False, True), repeat=2):
            try:
                variant = plan.backward_variant("bfloat16", bucket, True, deterministic, smem_limit=smem_limit,
                                                dropout=dropout)
            except ValueError as error:
                assert smem_limit < 160 * 1024 and bucket > 128, error
                continue
            assert variant.head_dim >= bucket  # a larger bucket runs it where its own does not fit
            variant.tile.check(variant.head_dim)
            assert plan.backward_smem_bytes(variant.head_dim, variant.tile) <= smem_limit
            assert plan.backward_dq_smem_bytes(variant.head_dim, variant.tile) <= smem_limit
            assert variant in compiled


def test_backward_smem_bytes():
    tile = plan.BwdTile(64, 128, 8, 64, 4, 4, 2)
    # K, V (128 rows) + Q, dO double-buffered (4 x 64 rows), rows of 136 halves; P^T and dS^T
    # (128 x 72 halves each); lse2 and D double-buffered (4 x 64 floats).
    assert plan.backward_smem_bytes(128, tile) == (2 * 128 + 4 * 64) * 272 + 2 * 128 * 72 * 2 + 4 * 64 * 4
    assert plan.backward_dq_smem_bytes(128, tile) == (2 * 64 + 4 * 64) * 272


@pytest.mark.parametrize("tile", [plan.BwdTile(64, 128, 8, 64, 3, 4, 2), plan.BwdTile(64, 128, 8, 64, 4, 4, 8),
                                  plan.BwdTile(24, 128, 8, 64, 4, 4, 2), plan.BwdTile(64, 128, 8, 0, 4, 4, 2)], ids=str)
def test_backward_tile_check_rejects_bad_tiles(tile):
    with pytest.raises(ValueError):
        tile.check(128)


# ---- the sm_90a backward -----------------------------------------------------------------------

@pytest.mark.parametrize("bucket", plan.HEAD_DIM_BUCKETS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_hopper_backward_dispatch(bucket, deterministic):
    """On compute capability 9.0 the non-deterministic backward of d 64, 128 and 256 gets the sm_90a
    dK/dV kernel (dQ by bulk reductions); everything else stays portable; CI compiles the pick."""
    variant = plan.backward_variant("float16", bucket, False, deterministic, smem_limit=H100_SMEM_OPTIN, hopper=True)
    assert plan.is_hopper(variant) == (bucket in plan.HOPPER_BWD_HEAD_DIMS and not deterministic)
    assert variant in plan.backward_variants()


def test_hopper_backward_tile_refuses_deterministic():
    with pytest.raises(ValueError, match="deterministic"):
        plan.backward_variant("float16", 128, False, True, tile=HopperBwdTile(64))


@pytest.mark.parametrize("tile, bucket, message", [
    (HopperBwdTile(64, 96), 128, "block_n"),
    (HopperBwdTile(64, 64), 256, "block_m"),    # warpgroups that split d take Q tiles of 32 rows
    (HopperBwdTile(32), 128, "block_m"),
    (HopperBwdTile(64), 256, "registers"),      # dK and dV of 64 keys at d256: 256 per thread
    (HopperBwdTile(32, 64), 64, "panels"),      # d64 split in two: 32-column halves
    (HopperBwdTile(64), 96, "bucket"),
    (HopperBwdTile(64), 64, "dQ"),          # 64 rows x d64 over two warpgroups: 32-column blocks
    (HopperBwdTile(64, stages=5), 128, "stages"),
], ids=str)
def test_hopper_backward_tile_check_rejects(tile, bucket, message):
    with pytest.raises(ValueError, match=message):
        tile.check(bucket)
