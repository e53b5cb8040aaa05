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


class _RecordingLaunch(launch.KernelLaunch):
    """A KernelLaunch that records its streams instead of calling the driver."""

    def __init__(self, *parts):
        super().__init__(_Function(), 1, 128, 0, *parts)
        self.streams = []

    def __call__(self, stream):
        self.streams.append(stream)


@pytest.mark.parametrize("dropout", [False, True])
def test_launch_forward_writes_the_calls_fields_into_the_plans_buffer(dropout):
    """A ForwardPlan's buffer holds its static fields; launch_forward writes the pointers (and,
    with dropout, the Philox words) in place and launches on the caller's stream."""
    from cuflash import dropout as dropout_, plan
    from cuflash.forward_launch import ForwardPlan, launch_forward

    static = {name: 0 for name in params.FWD.names}
    static.update(seqlen_q=113, seqlen_k=203, num_heads=4, scale_log2=0.25, threshold=7)
    recorder = _RecordingLaunch(params.FWD.pack(static))
    variant = plan.forward_variant("float16", 64, False, dropout=dropout)
    fplan = ForwardPlan(variant=variant, launcher=recorder, maps=(), mapped=[])
    launch_forward(fplan, 16, 32, 48, 64, 80, 0xABC, seed=2**40 + 5, offset=9, counter=96)
    seed_lo, seed_hi, offset = dropout_.rng_words(2**40 + 5, 9) if dropout else (0, 0, 0)
    expected = {**static, "q": 16, "k": 32, "v": 48, "o": 64, "lse": 80, "unit_counter": 96, "seed_lo": seed_lo,
                "seed_hi": seed_hi, "offset": offset}
    assert recorder.buffer.raw == params.FWD.pack(expected) and recorder.streams == [0xABC]
