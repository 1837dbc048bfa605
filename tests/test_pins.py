"""constraints.txt (every package CI installs, at its tested version) agrees with the pins in
pyproject.toml, and every install path uses it: a new release of a package we do not depend on
directly must not change what CI or the image runs (docs/CONTAINERS.md, README)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _PIN.match(line)
        assert m, f"constraints.txt: not a `name==version` line: {line!r}"
        assert _norm(m.group(1)) not in pins, f"constraints.txt: {m.group(1)} twice"
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def test_constraints_agree_with_every_direct_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
    pins = _constraints()
    assert "modelpress" not in pins, "the project itself is not a constraint"
    assert pins.get("torch") == "2.13.0", "torch without a local label (+cpu), so a CUDA build satisfies it too"
    for req in direct:
        m = _PIN.match(req.replace(" ", ""))
        assert m, f"pyproject.toml: not pinned with ==: {req!r}"
        name, version = _norm(m.group(1)), m.group(2)
        assert pins.get(name) == version, f"{name}: pyproject.toml pins {version}, constraints.txt has {pins.get(name)}"


def test_every_install_uses_the_constraints():
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    assert "-c /src/constraints.txt" in (ROOT / "Dockerfile").read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert "constraints.txt" not in ignored and "*.txt" not in ignored
