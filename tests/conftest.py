"""Shared pytest fixtures.

``shared_data``: the folder of real datasets beside the repository (``../shared/data``, see its
SOURCES.md), or ``$FL_PRIVSIM_SHARED_DATA`` when set; tests using it skip where it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """Where the shared real-data folder is expected (it may not exist)."""
    env = os.environ.get("FL_PRIVSIM_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data`` (or ``$FL_PRIVSIM_SHARED_DATA``); skips the test if absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"needs ../shared/data (absent): {path}")
    return path
