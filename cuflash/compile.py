"""Compile layer: CUDA sources -> cubins (NVRTC) -> kernels loaded on a device, cached on disk.

A Program is one kernel file of cuda_src/ specialised by compile-time constants. NVRTC compiles
it directly (CuPy's raw bindings, which need no GPU, so CI compiles every variant exactly as a
user's first call does) into a cubin for one architecture: sm_90a for the Hopper kernels, the
device's own for the portable ones. Cubins are kept in cache_dir(), one file per program and
architecture, named by a hash of all that shapes the cubin (flattened source, options,
architecture, NVRTC version). Each file also records that hash and its cubin's, so a truncated,
corrupted or misnamed file is compiled again, never loaded; where the cache cannot be written,
cubins stay in memory for the process, after one warning.

Sources are flattened here (local #include "x.cuh" inlined, with #line markers so NVRTC errors
name the real file and line), so that the hash covers every header.
"""
import functools
import hashlib
import json
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import plan

_HERE = Path(__file__).resolve().parent
# Installed: cuda_src ships inside the package; in a source checkout it sits beside it.
SRC_DIR = next((p for p in (_HERE / "cuda_src", _HERE.parent / "cuda_src") if p.is_dir()), _HERE / "cuda_src")
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')
CACHE_FORMAT = b"cuflash-cubin-1"  # first line of a cache file; bump when the layout changes
HOPPER_ARCH = "sm_90a"  # wgmma and setmaxnreg exist only in sm_90a code


def flatten_source(name, _seen=None):
    """The text of cuda_src/<name> with every local include inlined once."""
    seen = set() if _seen is None else _seen
    seen.add(name)
    out = [f'#line 1 "cuda_src/{name}"']
    for lineno, line in enumerate((SRC_DIR / name).read_text().splitlines(), start=1):
        match = _INCLUDE.match(line)
        if match is None:
            out.append(line)
            continue
        if match.group(1) not in seen:
            out.append(flatten_source(match.group(1), seen))
        out.append(f'#line {lineno + 1} "cuda_src/{name}"')
    return "\n".join(out)


@dataclass(frozen=True)
class Program:
    """A kernel file of cuda_src/, the extern "C" kernels it defines, and its compile-time
    constants; `arch` pins the target (the Hopper kernels' sm_90a), else the device's is used."""

    file: str
    names: tuple
    defines: tuple  # ((name, value), ...)
    arch: str = None

    @property
    def source(self):
        return _flat_source(self.file)

    @property
    def options(self):
        return ("--std=c++17",) + tuple(f"-D{key}={value}" for key, value in self.defines)


@functools.lru_cache(maxsize=None)
def _flat_source(file):
    return flatten_source(file)


def _program(file, variant, names, arch=None, **defines):
    """`file` specialised for `variant` by compile-time constants."""
    tile = variant.tile
    defines = {"HEAD_DIM": variant.head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
               "NWARPS": tile.threads // 32, "IS_CAUSAL": int(variant.causal), "IS_DROPOUT": int(variant.dropout),
               "IS_BF16": int(variant.dtype == "bfloat16"), **defines}
    return Program(file, tuple(names), tuple(defines.items()), arch)


@functools.lru_cache(maxsize=None)
def forward_program(variant):
    """The Program of a forward variant."""
    if plan.is_hopper(variant):
        return _program("flash_fwd_sm90.cu", variant, ("flash_fwd_sm90",), HOPPER_ARCH, STAGES=variant.tile.stages,
                        O_STAGED=int(variant.tile.o_staged))
    return _program("flash_fwd.cu", variant, ("flash_fwd",), STAGES=variant.tile.stages)


@functools.lru_cache(maxsize=None)
def backward_program(variant):
    """The Program of a backward variant: the row passes and the dK/dV kernel of its family, and
    the deterministic dQ kernel of the portable one."""
    tile = variant.tile
    if plan.is_hopper(variant):
        names = ("flash_bwd_preprocess", "flash_bwd_dkdv_sm90", "flash_bwd_convert_dq_tiles")
        return _program("flash_bwd_sm90.cu", variant, names, HOPPER_ARCH, STAGES=tile.stages, DQ_ATOMIC=1, DQ_TILED=1,
                        DKDV_FLUSH=int(variant.flush))
    names = ("flash_bwd_preprocess", "flash_bwd_dkdv", "flash_bwd_convert_dq", "flash_bwd_dq")
    return _program("flash_bwd.cu", variant, names, DQ_BLOCK_N=tile.dq_block_n, SDP_WM=tile.sdp_wm, KV_WM=tile.kv_wm,
                    DQ_WM=tile.dq_wm, DQ_ATOMIC=int(not variant.deterministic), DQ_TILED=0,
                    DKDV_FLUSH=int(variant.flush))


DROPOUT_MASK_PROGRAM = Program("dropout_mask.cu", ("dropout_mask",), ())


# ---- NVRTC --------------------------------------------------------------------------------------

def _nvrtc():
    """CuPy's raw NVRTC bindings, or a RuntimeError that says what to install."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except ImportError as error:
        raise RuntimeError("cuflash needs CuPy: pip install 'cuflash[cuda13]' (or [cuda12] for a CUDA 12 "
                           f"driver) ({error})") from error
    except Exception as error:  # the library itself is missing: cuda.pathfinder's DynamicLibNotFoundError
        raise RuntimeError("NVRTC, the CUDA run-time compiler, was not found: pip install 'cuflash[cuda13]' "
                           f"(or [cuda12]) brings it ({type(error).__name__}: {error})") from error
    return nvrtc


@functools.lru_cache(maxsize=None)
def nvrtc_version():
    """(major, minor) of the NVRTC in use."""
    return tuple(_nvrtc().getVersion())


@functools.lru_cache(maxsize=None)
def cuda_include_dir():
    """The directory holding the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h), of
    the CUDA major version of NVRTC: the nvidia-cuda-runtime wheel (nvidia/cu13/include; CUDA 12:
    nvidia/cuda_runtime/include), else $CUDA_PATH, $CUDA_HOME or /usr/local/cuda."""
    major = nvrtc_version()[0]
    candidates = []
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += [Path(root, f"cu{major}", "include"), Path(root, "cuda_runtime", "include")]
    except ImportError:
        pass
    candidates += [Path(os.environ[name], "include") for name in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(name)]
    candidates.append(Path("/usr/local/cuda/include"))
    for path in candidates:
        if (path / "cuda_fp16.h").is_file() and (path / "cuda_bf16.h").is_file():
            return str(path)
    raise RuntimeError(f"the CUDA {major} headers (cuda_fp16.h) were not found: pip install 'cuflash[cuda{major}]' "
                       f"brings them (nvidia-cuda-runtime), or set CUDA_PATH to a CUDA {major} toolkit")


def nvrtc_options(program, arch):
    """Everything NVRTC is given for `program` on `arch` ("sm_80", "compute_100", ...)."""
    # The flags CuPy's RawModule gave NVRTC, with which the kernels were tuned and measured:
    # denormals flushed, and unannotated functions (the kernels' lambdas) taken as __device__.
    return (*program.options, f"-arch={arch}", f"-I{cuda_include_dir()}", "-ftz=true",
            "--device-as-default-execution-space")


def compile_program(program, arch):
    """(binary, log) of `program` compiled by NVRTC for `arch`: a cubin for "sm_XY", PTX for
    "compute_XY". A compile error raises RuntimeError with NVRTC's log."""
    nvrtc = _nvrtc()
    handle = nvrtc.createProgram(program.source, program.file, [], [])
    try:
        try:
            nvrtc.compileProgram(handle, list(nvrtc_options(program, arch)))
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC failed on {program.file} for {arch} with {program.options}: {error}\n"
                               f"{nvrtc.getProgramLog(handle)}") from None
        if arch.startswith("sm_"):
            return bytes(nvrtc.getCUBIN(handle)), nvrtc.getProgramLog(handle)
        ptx = nvrtc.getPTX(handle)
        return (ptx.encode() if isinstance(ptx, str) else bytes(ptx)).rstrip(b"\0") + b"\0", nvrtc.getProgramLog(handle)
    finally:
        nvrtc.destroyProgram(handle)


def arch_for(program, capability):
    """The NVRTC target of `program` on a GPU of compute capability `capability` (an int, 90
    for 9.0): sm_90a for the Hopper kernels; the GPU's own sm_XY if this NVRTC knows it; else
    PTX of the newest architecture it knows, which the driver compiles for the GPU."""
    if program.arch is not None:
        return program.arch
    return f"sm_{capability}" if nvrtc_knows(capability) else f"compute_{max(_supported_archs())}"


def nvrtc_knows(capability):
    """True if this NVRTC can compile a cubin for GPUs of this compute capability."""
    return capability in _supported_archs()


@functools.lru_cache(maxsize=None)
def _supported_archs():
    return tuple(int(arch) for arch in _nvrtc().getSupportedArchs())


# ---- the cubin cache ----------------------------------------------------------------------------

def cache_dir():
    """Where compiled kernels are kept: $CUFLASH_CACHE_DIR, else $XDG_CACHE_HOME/cuflash, else
    ~/.cache/cuflash."""
    if os.environ.get("CUFLASH_CACHE_DIR"):
        return Path(os.environ["CUFLASH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cuflash"


def cache_key(program, arch):
    """Hash of everything that shapes the binary of `program` on `arch`."""
    digest = hashlib.sha256(CACHE_FORMAT)
    for part in (repr(nvrtc_version()), arch, repr(nvrtc_options(program, arch)), program.source):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def _pack(key, binary):
    header = json.dumps({"key": key, "sha256": hashlib.sha256(binary).hexdigest(), "size": len(binary)})
    return CACHE_FORMAT + b"\n" + header.encode() + b"\n" + binary


def _unpack(key, blob):
    """The binary of a cache file's bytes if they are whole and belong to `key`, else None."""
    try:
        magic, header, binary = blob.split(b"\n", 2)
        header = json.loads(header)
    except ValueError:
        return None
    if (magic != CACHE_FORMAT or not isinstance(header, dict) or header.get("key") != key
            or header.get("size") != len(binary)
            or header.get("sha256") != hashlib.sha256(binary).hexdigest()):
        return None
    return binary


_memory = {}  # key -> binary, for this process
_key_locks = {}
_locks_lock = threading.Lock()
_warned_unwritable = False


def _store(path, blob):
    """Write a cache file atomically (a temporary file renamed over it), so that a reader in
    another thread or process sees a whole file or none. Returns False if the cache is not
    writable."""
    global _warned_unwritable
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as handle:
            handle.write(blob)
        os.replace(handle.name, path)
        return True
    except OSError as error:
        if not _warned_unwritable:
            _warned_unwritable = True
            warnings.warn(f"cuflash: the kernel cache {path.parent} is not writable ({error}); compiled kernels "
                          "stay in memory for this process (set CUFLASH_CACHE_DIR to a writable directory)",
                          RuntimeWarning, stacklevel=4)
        return False


def binary(program, arch, recompile=False):
    """The compiled `program` for `arch`, from this process's memory, else from the disk cache,
    else compiled now and stored. A program is compiled once even when threads ask for it
    together; `recompile` skips both caches (for a binary the driver refused)."""
    key = cache_key(program, arch)
    with _locks_lock:
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        if not recompile and key in _memory:
            return _memory[key]
        path = cache_dir() / f"{key}.bin"
        found = None
        if not recompile:
            try:
                found = _unpack(key, path.read_bytes())
            except OSError:
                pass
        if found is None:
            found, _ = compile_program(program, arch)
            _store(path, _pack(key, found))
        _memory[key] = found
        return found


# ---- loaded kernels -----------------------------------------------------------------------------

_modules = {}    # (device_id, program) -> cupy.cuda.function.Module
_functions = {}  # (device_id, program, name) -> cupy.cuda.Function
_load_lock = threading.Lock()


def get_function(program, device_id, name=None):
    """Kernel `name` (default: the program's only one) of `program`, loaded on device_id (a
    cupy.cuda.Function: `.ptr` is its CUfunction). Modules are kept per device and program."""
    key = (device_id, program, name)
    function = _functions.get(key)
    if function is not None:
        return function
    from cupy.cuda import Device, driver
    from cupy.cuda.function import Module

    from . import device

    device.check_supported(device_id)
    arch = arch_for(program, device.compute_capability(device_id))
    with _load_lock, Device(device_id):
        module = _modules.get((device_id, program))
        if module is None:
            module = Module()
            try:
                module.load(binary(program, arch))
            except driver.CUDADriverError:
                # A cache file that passed its checks but not the driver's: compile it afresh.
                module = Module()
                module.load(binary(program, arch, recompile=True))
            _modules[(device_id, program)] = module
        (only,) = program.names if name is None else (name,)
        function = _functions[key] = module.get_function(only)
    return function
