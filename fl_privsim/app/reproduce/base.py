"""The reproduction framework: named experiments that rerun a paper's table on real data.

A :class:`Reproduction` has a name, a one-line title, its settings with their defaults
(the keys of ``experiments/reproduce/NAME.toml``), a set of ``quick`` overrides for a
smoke run, and a ``run`` function. ``run`` receives the resolved settings and a
:class:`ReproContext` (run folder, device, seeded generators, shared-data lookup) and
returns a :class:`ReproResult`: a flat summary and a markdown table with the paper's
numbers beside ours. :func:`run_reproduction` validates the settings, makes the run folder
and writes ``settings.toml``, ``env.json``, ``summary.json`` and ``table.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch

from fl_privsim.core import plugins
from fl_privsim.core.config import bind, parse_value, read_toml_file
from fl_privsim.core.config import config_field as _f
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.errors import ConfigError, DataError, UserError
from fl_privsim.core.paths import absolute, missing_path_message, shared_data_dir  # (re-exported)
from fl_privsim.core.results import RunFolder, atomic_write_text, make_run_dir
from fl_privsim.core.seeding import torch_generator

log = logging.getLogger(__name__)

#: Settings every reproduction has, whatever its own are.
COMMON = {"seed": 0, "device": "auto", "threads": 1}
#: Allowed ``device`` values.
DEVICES = ("auto", "cpu", "cuda")


def experiments_dir() -> Path:
    """The repository's ``experiments/`` folder (the settings TOMLs live in its reproduce/)."""
    return Path(__file__).resolve().parents[3] / "experiments"


@dataclass
class ReproContext:
    """What a reproduction's ``run`` gets besides its settings."""

    folder: RunFolder
    device: torch.device
    seed: int
    log: logging.Logger = field(default_factory=lambda: log)

    @property
    def path(self) -> Path:
        """The run folder (write plots and extra tables here)."""
        return self.folder.path

    def generator(self, *keys: int | str) -> torch.Generator:
        """A CPU generator seeded from the run seed and ``keys`` (ints or seed purposes)."""
        return torch_generator(self.seed, *keys)

    def data(self, relative: str) -> Path:
        """A path inside the shared data folder (:func:`fl_privsim.core.paths.shared_data_dir`; an
        absolute ``relative`` is taken as is); :class:`DataError` naming it if absent."""
        path = Path(relative).expanduser()
        head = path.name if path.is_absolute() else path.parts[0]
        if not path.is_absolute():
            path = shared_data_dir() / relative
        if not path.exists():
            raise DataError(
                missing_path_message(
                    "the reproduction's data",
                    path,
                    expect=f"put the shared data folder (with {head}/ in it) at ../shared/data beside the "
                    "repository, or set FL_PRIVSIM_SHARED_DATA to it",
                    always_expect=True,
                )
            )
        return path


@dataclass
class ReproResult:
    """A reproduction's outcome: a flat JSON summary and a markdown table."""

    summary: dict[str, Any]
    table: str


@dataclass(frozen=True)
class Reproduction:
    """One named reproduction (see the module docstring)."""

    name: str
    title: str
    defaults: dict[str, Any]
    quick: dict[str, Any]
    run: Callable[[dict[str, Any], ReproContext], ReproResult]


#: The reproductions: the registry :data:`fl_privsim.core.plugins.REPRODUCTIONS` (each module of
#: this package adds its own with :func:`register`).
REPRODUCTIONS = plugins.REPRODUCTIONS


def register(repro: Reproduction) -> Reproduction:
    """Add ``repro`` to :data:`REPRODUCTIONS` (names are unique)."""
    bad = set(repro.quick) - set(repro.defaults) - set(COMMON)
    if bad:
        raise ValueError(f"{repro.name}: quick overrides unknown settings {sorted(bad)}")
    return REPRODUCTIONS.register(repro.name)(repro)


def get(name: str) -> Reproduction:
    """The reproduction ``name``; :class:`ConfigError` listing the known ones otherwise."""
    repro: Reproduction = REPRODUCTIONS.get(name)
    return repro


def settings_schema(repro: Reproduction) -> type:
    """The typed schema of ``repro``'s settings (:data:`COMMON` plus its defaults): a frozen
    dataclass whose fields take the defaults' types, bound by the config binder
    (:func:`fl_privsim.core.config.bind`) like the run, game and measure configs."""
    fields = []
    for key, default in {**COMMON, **repro.defaults}.items():
        tp: Any = list[type(default[0])] if isinstance(default, list) else type(default)  # type: ignore[misc]
        rules: dict[str, Any] = {"device": {"choices": DEVICES}, "threads": {"min": 1}}.get(key, {})
        fields.append((key, tp, _f(default, f"{repro.name} setting", **rules)))
    return dataclasses.make_dataclass(f"{repro.name}_settings", fields, frozen=True)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    return key.strip(), parse_value(raw.strip())  # the one --set value parser (core.config)


def resolve_settings(
    repro: Reproduction,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
) -> dict[str, Any]:
    """Defaults, then the TOML (``config``, relative to the current directory, or
    ``experiments/reproduce/NAME.toml``), then ``quick`` overrides, then ``--set`` overrides;
    every key checked against the defaults. (No setting is a path: data comes from
    :meth:`ReproContext.data`, the run folder from ``--out`` or ``runs/`` in the current
    directory.)"""
    settings = {**COMMON, **repro.defaults}
    path = absolute(config) if config else experiments_dir() / "reproduce" / f"{repro.name}.toml"
    layers: list[tuple[str, dict[str, Any]]] = []
    if config or path.is_file():
        layers.append((str(path), read_toml_file(config or path, "reproduction settings file")))
    if quick:
        layers.append(("quick", dict(repro.quick)))
    layers.append(("--set", dict(_parse_override(o) for o in overrides)))
    schema = settings_schema(repro)
    for source, layer in layers:
        try:
            bound = bind(schema, layer, repro.name)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        for key in layer:
            value = getattr(bound, key)
            if isinstance(value, list) and not value:
                raise ConfigError(f"{source}: {repro.name}.{key}: expected a non-empty list")
            settings[key] = value
    return settings


def run_reproduction(
    name: str,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    parent: str | Path = "runs",
    quick: bool = False,
) -> tuple[Path, ReproResult]:
    """Run reproduction ``name`` into a fresh run folder; returns the folder and result."""
    repro = get(name)
    settings = resolve_settings(repro, config, overrides, quick=quick)
    device = resolve_device(settings["device"])
    path = make_run_dir(parent, f"reproduce_{name}", out)
    folder = RunFolder(path)
    atomic_write_text(path / "settings.toml", tomli_w.dumps(settings))
    folder.write_env(
        seed=settings["seed"], device=str(device), extra={"reproduction": name, "quick": quick}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        result = repro.run(
            settings, ReproContext(folder=folder, device=device, seed=settings["seed"])
        )
    except UserError:
        # e.g. missing shared data: leave no half-made folder behind (it holds only our files)
        if {f.name for f in path.iterdir()} <= {"settings.toml", "env.json"}:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    folder.write_summary({"reproduction": name, "quick": quick, **result.summary})
    atomic_write_text(path / "table.md", result.table.rstrip() + "\n")
    return path, result
