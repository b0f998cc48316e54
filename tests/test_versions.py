"""The versions a fresh machine installs are the ones the suite tested.

pyproject.toml bounds each dependency to the majors the suite runs (the code works around behaviour of
particular Accelerate and DeepSpeed releases), and constraints.txt pins the exact versions `make install`
installs. These tests keep the three in agreement: a bound without a pin, a pin outside its bound, or an
environment that drifted from the pins (an install that bypassed the Makefile) each fail with the name.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

ROOT = Path(__file__).resolve().parent.parent


def _requirements(extras: tuple[str, ...] = ("deepspeed", "hf")) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def pins(path: Path = ROOT / "constraints.txt") -> dict[str, Version]:
    """`name==version` lines of a constraints file, by canonical name."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_core_dependencies_have_upper_bounds():
    unbounded = [str(r) for r in _requirements() if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert not unbounded, f"dependencies without an upper bound: {unbounded}"


def test_constraints_pin_every_dependency_inside_its_bounds():
    pinned = pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is a dependency but constraints.txt does not pin it"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject's {req.specifier}"


def test_the_makefile_installs_with_the_constraints():
    make = (ROOT / "Makefile").read_text()
    install_lines = [ln for ln in make.splitlines() if "$(PIP) install" in ln and "upgrade pip" not in ln
                     and "--target" not in ln]
    assert install_lines and all("-c constraints.txt" in ln for ln in install_lines), install_lines


@pytest.mark.parametrize("name", ["torch", "torchvision", "timm", "accelerate", "deepspeed", "safetensors",
                                  "webdataset", "datasets", "transformers", "numpy"])
def test_installed_versions_are_the_pinned_ones(name):
    try:
        installed = Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed here")
    assert installed == pins()[canonicalize_name(name)], \
        f"{name} {installed} is installed but constraints.txt pins {pins()[canonicalize_name(name)]}: run make install"
