"""The GPU a call runs on: what it is (compute capability, SMs, shared memory), whether cuflash can
run there, and which kernel family it gets. Queries are cached per device."""
import functools
import os

from . import tma



def cupy_module():
    """CuPy, or a RuntimeError that says how to install it."""
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError("cuflash needs CuPy: pip install 'cuflash[cuda13]' (or 'cuflash[cuda12]' for a CUDA 12 "
                           f"driver) ({error})") from error
    return cupy


def current():
    """The ordinal of CuPy's current device, or a RuntimeError where there is no usable GPU."""
    cupy = cupy_module()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        count, reason = 0, str(error)
    else:
        reason = "no CUDA GPU is visible"
    if not count:
        raise RuntimeError(f"cuflash runs on NVIDIA GPUs and found none it can use: {reason}")
    return cupy.cuda.Device().id


@functools.lru_cache(maxsize=None)
def compute_capability(device_id):
    """90 for compute capability 9.0."""
    return int(cupy_module().cuda.Device(device_id).compute_capability)


@functools.lru_cache(maxsize=None)
def smem_limit(device_id):
    """Opt-in shared memory per block of a device, in bytes."""
    runtime = cupy_module().cuda.runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id)


@functools.lru_cache(maxsize=None)
def sm_count(device_id):
    """Streaming multiprocessors of a device: the persistent kernels' grid."""
    runtime = cupy_module().cuda.runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id)


def name(device_id):
    return cupy_module().cuda.runtime.getDeviceProperties(device_id)["name"].decode()


def driver_version():
    """(major, minor) of the CUDA version the driver supports."""
    version = cupy_module().cuda.runtime.driverGetVersion()  # 13000 for CUDA 13.0
    return version // 1000, version % 1000 // 10


def use_hopper(device_id):
    """True where the sm_90a kernels run: compute capability 9.0 with a CUDA 12.4+ driver, unless
    the environment variable CUFLASH_PORTABLE is set to anything but "" or "0" (to compare or
    debug the portable path)."""
    return (compute_capability(device_id) == 90 and os.environ.get("CUFLASH_PORTABLE", "0") in ("", "0")
            and tma.driver_supported())


def hopper_runs(device_id, *arrays):
    """True where the sm_90a kernels take these arrays (interop.ArrayInfo): use_hopper, and a
    tensor map can read each of them."""
    return use_hopper(device_id) and tma.encodable(*arrays)


def check_arch(variant, device_id):
    """ValueError unless the device can run the variant's kernel family."""
    from . import plan

    if plan.is_hopper(variant) and compute_capability(device_id) != 90:
        raise ValueError(f"tile: {variant.tile} runs only on compute capability 9.0 GPUs; device {device_id} "
                         f"is {compute_capability(device_id)}")
