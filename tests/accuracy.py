"""The error rule of every correctness test: compare with float64, never with cuflash itself.

cuflash's error against the float64 reference must be at most twice the error of the same
computation done in the input's precision (reference.attention_reference(upcast=False)), plus a
small absolute slack for the final rounding of O.
"""
import numpy as np

SLACK = {"float16": 2e-4, "bfloat16": 2e-3, "float32": 1e-6, "float64": 1e-12}


def max_abs_err(a, b):
    """max |a - b| over finite entries; inf entries must match exactly (e.g. lse = -inf rows)."""
    xp = _xp(a)
    a = xp.asarray(a, dtype=np.float64)
    b = xp.asarray(b, dtype=np.float64)
    assert not bool(xp.isnan(a).any()), "result holds NaN (an unwritten or poisoned element?)"
    same_inf = xp.isinf(a) == xp.isinf(b)
    assert bool(same_inf.all()), "infinite entries differ from the reference"
    finite = xp.isfinite(b)
    if not bool(finite.any()):
        return 0.0
    return float(xp.abs(xp.where(finite, a, 0) - xp.where(finite, b, 0)).max())


def assert_2x(out, ref64, ref_lowp, dtype, what="o"):
    err = max_abs_err(out, ref64)
    err_lowp = max_abs_err(ref_lowp, ref64)
    bound = 2 * err_lowp + SLACK[dtype]
    assert err <= bound, f"{what}: error {err:.3g} > 2 x {err_lowp:.3g} (same computation in {dtype}) + {SLACK[dtype]}"
    return err, err_lowp


def assert_matches_finite_differences(grads, inputs, dout, forward, seed, eps=1e-6):
    """<grad, u> = d/de <dO, forward(x + e u)> by central differences, for each input x in turn
    (float64; `forward(*inputs)` returns O)."""
    rng = np.random.default_rng(seed)
    for which, grad in enumerate(grads):
        u = rng.standard_normal(grad.shape)
        plus, minus = list(inputs), list(inputs)
        plus[which] = plus[which] + eps * u
        minus[which] = minus[which] - eps * u
        numeric = float((dout * (forward(*plus) - forward(*minus))).sum() / (2 * eps))
        analytic = float((grad * u).sum())
        assert abs(numeric - analytic) <= 1e-6 * (1 + abs(analytic)), f"gradient {which}"


def _xp(a):
    try:
        import cupy

        return cupy.get_array_module(a)
    except ImportError:
        return np
