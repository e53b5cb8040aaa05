"""GPU: merge_states over cuflash's forwards on disjoint key ranges equals attention over all the
keys (2x rule against the float64 reference), from CuPy, PyTorch and JAX."""
import numpy as np
import pytest

from helpers import assert_2x, qkv

cupy = pytest.importorskip("cupy")
import cuflash  # noqa: E402
from cuflash.reference import attention_reference  # noqa: E402

pytestmark = pytest.mark.gpu

CUTS = (0, 0, 300, 301, 777)  # key ranges [0, 0) (empty), [0, 300), [300, 301), [301, 777)


def ranges():
    return list(zip(CUTS[:-1], CUTS[1:]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cupy_parts_merge_to_the_whole(dtype):
    q, k, v = qkv(2, 193, CUTS[-1], 4, 2, 128, dtype, seed=5)
    parts = [cuflash.forward(q, k[:, a:b], v[:, a:b]) for a, b in ranges()]
    o, lse = cuflash.merge_states([o for o, _ in parts], [lse for _, lse in parts])
    assert o.dtype == q.dtype and lse.dtype == np.float32
    o_ref, lse_ref = attention_reference(q, k, v)
    o_low, lse_low = attention_reference(q, k, v, upcast=False)
    assert_2x(o, o_ref, o_low, dtype)
    assert_2x(lse, lse_ref, lse_low, dtype, "lse")


def test_torch_parts_merge_to_the_whole(torch):
    q, k, v = (torch.from_dlpack(x) for x in qkv(1, 64, CUTS[-1], 8, 8, 64, "bfloat16", seed=9))
    parts = [cuflash.flash_attn_func(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in ranges()]
    o, lse = cuflash.merge_states([o for o, _ in parts], [lse for _, lse in parts])
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    assert_2x(cupy.from_dlpack(o), attention_reference(qc, kc, vc)[0], attention_reference(qc, kc, vc, upcast=False)[0],
              "bfloat16")


def test_jax_parts_merge_to_the_whole_under_jit(jax):
    q, k, v = (jax.dlpack.from_dlpack(x) for x in qkv(1, 64, CUTS[-1], 4, 1, 64, "float16", seed=3))

    @jax.jit
    def merged(q, k, v):
        parts = [cuflash.flash_attn_func(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in ranges() if b > a]
        return cuflash.merge_states([o for o, _ in parts], [lse for _, lse in parts])

    o, _ = merged(q, k, v)
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    assert_2x(cupy.from_dlpack(o), attention_reference(qc, kc, vc)[0], attention_reference(qc, kc, vc, upcast=False)[0],
              "float16")
