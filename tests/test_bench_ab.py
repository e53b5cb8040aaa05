"""bench/ab.py on the CPU: a git revision loads as a package of its own, beside this checkout's
cuflash, with the CUDA sources of that revision."""
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT


@pytest.fixture
def ab(monkeypatch):
    if not shutil.which("git") or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD"],
                                                 capture_output=True).returncode:
        pytest.skip("needs git and a git checkout")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import ab

    return ab


def test_a_revision_loads_beside_this_checkout(ab, tmp_path):
    module = ab.extract("HEAD", "cuflash_ab_test", tmp_path)
    package = tmp_path / "cuflash_ab_test"
    assert Path(module.__file__).parent == package
    assert module.compile.SRC_DIR == package / "cuda_src"
    assert (package / "cuda_src" / "flash_bwd_sm90.cu").is_file()
    assert module.forward is not ab.bench.cuflash.forward
    # Its kernels compile from its own sources.
    source = package / "cuda_src" / "flash_fwd.cu"
    source.write_text(source.read_text() + "// ab marker\n")
    assert "// ab marker" in module.compile.flatten_source("flash_fwd.cu")
    assert "// ab marker" not in ab.bench.cuflash.compile.flatten_source("flash_fwd.cu")


def test_bad_arguments_are_refused(ab):
    for argv in (["no-such-revision"], ["HEAD", "--seqlen", "3000"], ["HEAD", "--hdim", "100"],
                 ["HEAD", "--rounds", "0"], ["--sustained", "0"], ["--sustained", "-1"]):
        with pytest.raises(SystemExit):
            ab.parse_args(argv)
