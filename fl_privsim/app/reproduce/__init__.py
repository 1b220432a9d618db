"""Reproductions of the papers' tables: ``fl-privsim reproduce NAME``.

Importing this package registers every reproduction in :data:`REPRODUCTIONS`.
"""

import importlib
import pkgutil

from fl_privsim.app.reproduce.base import (
    REPRODUCTIONS,
    ReproContext,
    Reproduction,
    ReproResult,
    get,
    register,
    run_reproduction,
)
from fl_privsim.core.results import markdown_table

__all__ = [
    "REPRODUCTIONS",
    "ReproContext",
    "ReproResult",
    "Reproduction",
    "get",
    "markdown_table",
    "register",
    "run_reproduction",
]

#: Every module of this package except ``base`` (and ``_private`` ones) holds reproductions.
MODULES = tuple(
    m.name
    for m in pkgutil.iter_modules(__path__)
    if m.name != "base" and not m.name.startswith("_")
)

for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
