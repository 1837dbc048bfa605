"""The API process stays light: importing it and building the app imports neither torch nor
transformers (the method registry, core/methods, included)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

CODE = """
import sys
from app.main import create_app
app = create_app()
from core.methods import load_all
assert load_all()
heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch", "numpy") if m in sys.modules)
print(",".join(heavy))
"""


def test_api_does_not_import_torch():
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
