"""The version is written once, in pyproject.toml (Note [One version] in CMakeLists.txt): what CMake derived
from it and compiled into this build must be the same string."""

from pathlib import Path

import pytest

import torch_dp

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_pyprojects():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert torch_dp.__version__ == declared
