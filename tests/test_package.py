"""The installable package: pyproject.toml's console commands point at real entry points, and a
command `pip install -e .` wrote next to this interpreter runs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import sysconfig
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def console_scripts() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_pyproject_names_the_package_and_python():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["requires-python"] == ">=3.11"
    pinned = {line.split("==")[0].strip().lower() for line in open(os.path.join(ROOT, "requirements.txt"))
              if "==" in line and not line.startswith("#")}
    loose = {dep.split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in project["dependencies"]}
    # every runtime dependency is pinned in requirements.txt (the set `make` installs)
    assert loose <= pinned, sorted(loose - pinned)


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_console_script_target_is_a_main_function(name):
    module, func = console_scripts()[name].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_installed_console_script_prints_its_help():
    """One command (each one starts torch, seconds apiece): the install wrote a launcher that runs."""
    name = "ssl-prepare"
    script = os.path.join(sysconfig.get_path("scripts"), name)
    if not os.path.exists(script):
        pytest.skip(f"{name} is not installed in this environment (pip install -e . installs it)")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
