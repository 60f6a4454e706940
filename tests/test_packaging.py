"""Packaging: `pip install` of the project prints no setuptools warnings (licence format, editable mode)."""

from __future__ import annotations

import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_setuptools_warnings():
    """setuptools reads pyproject.toml the way a build does; any deprecation (e.g. a `license = {text = …}`
    table, deprecated since setuptools 77) would be printed by every `pip install`."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert not [f"{w.category.__name__}: {w.message}" for w in caught]
    assert dist.metadata.license_expression == "Apache-2.0"


def test_editable_install_uses_the_simple_layout():
    """`package-dir = {"" = "."}` plus a flat layout makes setuptools' editable install a plain .pth (no
    meta-path finder, no 'Editable installation' warning); every package is found in the checkout."""
    from setuptools.command.editable_wheel import _simple_layout
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert dist.package_dir == {"": "."}
    pkgs = dist.packages
    assert {"workbench", "probes", "apps"} <= set(pkgs)
    assert _simple_layout(pkgs, dist.package_dir, REPO)
