"""Shared pytest fixtures.

``shared_data``: the folder of real datasets beside the repository (``../shared/data``, see its
SOURCES.md), or ``$FL_PRIVSIM_SHARED_DATA`` when set; tests using it skip where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_privsim.core.paths import (
    shared_data_dir,  # the one rule; tests import it from fl_privsim.core.paths
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data`` (or ``$FL_PRIVSIM_SHARED_DATA``); skips the test if absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"needs ../shared/data (absent): {path}")
    return path
