"""CPU: which arrays the sm_90a kernels can read through a TMA tensor map (encoding one needs
the driver; deciding whether one can be encoded does not)."""
import pytest

from cuflash import tma
from helpers import array_info


def test_contiguous_and_strided_views_are_encodable():
    assert tma.encodable(array_info((2, 300, 4, 128), "bfloat16", (300 * 4 * 128, 4 * 128, 128, 1)))
    assert tma.encodable(array_info((2, 300, 4, 128), "bfloat16", (4 * 300 * 128, 128, 300 * 128, 1)))  # a (b, h, s, d) transpose
    assert tma.encodable(array_info((2, 300, 4, 128), "bfloat16", (300 * 3 * 4 * 128, 3 * 4 * 128, 128, 1)))  # one of packed qkv


@pytest.mark.parametrize("shape, strides, data_ptr, why", [
    ((2, 300, 4, 128), (300 * 128, 128, 0, 1), 1 << 20, "K/V broadcast over heads"),
    ((2, 300, 4, 128), (300 * 4 * 132, 4 * 132 + 4, 132, 1), 1 << 20, "rows 8 bytes off 16-byte alignment"),
    ((2, 300, 4, 128), (300 * 4 * 128, 4 * 128, 128, 1), (1 << 20) + 8, "base not 16-byte aligned"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_views_a_tensor_map_cannot_describe(shape, strides, data_ptr, why):
    assert not tma.encodable(array_info(shape, "bfloat16", strides, data_ptr=data_ptr)), why


def test_axes_of_length_one_accept_any_stride():
    """An axis of length 1 is never stepped, so its stride (0 after broadcasting, or anything a
    framework reports) does not matter."""
    assert tma.encodable(array_info((1, 300, 1, 64), "bfloat16", (0, 64, 7, 1)))
