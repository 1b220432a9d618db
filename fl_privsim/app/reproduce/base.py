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

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch

from fl_privsim.core import plugins
from fl_privsim.core.config import parse_value, read_toml_file
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.errors import ConfigError, DataError, UserError, did_you_mean
from fl_privsim.core.paths import absolute, missing_path_message, shared_data_dir  # (re-exported)
from fl_privsim.core.results import RunFolder, atomic_write_text, make_run_dir
from fl_privsim.core.seeding import torch_generator

log = logging.getLogger(__name__)

#: Settings every reproduction has, whatever its own are.
COMMON = {"seed": 0, "device": "auto", "threads": 1}


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


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    where = f"{name}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: expected a non-empty list, got {value!r}")
        if default:
            return [_coerce(name, f"{key}[{i}]", v, default[0]) for i, v in enumerate(value)]
        return value
    return value


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
    allowed = {**COMMON, **repro.defaults}
    settings = dict(allowed)
    path = absolute(config) if config else experiments_dir() / "reproduce" / f"{repro.name}.toml"
    layers: list[tuple[str, dict[str, Any]]] = []
    if config or path.is_file():
        layers.append((str(path), read_toml_file(config or path, "reproduction settings file")))
    if quick:
        layers.append(("quick", dict(repro.quick)))
    layers.append(("--set", dict(_parse_override(o) for o in overrides)))
    for source, layer in layers:
        for key, value in layer.items():
            if key not in allowed:
                raise ConfigError(
                    f"{source}: unknown setting {key!r} for reproduction {repro.name!r}"
                    f"{did_you_mean(key, allowed)}; "
                    f"allowed: {', '.join(sorted(allowed))}"
                )
            settings[key] = _coerce(repro.name, key, value, allowed[key])
    if settings["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"{repro.name}.device: expected auto, cpu or cuda, got {settings['device']!r}"
        )
    if settings["threads"] < 1:
        raise ConfigError(
            f"{repro.name}.threads: expected an integer >= 1, got {settings['threads']}"
        )
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
