"""CPU: the launch layer's parameter buffers (the driver call itself needs a GPU)."""
import pytest

from cuflash import launch, params


def test_a_lone_struct_is_the_buffer_and_needs_no_driver_query():
    assert launch.param_offsets(0xDEAD, 1) == (0,)
    packed = params.MASK.pack({"mask": 1, "calls": 2, "seqlen_q": 3, "seqlen_k": 4, "seed_lo": 5, "seed_hi": 6,
                               "offset": 7, "threshold": 8})
    assert launch.param_buffer((0,), [packed]) == packed


def test_each_part_sits_at_its_offset():
    # A kernel whose 64-byte aligned maps start past the struct, at an offset that puts their
    # absolute address in the constant bank on a 64-byte boundary, as ptxas lays out the sm_90a ones.
    blob = launch.param_buffer((0, 240), [b"a" * 200, b"m" * 512])
    assert len(blob) == 752 and blob[:200] == b"a" * 200 and blob[200:240] == bytes(40) and blob[240:] == b"m" * 512


def test_overlapping_offsets_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        launch.param_buffer((0, 100), [b"a" * 200, b"m" * 512])
