"""Input-reconstruction (gradient inversion) attacks; importing registers them.

Every public module of this package defines attacks and registers them in
:data:`adversaries.base.ATTACKS` when imported; this package imports them all
(``fl-privsim attacks`` lists the names and threat models).
"""

import importlib
import pkgutil

#: The attack modules found in this package (those not starting with ``_``).
MODULES = tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))

for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
