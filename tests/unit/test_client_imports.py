"""A client process stays small: the ClientApp and the digits data load without scikit-learn,
SciPy or Opacus (each costs every client actor tens to hundreds of MB), and the digits read
from scikit-learn's file are scikit-learn's digits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fl_privsim.core.data import _digits_arrays

ROOT = Path(__file__).resolve().parents[2]


def test_digits_read_directly_equal_load_digits() -> None:
    from sklearn.datasets import load_digits

    images, target = _digits_arrays()
    ref = load_digits()
    assert np.array_equal(images, ref.images)
    assert np.array_equal(target, ref.target)


def test_client_app_and_digits_do_not_import_heavy_packages() -> None:
    code = (
        "import sys\n"
        "import clients.client_app\n"
        "from fl_privsim.core.config import load\n"
        "from fl_privsim.engine.federated_data import federated_data\n"
        "federated_data(load(None))\n"
        "print(sorted(m for m in ('sklearn', 'scipy', 'opacus', 'pandas') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
