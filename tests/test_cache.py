"""CPU: the compile layer's kernel cache. A program compiles once and is then read from disk; a
cache file that is truncated, corrupted or stored under another program's name is compiled
again, never loaded; an unwritable cache keeps binaries in memory after one warning; threads
asking for one program on an empty cache compile it once. NVRTC is replaced by a stub that
returns a cubin-like blob naming its program, so these run without NVRTC."""
import os
import threading
import warnings

import pytest

from cuflash import compile as compile_
from helpers import forget_compiled

PROGRAMS = [compile_.Program("dropout_mask.cu", ("dropout_mask",), (("X", n),)) for n in range(2)]


@pytest.fixture
def compiles(monkeypatch, tmp_path):
    """The cache in tmp_path, NVRTC stubbed; yields the list of (program, arch) compiled."""
    calls = []

    def fake_compile(program, arch):
        calls.append((program, arch))
        return b"\x7fELF" + repr((program.defines, arch)).encode(), ""

    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compile_, "compile_program", fake_compile)
    monkeypatch.setattr(compile_, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(compile_, "cuda_include_dir", lambda: "/include")
    monkeypatch.setattr(compile_, "_memory", {})
    monkeypatch.setattr(compile_, "_warned_unwritable", False)
    return calls


def _path(program, arch="sm_90"):
    return compile_.cache_dir() / f"{compile_.cache_key(program, arch)}.bin"


def test_a_program_compiles_once_then_loads_from_disk(compiles, monkeypatch):
    first = compile_.binary(PROGRAMS[0], "sm_90")
    assert _path(PROGRAMS[0]).is_file() and compiles == [(PROGRAMS[0], "sm_90")]
    forget_compiled(monkeypatch)
    assert compile_.binary(PROGRAMS[0], "sm_90") == first and len(compiles) == 1
    compile_.binary(PROGRAMS[0], "sm_80")
    assert len(compiles) == 2, "another arch is another binary"


def test_the_key_covers_source_options_arch_and_nvrtc(compiles, monkeypatch):
    keys = {compile_.cache_key(PROGRAMS[0], "sm_90"), compile_.cache_key(PROGRAMS[1], "sm_90"),
            compile_.cache_key(PROGRAMS[0], "sm_80")}
    monkeypatch.setattr(compile_, "nvrtc_version", lambda: (13, 1))
    keys.add(compile_.cache_key(PROGRAMS[0], "sm_90"))
    monkeypatch.setattr(compile_, "_source", lambda file, layouts: "// edited\n")
    keys.add(compile_.cache_key(PROGRAMS[0], "sm_90"))
    assert len(keys) == 5


def test_a_file_of_another_program_is_recompiled(compiles, monkeypatch):
    """Two entries swapped on disk: each file names its key, so neither loads as the other."""
    a, b = (compile_.binary(p, "sm_90") for p in PROGRAMS)
    path_a, path_b = _path(PROGRAMS[0]), _path(PROGRAMS[1])
    blob_a, blob_b = path_a.read_bytes(), path_b.read_bytes()
    path_a.write_bytes(blob_b)
    path_b.write_bytes(blob_a)
    forget_compiled(monkeypatch)
    assert compile_.binary(PROGRAMS[0], "sm_90") == a and compile_.binary(PROGRAMS[1], "sm_90") == b
    assert len(compiles) == 4
    assert path_a.read_bytes() == blob_a, "the recompiled binary replaces the wrong file"


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "not_a_header"])
def test_a_damaged_file_is_recompiled(compiles, monkeypatch, damage):
    good = compile_.binary(PROGRAMS[0], "sm_90")
    path = _path(PROGRAMS[0])
    blob = path.read_bytes()
    damaged = {"truncate": blob[:-3], "flip": blob[:-1] + bytes([blob[-1] ^ 1]), "empty": b"",
               "garbage": os.urandom(64), "not_a_header": compile_.CACHE_FORMAT + b"\n5\n\x7fELF"}[damage]
    path.write_bytes(damaged)
    forget_compiled(monkeypatch)
    assert compile_.binary(PROGRAMS[0], "sm_90") == good and len(compiles) == 2


def test_an_unwritable_cache_keeps_binaries_in_memory_with_one_warning(compiles, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(blocker / "cache"))  # mkdir fails, whoever runs the test
    with pytest.warns(RuntimeWarning, match="not writable") as caught:
        compile_.binary(PROGRAMS[0], "sm_90")
        compile_.binary(PROGRAMS[1], "sm_90")
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_.binary(PROGRAMS[0], "sm_90")
    assert len(compiles) == 2, "the in-memory binary serves the second call"


def test_threads_on_an_empty_cache_compile_once(compiles):
    start = threading.Barrier(8)
    results = []

    def ask():
        start.wait()
        results.append(compile_.binary(PROGRAMS[0], "sm_90"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(compiles) == 1 and len(set(results)) == 1 and len(results) == 8
    assert not [p for p in compile_.cache_dir().iterdir() if p.name.startswith(".tmp-")], "a temporary file was left"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path / "a"))
    assert compile_.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CUFLASH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_.cache_dir() == tmp_path / "xdg" / "cuflash"
