"""CPU: the kernel variants the plan can pick compile with NVRTC, warning-free, for sm_80 and
sm_90a, and without ptxas serializing their wgmma; the flattened source keeps each header once
and points errors at the real file.

NVRTC is called through the compile layer's own compile_program, with the options a user's
first call gets (no GPU or driver is needed). The programs compile in one thread per core (NVRTC
releases the GIL) before the first test reads its result.

Which variants: with CUFLASH_TEST_ALL_VARIANTS=1 (as CI runs), every (variant, arch) the
dispatcher can pick. Otherwise a pairwise cover of them: every pair of compile-time values
(kernel file, arch, each -D constant) that occurs in some variant occurs in a compiled one, so a
value, or a combination of two, that breaks the build of a kernel file is compiled; what only the full sweep can
catch is a failure that needs three or more particular values at once.
"""
import itertools
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuflash import compile as compile_
from cuflash import plan

ARCHS = ("sm_80", "sm_90a")
LINE_MARKER = re.compile(r'^#line (\d+) "cuda_src/([^"]+)"$')
ALL_VARIANTS = os.environ.get("CUFLASH_TEST_ALL_VARIANTS", "") not in ("", "0")


def _has_nvrtc():
    try:
        compile_.cuda_include_dir()
        return True
    except RuntimeError:
        return False


needs_nvrtc = pytest.mark.skipif(not _has_nvrtc(), reason="NVRTC or the CUDA headers not found: pip install "
                                 "'cuflash[cuda13]' (nvidia-cuda-nvrtc, nvidia-cuda-runtime)")


def _variant_id(variant):
    tile = variant.tile
    mode = (("-det" if getattr(variant, "deterministic", False) else "") + ("-dropout" if variant.dropout else "")
            + ("-flush" if getattr(variant, "flush", False) else ""))
    return (f"{variant.dtype}-d{variant.head_dim}-{'causal' if variant.causal else 'full'}{mode}"
            f"-{tile.block_m}x{tile.block_n}w{tile.threads // 32}{'-sm90' if plan.is_hopper(variant) else ''}")


def _targets(variants, to_program):
    """(program, arch, id) of each variant on each arch it is built for: a portable variant for
    sm_80 and sm_90a, a Hopper one for sm_90a."""
    return [(to_program(variant), arch, f"{_variant_id(variant)}-{arch}") for variant in variants
            for arch in ((compile_.HOPPER_ARCH,) if plan.is_hopper(variant) else ARCHS)]


def _features(program, arch):
    """The compile-time values of a target, each tagged with its kernel file, so that pairs are
    covered within each file."""
    return {(program.file, "arch", arch), *((program.file, key, value) for key, value in program.defines)}


def _cells(program, arch):
    """Each feature of a target and each pair of them."""
    features = sorted(_features(program, arch))
    return {(f,) for f in features} | set(itertools.combinations(features, 2))


def pairwise_cover(targets):
    """A subset of (program, arch, id) targets in which every feature (kernel file, arch, -D
    constants) and every pair of them that some target has is had by a chosen one (greedy set
    cover)."""
    pairs = [_cells(p, a) for p, a, _ in targets]
    uncovered = set().union(*pairs)
    chosen = []
    while uncovered:
        best = max(range(len(targets)), key=lambda i: len(pairs[i] & uncovered))
        chosen.append(targets[best])
        uncovered -= pairs[best]
    return chosen


ALL_TARGETS = (_targets(plan.forward_variants(), compile_.forward_program)
               + _targets(plan.backward_variants(), compile_.backward_program)
               + [(compile_.DROPOUT_MASK_PROGRAM, arch, f"dropout_mask-{arch}") for arch in ARCHS])
TARGETS = ALL_TARGETS if ALL_VARIANTS else pairwise_cover(ALL_TARGETS)


def problems(program, arch):
    """What is wrong with `program` compiled for `arch`: [] when it compiles to a cubin that
    defines its kernels, with no warning and no serialized wgmma."""
    try:
        cubin, log = compile_.compile_program(program, arch)
    except RuntimeError as error:
        return [str(error)]
    found = []
    if cubin[:4] != b"\x7fELF":
        found.append("NVRTC returned no cubin")
    # The launcher looks kernels up by these unmangled (extern "C") names.
    found += [f"no symbol {name!r} in the cubin" for name in program.names
              if b"\0" + name.encode() + b"\0" not in cubin]
    if "warning" in log.lower():
        found.append(log)
    # ptxas serializes every wgmma of a kernel (info C7518-C7520) when it cannot prove their
    # operands untouched while in flight, e.g. across a branch it cannot prove uniform: the
    # kernel stays correct and runs ~20% slower (bench/NOTES.md, v2.7).
    if "Potential Performance Loss" in log:
        found.append(log)
    return found


@pytest.fixture(scope="module")
def compiled(request):
    """{(program, arch): problems} of every target the selected tests ask for, compiled in
    parallel."""
    wanted = {(item.callspec.params["program"], item.callspec.params["arch"]) for item in request.session.items
              if item.originalname == "test_variant_compiles"}
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        futures = {target: pool.submit(problems, *target) for target in wanted}
    return {target: future.result() for target, future in futures.items()}


@needs_nvrtc
@pytest.mark.parametrize("program, arch", [pytest.param(p, a, id=i) for p, a, i in TARGETS])
def test_variant_compiles(compiled, program, arch):
    assert not compiled[program, arch], "\n".join(compiled[program, arch])


def test_pairwise_cover_holds_every_pair():
    cover = pairwise_cover(ALL_TARGETS)
    covered = set().union(*(_cells(program, arch) for program, arch, _ in cover))
    assert all(_cells(program, arch) <= covered for program, arch, _ in ALL_TARGETS)
    assert {(p.file, a) for p, a, _ in cover} == {(p.file, a) for p, a, _ in ALL_TARGETS}


@needs_nvrtc
@pytest.mark.parametrize("program", [
    compile_.forward_program(next(v for v in plan.forward_variants() if plan.is_hopper(v))),
    compile_.backward_program(next(v for v in plan.backward_variants() if plan.is_hopper(v))),
], ids=["forward", "backward"])
def test_hopper_kernel_refuses_other_targets(program):
    """An sm_90a kernel names its target when compiled for another, instead of failing in ptxas."""
    with pytest.raises(RuntimeError, match="needs -arch=sm_90a"):
        compile_.compile_program(program, "sm_80")


def test_every_variant_is_distinct():
    """Each variant maps to its own program: none is silently compiled twice."""
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


PARAMS_HEADERS = {"params.cuh", "field_kind.cuh"}
FWD_HEADERS = {"ptx.cuh", "flash_common.cuh", "warp_gemm.cuh", "philox.cuh", "online_softmax.cuh"} | PARAMS_HEADERS
BWD_HEADERS = {"ptx.cuh", "flash_common.cuh", "warp_gemm.cuh", "philox.cuh", "softmax_backward.cuh", "bwd_passes.cuh",
               "dkdv_partial.cuh", "tile_scheduler.cuh"} | PARAMS_HEADERS
BWD_SM90_HEADERS = BWD_HEADERS | {"warpgroup_gemm.cuh", "bwd_sm90_cta.cuh", "bwd_sm90_producer.cuh", "bwd_sm90_converter.cuh",
                                    "bwd_sm90_kernel.cuh"}


def test_every_header_is_used():
    assert FWD_HEADERS | BWD_SM90_HEADERS | {"tile_scheduler.cuh"} == ALL_HEADERS


@pytest.mark.parametrize("kernel, headers", [("flash_fwd.cu", FWD_HEADERS),
                                             ("flash_fwd_sm90.cu", FWD_HEADERS | {"warpgroup_gemm.cuh", "tile_scheduler.cuh"}),
                                             ("flash_bwd.cu", BWD_HEADERS),
                                             ("flash_bwd_sm90.cu", BWD_SM90_HEADERS),
                                             ("flash_bwd_sm90_split_d.cu", BWD_SM90_HEADERS),
                                             ("dropout_mask.cu", {"philox.cuh", "field_kind.cuh"})])
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
    with backward_launch.ROWS_PER_BLOCK, and a mismatch would leave rows without D or dQ."""
    from cuflash.backward_launch import ROWS_PER_BLOCK

    match = re.search(r"constexpr int kRowsPerBlock = (\d+);", (compile_.SRC_DIR / "bwd_passes.cuh").read_text())
    assert match is not None and int(match.group(1)) == ROWS_PER_BLOCK
