"""CPU: the release's metadata agrees with itself: cuflash.__version__, the version README names
and the newest CHANGELOG entry (in a source checkout or an unpacked sdist, where the files sit
beside tests/)."""
import re

import pytest

import cuflash
from helpers import ROOT


def _read(name):
    path = ROOT / name
    if not path.is_file():
        pytest.skip(f"{name} is not beside tests/ (an installed test tree)")
    return path.read_text()


def test_readme_and_changelog_name_this_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", cuflash.__version__)
    assert f"cuflash {cuflash.__version__} (`cuflash.__version__`)" in _read("README.md")
    newest = re.search(r"^## (\S+)", _read("CHANGELOG.md"), re.M)
    assert newest is not None and newest.group(1) == cuflash.__version__
