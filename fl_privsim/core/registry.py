"""A small generic plugin registry, one instance per plugin kind (:mod:`fl_privsim.core.plugins`).

``ATTACKS.register("name")(cls)`` adds a class (or a builder function, or an object) and refuses
a duplicate name.
``ATTACKS.create(name, **params)`` checks the params against the class's keyword-only
constructor and reports unknown or missing ones by name. On first lookup the registry
imports its *built-in* modules (named as strings, so the foundation never imports a higher
layer's code statically) and loads the Python entry points of its group (e.g.
``fl_privsim.attacks``), so a plugin can live in a user's own package and still be visible
inside Ray workers.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar, cast

from fl_privsim.core.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)
T = TypeVar("T")
_O = TypeVar("_O")


class Registry(Generic[T]):
    """Name → class map for one kind of plugin.

    Parameters
    ----------
    kind:
        Human-readable plugin kind, used in error messages ("attack").
    group:
        Entry-point group loaded on first lookup ("fl_privsim.attacks").
    builtins:
        Modules that register the built-in plugins when imported: a sequence (all imported
        on first lookup) or a ``name -> module`` mapping (a module imported only when its
        name is looked up, so a check that is not needed costs no import time, and
        :meth:`names` lists them without importing anything).
    ordered:
        :meth:`names` (and iteration) in declaration order (the mapping's order, then the
        registration order) instead of sorted: for kinds whose order users see (the config's
        allowed values).

    A registry also reads as a read-only mapping of its names (``name in REG``, ``list(REG)``,
    ``REG[name]``, ``REG.items()``), so it is the one list of its kind that callers iterate.
    """

    def __init__(
        self,
        *,
        kind: str,
        group: str,
        builtins: Sequence[str] | Mapping[str, str] = (),
        ordered: bool = False,
    ) -> None:
        self.kind = kind
        self.group = group
        self.ordered = ordered
        self._items: dict[str, type[T]] = {}
        self._entry_points_loaded = False
        self._lazy: dict[str, str] = dict(builtins) if isinstance(builtins, Mapping) else {}
        self._eager: tuple[str, ...] = () if isinstance(builtins, Mapping) else tuple(builtins)

    def register(self, name: str) -> Callable[[_O], _O]:
        """Decorator adding a class (or, for hook registries, a function) under ``name``; a
        duplicate name is refused. Returns the object unchanged."""

        def deco(obj: _O) -> _O:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = cast("type[T]", obj)
            return obj

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for module in self._eager:  # the built-ins register themselves when imported
            importlib.import_module(module)
        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the built-ins
                log.warning(
                    "could not load %s plugin %r (%s): %s", self.kind, ep.name, ep.value, exc
                )
                continue
            self._items.setdefault(ep.name, obj)

    def names(self) -> list[str]:
        """Names of every registered plugin (built-ins and entry points included): sorted, or in
        declaration order for an ``ordered`` registry. Lazy built-ins are listed unimported."""
        self._load_entry_points()
        found = list(dict.fromkeys([*self._lazy, *self._items]))
        return found if self.ordered else sorted(found)

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``; a clear error lists the known names."""
        self._load_entry_points()
        if name not in self._items and name in self._lazy:
            importlib.import_module(self._lazy[name])
            if name not in self._items:  # the mapping promised it: a bug, not a user error
                raise LookupError(
                    f"{self.kind} {name!r}: module {self._lazy[name]} does not register it"
                )
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                f"known: {', '.join(self.names())}"
            )
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> type[T]:
        return self.get(name)

    def items(self) -> list[tuple[str, type[T]]]:
        """``(name, plugin)`` of every name (imports every lazy built-in)."""
        return [(name, self.get(name)) for name in self.names()]

    def check_params(self, name: str, params: dict[str, Any]) -> None:
        """Validate ``params`` against the keyword-only constructor of ``name``."""
        cls = self.get(name)
        sig = inspect.signature(cls.__init__)
        accepted = {
            p.name: p
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{self.kind} {name!r}: unknown parameter(s) "
                f"{', '.join(u + did_you_mean(u, accepted) for u in unknown)}; "
                f"allowed: {', '.join(sorted(accepted)) or '(none)'}"
            )
        missing = [
            p
            for p, spec in accepted.items()
            if spec.default is inspect.Parameter.empty and p not in params
        ]
        if missing:
            raise ConfigError(f"{self.kind} {name!r}: missing parameter(s) {', '.join(missing)}")

    def create(self, name: str, **params: Any) -> T:
        """Instantiate ``name`` with ``params``; bad params give a ``ConfigError``."""
        self.check_params(name, params)
        cls = self.get(name)
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.kind} {name!r}: {exc}") from None
