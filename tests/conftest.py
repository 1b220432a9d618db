"""Shared pytest fixtures, and the markers every test gets from where it lives.

Markers (``pytest -m ...``): ``unit``, ``integration`` and ``e2e`` from the test's folder;
``shared_data`` on every test that reads ``../shared/data`` (through the ``shared_data``
fixture or :func:`fl_privsim.core.paths.shared_data_dir`). ``pytest -m "not e2e"`` is the
fast suite.

``shared_data``: the folder of real datasets beside the repository (``../shared/data``, see its
SOURCES.md), or ``$FL_PRIVSIM_SHARED_DATA`` when set; tests using it skip where it is absent.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
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


@pytest.fixture(scope="session")
def example_data_root() -> Callable[[Path], list[str]]:
    """``--set`` overrides that point an example config's shared ``data.root`` at
    :func:`shared_data_dir`: the example files name ``../../shared/data/<folder>`` (relative to
    themselves), which is where the data is unless ``$FL_PRIVSIM_SHARED_DATA`` says otherwise.
    Empty when the file's own root already is that folder (so the relative path stays tested)."""

    def overrides(example: Path) -> list[str]:
        raw = tomllib.loads(example.read_text(encoding="utf-8")).get("data", {}).get("root", "")
        marker = "shared/data/"
        if marker not in raw:
            return []
        wanted = shared_data_dir() / raw.split(marker, 1)[1]
        if (example.parent / raw).resolve() == wanted.resolve():
            return []
        return [f'data.root="{wanted}"']

    return overrides


TESTS = Path(__file__).resolve().parent
LEVELS = ("unit", "integration", "e2e")
_reads_shared: dict[Path, bool] = {}


def _module_reads_shared_data(path: Path) -> bool:
    if path not in _reads_shared:
        _reads_shared[path] = "shared_data_dir(" in path.read_text()
    return _reads_shared[path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its level (its folder) and ``shared_data`` where it reads it."""
    for item in items:
        path = Path(str(item.fspath)).resolve()
        level = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else ""
        if level in LEVELS:
            item.add_marker(getattr(pytest.mark, level))
        if "shared_data" in getattr(item, "fixturenames", ()) or _module_reads_shared_data(path):
            item.add_marker(pytest.mark.shared_data)
