"""CPU: every forward and backward variant the plan can pick compiles with NVRTC, warning-free,
for sm_80 and sm_90a, and without ptxas serializing its wgmma; and the flattened source keeps
each header once and points errors at the real file.

NVRTC is called directly (CuPy's raw bindings: no GPU, no driver). The source and options are the
compile layer's own; only -arch and the CUDA headers' directory (the nvidia-cuda-runtime wheel's
nvidia/cu13/include) are added, as CuPy adds them at run time.
"""
import os
import re

import pytest
from cupy_backends.cuda.libs import nvrtc

from cuflash import compile as compile_
from cuflash import plan

ARCHS = ("sm_80", "sm_90a")
LINE_MARKER = re.compile(r'^#line (\d+) "cuda_src/([^"]+)"$')


def _cuda_include_dir():
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        path = os.path.join(root, "cu13", "include")
        if os.path.isfile(os.path.join(path, "cuda_fp16.h")):
            return path
    return None


CUDA_INCLUDE = _cuda_include_dir()
needs_cuda_headers = pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA headers not found: pip install "
                                        "nvidia-cuda-runtime (for nvidia/cu13/include/cuda_fp16.h)")


def _variant_id(variant):
    tile = variant.tile
    mode = ("-det" if getattr(variant, "deterministic", False) else "") + ("-dropout" if variant.dropout else "")
    return (f"{variant.dtype}-d{variant.head_dim}-{'causal' if variant.causal else 'full'}{mode}"
            f"-{tile.block_m}x{tile.block_n}w{tile.threads // 32}{'-sm90' if plan.is_hopper(variant) else ''}")


def nvrtc_compile(program, arch):
    """(cubin, log) of a (source, options, name) program compiled for `arch`."""
    source, options, _ = program
    prog = nvrtc.createProgram(source, "cuflash.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [*options, f"-arch={arch}", f"-I{CUDA_INCLUDE}", "-ftz=true"])  # CuPy adds -ftz=true
        except nvrtc.NVRTCError as error:
            pytest.fail(f"NVRTC failed for {arch} with {options}: {error}\n{nvrtc.getProgramLog(prog)}")
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def with_archs(variants):
    """pytest params (variant, arch): each portable variant for every arch, each Hopper one for sm_90a."""
    return [pytest.param(variant, arch, id=f"{_variant_id(variant)}-{arch}") for variant in variants
            for arch in (("sm_90a",) if plan.is_hopper(variant) else ARCHS)]


@needs_cuda_headers
@pytest.mark.parametrize("variant, arch", with_archs(plan.forward_variants()))
def test_variant_compiles(variant, arch):
    check_program(compile_.forward_program(variant), arch)


@needs_cuda_headers
@pytest.mark.parametrize("program", [
    compile_.forward_program(next(v for v in plan.forward_variants() if plan.is_hopper(v))),
    compile_.backward_program(next(v for v in plan.backward_variants() if plan.is_hopper(v))),
], ids=["forward", "backward"])
def test_hopper_kernel_refuses_other_targets(program):
    """An sm_90a kernel names its target when compiled for another, instead of failing in ptxas."""
    source, options, _ = program
    prog = nvrtc.createProgram(source, "cuflash.cu", [], [])
    try:
        with pytest.raises(nvrtc.NVRTCError):
            nvrtc.compileProgram(prog, [*(o for o in options if not o.startswith("-arch")), "-arch=sm_80",
                                        f"-I{CUDA_INCLUDE}"])
        assert "needs -arch=sm_90a" in nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


@needs_cuda_headers
@pytest.mark.parametrize("variant, arch", with_archs(plan.backward_variants()))
def test_backward_variant_compiles(variant, arch):
    check_program(compile_.backward_program(variant), arch)


@needs_cuda_headers
@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_mask_compiles(arch):
    check_program(compile_.DROPOUT_MASK_PROGRAM, arch)


def check_program(program, arch):
    cubin, log = nvrtc_compile(program, arch)
    assert cubin[:4] == b"\x7fELF", "NVRTC returned no cubin"
    # The launcher looks kernels up by these unmangled (extern "C") names.
    names = (program[2],) if isinstance(program[2], str) else program[2]
    for name in names:
        assert b"\0" + name.encode() + b"\0" in cubin, f"no symbol {name!r} in the cubin"
    assert "warning" not in log.lower(), log
    # ptxas serializes every wgmma of a kernel (info C7518-C7520) when it cannot prove their
    # operands untouched while in flight, e.g. across a branch it cannot prove uniform: the
    # kernel stays correct and runs ~20% slower (bench/NOTES.md, v2.7).
    assert "Potential Performance Loss" not in log, log


def test_every_variant_is_distinct():
    """Each variant maps to its own (source, options): none is silently compiled twice."""
    programs = {compile_.forward_program(variant) for variant in plan.forward_variants()}
    assert len(programs) == len(plan.forward_variants())
    programs = {compile_.backward_program(variant) for variant in plan.backward_variants()}
    assert len(programs) == len(plan.backward_variants())


def _walk(flat):
    """Yield (file, line number, text) for every source line of a flattened program, following
    its #line markers the way the preprocessor does."""
    name = lineno = None
    for text in flat.splitlines():
        marker = LINE_MARKER.match(text)
        if marker:
            lineno, name = int(marker.group(1)), marker.group(2)
            continue
        assert name is not None, "flattened source does not start with a #line marker"
        yield name, lineno, text
        lineno += 1


ALL_HEADERS = {p.name for p in compile_.SRC_DIR.iterdir() if p.suffix == ".cuh"}


FWD_HEADERS = {"ptx.cuh", "flash_common.cuh", "warp_gemm.cuh", "philox.cuh", "online_softmax.cuh"}
BWD_HEADERS = {"ptx.cuh", "flash_common.cuh", "warp_gemm.cuh", "philox.cuh", "softmax_backward.cuh", "bwd_passes.cuh",
               "tile_scheduler.cuh"}


def test_every_header_is_used():
    assert FWD_HEADERS | BWD_HEADERS | {"warpgroup_gemm.cuh", "tile_scheduler.cuh"} == ALL_HEADERS


@pytest.mark.parametrize("kernel, headers", [("flash_fwd.cu", FWD_HEADERS),
                                             ("flash_fwd_sm90.cu", FWD_HEADERS | {"warpgroup_gemm.cuh", "tile_scheduler.cuh"}),
                                             ("flash_bwd.cu", BWD_HEADERS),
                                             ("flash_bwd_sm90.cu", BWD_HEADERS | {"warpgroup_gemm.cuh"}),
                                             ("dropout_mask.cu", {"philox.cuh"})])
def test_flatten_maps_every_line_to_its_real_file(kernel, headers):
    """Every line of a flattened kernel sits under a #line marker naming the real file and line;
    the kernel pulls in its headers."""
    flat = compile_.flatten_source(kernel)
    assert flat.startswith(f'#line 1 "cuda_src/{kernel}"\n')
    files = {}
    for name, lineno, text in _walk(flat):
        if name not in files:
            files[name] = (compile_.SRC_DIR / name).read_text().splitlines()
        assert text == files[name][lineno - 1], f"line {lineno} of cuda_src/{name} is misplaced"
    assert set(files) == {kernel} | headers
    assert not re.search(r'^\s*#include\s+"', flat, re.M), "a local #include was left in"
    if "ptx.cuh" in headers:
        assert "#include <cuda_fp16.h>" in flat, "system includes must be left for NVRTC"


def test_flatten_inlines_each_header_once(tmp_path, monkeypatch):
    """A diamond (main -> a, b; a, b -> common) inlines common once, and lines after an include
    still map back to the including file."""
    (tmp_path / "common.cuh").write_text('#pragma once\nint common;\n')
    (tmp_path / "a.cuh").write_text('#include "common.cuh"\nint a;\n')
    (tmp_path / "b.cuh").write_text('#include "common.cuh"\nint b;\n')
    (tmp_path / "main.cu").write_text('#include "a.cuh"\n#include "b.cuh"\n#include "a.cuh"\nint main_;\n')
    monkeypatch.setattr(compile_, "SRC_DIR", tmp_path)
    flat = compile_.flatten_source("main.cu")
    assert [flat.count(f'#line 1 "cuda_src/{name}"') for name in ("main.cu", "a.cuh", "b.cuh", "common.cuh")] == [1, 1, 1, 1]
    assert [text for _, _, text in _walk(flat)] == ["#pragma once", "int common;", "int a;", "int b;", "int main_;"]
    assert [(name, lineno) for name, lineno, text in _walk(flat) if text == "int main_;"] == [("main.cu", 4)]


def test_row_pass_blocks_match_the_launcher():
    """The backward's row passes cover kRowsPerBlock rows per block; the launcher sizes their grid
    with backward.ROWS_PER_BLOCK, and a mismatch would leave rows without D or dQ."""
    from cuflash.backward import ROWS_PER_BLOCK  # the module, which cuflash.backward (the function) hides

    match = re.search(r"constexpr int kRowsPerBlock = (\d+);", (compile_.SRC_DIR / "bwd_passes.cuh").read_text())
    assert match is not None and int(match.group(1)) == ROWS_PER_BLOCK
