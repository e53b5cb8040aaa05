"""Shared test setup: the `gpu` marker, skipped where CuPy sees no CUDA GPU; one hypothesis
profile for every suite (derandomized in CI); CuPy's memory pools freed after each GPU test; the
`torch` and `jax` fixtures (the framework module, or a skip where it is missing or sees no GPU);
a header naming the cuflash under test and what the machine has, and a closing count of the
skipped tests by reason."""
import collections
import os

import pytest
from hypothesis import settings

# JAX takes 75% of the GPU's memory when it starts unless told not to, which would leave CuPy and
# torch (and other test processes on the same GPU) too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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
    config.addinivalue_line("markers", "faults: the GPU fault suite, left out unless asked for (-m faults)")


def pytest_report_header(config):
    import cuflash

    lines = [f"cuflash {cuflash.__version__} from {os.path.dirname(cuflash.__file__)}"]
    try:
        from cuflash import compile as compile_

        lines.append(f"NVRTC {'.'.join(map(str, compile_.nvrtc_version()))}, CUDA headers in "
                     f"{compile_.cuda_include_dir()}")
    except RuntimeError as error:
        lines.append(f"no NVRTC: {error}")
    if HAVE_GPU:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        lines.append(f"GPU: {props['name'].decode()} (compute capability {props['major']}.{props['minor']})")
    else:
        lines.append("GPU: none (the `gpu` tests skip)")
    lines.append("kernel variants compiled: " + ("all" if os.environ.get("CUFLASH_TEST_ALL_VARIANTS", "") not in
                                                   ("", "0") else "a pairwise cover (CUFLASH_TEST_ALL_VARIANTS=1: all)"))
    return lines


def pytest_terminal_summary(terminalreporter):
    """How many tests were skipped, and why, in one line per reason."""
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reasons[report.longrepr[2].removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section(f"{sum(reasons.values())} skipped, by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:6d}  {reason}")


def pytest_collection_modifyitems(config, items):
    if HAVE_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU: CuPy is missing or cupy.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


PRECOMPILE_FROM_GPU_TESTS = 200


@pytest.fixture(scope="session", autouse=True)
def _kernels_compiled_in_parallel(request):
    """On a GPU, when the session runs many GPU tests (the suites, which between them run every
    variant), compile every kernel variant first, one thread per core: a test then loads its
    kernels from the cache instead of compiling them one by one. A session of a few GPU tests
    compiles what it uses as it goes. A program that fails to compile is left for its test to
    report."""
    gpu_tests = sum(item.get_closest_marker("gpu") is not None for item in request.session.items)
    if not HAVE_GPU or gpu_tests < PRECOMPILE_FROM_GPU_TESTS:
        return
    import cupy

    from cuflash import compile as compile_, device, plan

    programs = ({compile_.forward_program(v) for v in plan.forward_variants()}
                | {compile_.backward_program(v) for v in plan.backward_variants()} | {compile_.DROPOUT_MASK_PROGRAM})
    compile_.compile_all(programs, device.compute_capability(cupy.cuda.Device().id), os.cpu_count(), skip_failures=True)


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
