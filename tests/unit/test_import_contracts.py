"""The layers hold: the import-linter contracts of ``pyproject.toml`` (``[tool.importlinter]``)
are the one place that says which package may import which, that the foundation, the engine and
the plugins never import Flower or Ray (not even lazily), and that there are no import circles.
CI also runs ``lint-imports`` as its own step; this test keeps ``pytest`` alone honest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_every_import_contract_is_kept() -> None:
    out = subprocess.run(
        ["lint-imports", "--no-cache"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "kept" in out.stdout
