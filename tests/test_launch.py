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


class _Function:
    ptr = 0xDEAD


def test_a_kernel_launch_builds_its_buffer_once_and_takes_writes_in_place():
    fields = params.MASK.pack({"mask": 1, "calls": 2, "seqlen_q": 3, "seqlen_k": 4, "seed_lo": 5, "seed_hi": 6,
                               "offset": 7, "threshold": 8})
    kernel_launch = launch.KernelLaunch(_Function(), 3, 128, 0, fields)
    assert kernel_launch.offsets == (0,) and kernel_launch.buffer.raw == fields
    at, run = params.MASK.run(("mask", "calls"))
    run.pack_into(kernel_launch.buffer, at, 11, 12)
    assert kernel_launch.buffer.raw == params.MASK.pack({"mask": 11, "calls": 12, "seqlen_q": 3, "seqlen_k": 4,
                                                         "seed_lo": 5, "seed_hi": 6, "offset": 7, "threshold": 8})
