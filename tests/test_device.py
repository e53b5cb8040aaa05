"""CPU: what a user without a usable GPU, CuPy or NVRTC is told, and the device checks, with the
device's facts stubbed: a GPU below compute capability 8.0 and a driver older than NVRTC are
refused with messages that say what to do."""
import sys

import pytest

import cuflash
from cuflash import compile as compile_
from cuflash import device, plan


@pytest.fixture
def gpu(monkeypatch):
    """A pretend device 0: compute capability, driver and NVRTC versions set by the test."""
    facts = {"capability": 90, "driver": (13, 0), "nvrtc": (13, 0), "known": (80, 86, 89, 90)}
    monkeypatch.setattr(device, "compute_capability", lambda device_id: facts["capability"])
    monkeypatch.setattr(device, "name", lambda device_id: "Pretend GPU")
    monkeypatch.setattr(device, "driver_version", lambda: facts["driver"])
    monkeypatch.setattr(compile_, "nvrtc_version", lambda: facts["nvrtc"])
    monkeypatch.setattr(compile_, "_supported_archs", lambda: facts["known"])
    compile_.check_supported.cache_clear()
    yield facts
    compile_.check_supported.cache_clear()


def test_a_supported_gpu_passes(gpu):
    assert compile_.check_supported(0)
    gpu.update(capability=80, driver=(13, 0), nvrtc=(13, 5))  # a newer NVRTC minor: cubins still load
    compile_.check_supported.cache_clear()
    assert compile_.check_supported(0)


@pytest.mark.parametrize("capability", [70, 75])
def test_a_gpu_below_sm80_is_refused(gpu, capability):
    gpu["capability"] = capability
    with pytest.raises(RuntimeError, match=rf"compute capability 8.0 or newer.*Pretend GPU.*{capability // 10}\."):
        compile_.check_supported(0)


def test_a_driver_older_than_nvrtc_is_refused(gpu):
    gpu.update(driver=(12, 8), nvrtc=(13, 0))
    with pytest.raises(RuntimeError, match=r"CUDA 12.8, older than NVRTC 13.0.*cuflash\[cuda12\]"):
        compile_.check_supported(0)


def test_a_gpu_newer_than_nvrtc_needs_a_driver_as_new_as_nvrtc(gpu):
    """Such a GPU gets PTX, which the driver compiles: the driver must know NVRTC's PTX."""
    gpu.update(capability=120, known=(80, 90), driver=(13, 0), nvrtc=(13, 5))
    assert compile_.arch_for(compile_.DROPOUT_MASK_PROGRAM, 120) == "compute_90"
    with pytest.raises(RuntimeError, match="older than NVRTC 13.5"):
        compile_.check_supported(0)
    gpu["driver"] = (13, 5)
    compile_.check_supported.cache_clear()
    assert compile_.check_supported(0)


def test_hopper_kernels_keep_their_target(gpu):
    variant = plan.forward_variant("bfloat16", 128, False, hopper=True)
    assert compile_.arch_for(compile_.forward_program(variant), 90) == "sm_90a"
    assert compile_.arch_for(compile_.forward_program(plan.forward_variant("bfloat16", 96, False)), 86) == "sm_86"


def test_without_cupy_a_call_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(RuntimeError, match=r"needs CuPy: pip install 'cuflash\[cuda13\]'"):
        device.cupy_module()
    with pytest.raises(RuntimeError, match="needs CuPy"):
        cuflash.warmup()


def test_without_a_gpu_warmup_says_so():
    if cuflash.cuda_available():
        pytest.skip("this machine has a GPU")
    pytest.importorskip("cupy")
    with pytest.raises(RuntimeError, match="found none it can use"):
        cuflash.warmup()


@pytest.mark.parametrize("tile", ["big", 128, (128, 64, 4)])
def test_a_tile_of_the_wrong_type_is_a_type_error(tile):
    with pytest.raises(TypeError, match="tile must be None or a cuflash.FwdTile or cuflash.HopperFwdTile"):
        plan.forward_variant("float16", 64, False, tile)
    with pytest.raises(TypeError, match="tile must be None or a cuflash.BwdTile or cuflash.HopperBwdTile"):
        plan.backward_variant("float16", 64, False, False, tile)
