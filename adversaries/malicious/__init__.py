"""The malicious server: model modifications and the attacks that read their secrets.

Importing this package registers every modification in :data:`MODIFICATIONS` and the attacks
of its modules in :data:`adversaries.base.ATTACKS` (pure torch; no Flower or Ray).
"""

import importlib
import pkgutil

from adversaries.malicious.base import (
    MODIFICATIONS,
    Crafted,
    Modification,
    ServerView,
    register_modification,
)

#: The modification modules of this package (those not starting with ``_`` and not ``base``).
MODULES = tuple(
    m.name
    for m in pkgutil.iter_modules(__path__)
    if not m.name.startswith("_") and m.name != "base"
)

for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["MODIFICATIONS", "Crafted", "Modification", "ServerView", "register_modification"]
