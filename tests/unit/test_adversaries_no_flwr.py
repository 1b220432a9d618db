"""The attack package is pure torch: it imports and works with Flower and Ray absent."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"flwr", "ray"}

SCRIPT = """
import sys
sys.modules["flwr"] = None
sys.modules["ray"] = None
import adversaries
from adversaries import ATTACKS
for name in ("analytic", "idlg", "inverting_gradients"):
    ATTACKS.create(name)
assert {"analytic", "idlg", "inverting_gradients"} <= set(ATTACKS.names())
assert not any(m == "flwr" or m.startswith(("flwr.", "ray.")) for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""


def test_import_and_create_without_flwr_or_ray() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_no_module_imports_flwr_or_ray() -> None:
    files = sorted((ROOT / "adversaries").rglob("*.py"))
    assert files
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & FORBIDDEN, f"{path.relative_to(ROOT)} imports {roots & FORBIDDEN}"
