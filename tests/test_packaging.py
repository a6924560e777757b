"""The install files agree with each other and the CI/README contract holds."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalise(requirement: str) -> str:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + spec.replace(" ", "")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    wanted = {_normalise(r) for r in project["dependencies"] + extras}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_normalise(r) for r in pip_section if not r.startswith("-e")}
    assert listed - wanted == set(), f"in environment.yml but not pyproject.toml: {sorted(listed - wanted)}"
    assert wanted - listed == set(), f"in pyproject.toml but not environment.yml: {sorted(wanted - listed)}"


def test_ci_runs_the_test_command_of_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0], "README must start with the `make test` command"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_makefile_installs_pinned_torch_before_the_project():
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index('"$(TORCH)"') < makefile.index('-e ".[dev,demo]"')
    assert "TORCH ?= torch==" in makefile
