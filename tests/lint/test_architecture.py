"""The layers of DESIGN.md and the type checks, as part of the suite (so CI runs them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; `pip install -e '.[test]'` installs it")
    return found


def test_every_import_respects_the_layers():
    """cli -> gateway -> runtime -> scheduler, memory -> engine -> config, store -> core (pyproject.toml)."""
    run = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def _contract(name: str) -> dict:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["name"] == name)


def test_the_contracts_name_every_package():
    """A package the contracts do not name is checked by none of them: each package of src/berth is a layer,
    and every package but config is held to config's face."""
    packages = {f"berth.{p.stem}" for p in (ROOT / "src" / "berth").iterdir()
                if (p / "__init__.py").is_file() or (p.suffix == ".py" and p.name != "__init__.py")}
    layered = {name.strip() for layer in _contract("berth's layers")["layers"] for name in layer.split("|")}
    assert packages == layered, f"name each package in one layer of pyproject.toml: {packages ^ layered}"
    facing = set(_contract("only config's face is imported")["source_modules"])
    assert facing == packages - {"berth.config"}, f"list them as source_modules: {packages - {'berth.config'} ^ facing}"


def test_types_check():
    """mypy over src/berth; strict for scheduler, config, core and gateway (pyproject.toml)."""
    run = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Success: no issues found" in run.stdout
