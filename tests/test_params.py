"""CPU: the kernels' parameter structs (cuda_src/params.cuh) and their Python description
(cuflash/params.py) agree, and a disagreement fails the build. NVRTC only, no GPU."""
import re

import pytest

from cuflash import compile as compile_, params, plan

def _programs():
    """One program of every kernel file, each checking the structs it uses."""
    forward = plan.forward_variants()
    backward = plan.backward_variants()
    return {
        "flash_fwd.cu": compile_.forward_program(next(v for v in forward if not plan.is_hopper(v))),
        "flash_fwd_sm90.cu": compile_.forward_program(next(v for v in forward if plan.is_hopper(v))),
        "flash_bwd.cu": compile_.backward_program(next(v for v in backward if not plan.is_hopper(v))),
        "flash_bwd_sm90.cu": compile_.backward_program(next(v for v in backward if plan.is_hopper(v))),
        "dropout_mask.cu": compile_.DROPOUT_MASK_PROGRAM,
    }


def _compile(program, source):
    class Edited:
        file, names, options = program.file, program.names, program.options

    Edited.source = source
    return compile_.compile_program(Edited, program.arch or "sm_80")


def test_every_program_checks_the_structs_it_launches_with():
    programs = _programs()
    assert programs["flash_fwd.cu"].layouts == ("FwdParams",)
    assert programs["flash_fwd_sm90.cu"].layouts == ("FwdParams", "TmaMaps")
    assert programs["flash_bwd.cu"].layouts == ("BwdParams",)
    assert programs["flash_bwd_sm90.cu"].layouts == ("BwdParams", "TmaMaps")
    assert programs["dropout_mask.cu"].layouts == ("MaskParams",)
    for program in programs.values():
        for name in program.layouts:
            assert params.LAYOUTS[name].static_asserts() in program.source


def test_layout_follows_c_rules():
    layout = params.Layout("T", [("a", "i"), ("b", "P"), ("c", "f"), ("m", "s"), ("d", "I")])
    assert layout.offsets == (0, 8, 16, 64, 192) and layout.size == 256 and layout.alignment == 64
    packed = layout.pack({"a": 1, "b": 2, "c": 0.5, "m": b"x" * 128, "d": 3})
    assert len(packed) == 256 and packed[8:16] == (2).to_bytes(8, "little") and packed[64:192] == b"x" * 128


def test_pack_names_every_field_once():
    with pytest.raises(ValueError, match=r"missing fields \['seqlen_k'\]"):
        params.MASK.pack({"mask": 0, "calls": 1, "seqlen_q": 1, "seed_lo": 0, "seed_hi": 0, "offset": 0, "threshold": 0})
    with pytest.raises(ValueError, match=r"unknown fields \['seqlen'\]"):
        params.MASK.pack({"mask": 0, "calls": 1, "seqlen_q": 1, "seqlen_k": 1, "seqlen": 1, "seed_lo": 0, "seed_hi": 0,
                          "offset": 0, "threshold": 0})


def test_a_run_of_fields_is_written_in_place():
    values = {"mask": 1, "calls": 5, "seqlen_q": 3, "seqlen_k": 4, "seed_lo": 0, "seed_hi": 0, "offset": 0,
              "threshold": 9}
    buffer = bytearray(params.MASK.pack(values))
    offset, run = params.MASK.run(("seqlen_k", "seed_lo", "seed_hi"))
    run.pack_into(buffer, offset, 40, 41, 42)
    assert bytes(buffer) == params.MASK.pack({**values, "seqlen_k": 40, "seed_lo": 41, "seed_hi": 42})
    offset, run = params.MASK.run(("mask",))
    run.pack_into(buffer, offset, 1234)
    assert bytes(buffer)[:8] == (1234).to_bytes(8, "little")
    for names in (("mask", "seqlen_q"), ("calls", "mask"), ("nothing",), ()):
        with pytest.raises(ValueError, match="consecutive fields"):
            params.MASK.run(names)


def test_a_run_skips_the_padding_between_its_fields():
    layout = params.Layout("T", [("a", "i"), ("b", "P"), ("c", "i")])
    offset, run = layout.run(("a", "b", "c"))
    assert offset == 0 and run.size == 20
    buffer = bytearray(layout.pack({"a": 1, "b": 2, "c": 3}))
    run.pack_into(buffer, offset, 1, 2, 3)
    assert bytes(buffer) == layout.pack({"a": 1, "b": 2, "c": 3})


@pytest.mark.parametrize("file", ["flash_fwd.cu", "flash_fwd_sm90.cu", "flash_bwd.cu", "flash_bwd_sm90.cu", "dropout_mask.cu"])
def test_the_kernels_compile_against_the_description(file):
    program = _programs()[file]
    _compile(program, program.source)


# A swapped pair on either side, a retyped field and an added field: each fails the build.
EDITS = {
    "header swaps two ints": ("params.cuh", "int seqlen_q, seqlen_k, num_heads", "int seqlen_k, seqlen_q, num_heads"),
    "header retypes a field": ("params.cuh", "float scale_log2;        // softmax_scale", "int scale_log2;        // softmax_scale"),
    "header adds a field": ("params.cuh", "    int num_m_blocks;\n    int num_bh", "    int num_m_blocks;\n    int window;\n    int num_bh"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_header_that_disagrees_fails_to_compile(edit):
    _, old, new = EDITS[edit]
    program = _programs()["flash_fwd.cu"]
    source = program.source
    assert source.count(old) == 1
    with pytest.raises(RuntimeError, match=r"FwdParams.*cuflash/params.py expects"):
        _compile(program, source.replace(old, new))


def test_a_description_that_swaps_two_fields_fails_to_compile(monkeypatch):
    fields = list(zip(params.FWD.paths, params.FWD.kinds))
    i, j = params.FWD.paths.index("seqlen_q"), params.FWD.paths.index("seqlen_k")
    fields[i], fields[j] = fields[j], fields[i]
    swapped = params.Layout("FwdParams", fields)
    program = _programs()["flash_fwd.cu"]
    source = program.source.replace(params.FWD.static_asserts(), swapped.static_asserts())
    with pytest.raises(RuntimeError, match=re.escape("FwdParams.seqlen_k: cuflash/params.py expects a int32 at byte")):
        _compile(program, source)
