"""Shared test setup: the `gpu` marker, skipped where CuPy sees no CUDA GPU; one hypothesis
profile for every suite (derandomized in CI); CuPy's memory pools freed after each GPU test; the
`torch` and `jax` fixtures (the framework module, or a skip where it is missing or sees no GPU)."""
import os

import pytest
from hypothesis import settings

# Kernels compile on first use, so a single example can take seconds: no per-example deadline.
settings.register_profile("cuflash", deadline=None, derandomize=bool(os.environ.get("CI")), print_blob=True)
settings.load_profile("cuflash")


def _gpu_available():
    try:
        import cupy

        return cupy.cuda.is_available()
    except Exception:
        return False


HAVE_GPU = _gpu_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU visible to CuPy (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAVE_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU: CuPy is missing or cupy.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _free_cupy_pool(request):
    """Each GPU test starts without the previous test's cached blocks (large shapes add up)."""
    yield
    if HAVE_GPU and request.node.get_closest_marker("gpu") is not None:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    return torch


@pytest.fixture(scope="module")
def jax():
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    return jax
