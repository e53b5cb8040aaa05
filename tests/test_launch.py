"""CPU: the launch layer's parameter-buffer layouts (the driver call itself needs a GPU)."""
import struct

import pytest

from cuflash import launch


def test_fields_split_a_signature_per_parameter():
    assert launch.fields("128s2Q3q2if4If") == ["128s", "Q", "Q", "q", "q", "q", "i", "i", "f", "I", "I", "I", "I", "f"]


@pytest.mark.parametrize("signature", ["2Qz", "Q 2i", "3"])
def test_fields_reject_unknown_codes(signature):
    with pytest.raises(ValueError, match="signature"):
        launch.fields(signature)


def test_padded_format_puts_each_parameter_at_its_offset():
    # A kernel whose 64-byte aligned tensor maps start 48 bytes in (the constant bank's parameter
    # base is not 64-byte aligned), as ptxas lays out flash_fwd_sm90.
    codes = launch.fields("128s128sQi")
    fmt = launch.padded_format(codes, [48, 176, 304, 312])
    packed = struct.pack(fmt, b"a" * 128, b"b" * 128, 7, 9)
    assert len(packed) == 316 and packed[:48] == bytes(48) and packed[48:176] == b"a" * 128
    assert struct.unpack_from("<Qi", packed, 304) == (7, 9)


def test_padded_format_matches_c_alignment_for_scalars():
    """Without blobs, offsets from C alignment give the '@' layout the other kernels use."""
    signature = "5Q12q6if4If"
    offsets, cursor = [], 0
    for code in launch.fields(signature):
        size = struct.calcsize(code)
        cursor = -(-cursor // size) * size
        offsets.append(cursor)
        cursor += size
    assert struct.calcsize(launch.padded_format(launch.fields(signature), offsets)) == cursor
    assert struct.calcsize("@" + signature) == cursor


def test_padded_format_rejects_overlaps():
    with pytest.raises(ValueError, match="overlap"):
        launch.padded_format(["Q", "Q"], [0, 4])
