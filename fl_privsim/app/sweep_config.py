"""A sweep's config: a run config plus a ``[sweep]`` table, expanded into cells × seeds.

```toml
# a normal run config, plus:
[sweep]
repeats = 3                        # seeds per cell: seed, seed+1, ...
zip = [["client.batch_size", "client.local_steps"]]   # optional: keys that vary together
[sweep.grid]
"client.batch_size" = [1, 4, 16, 64]
"federation.clients_per_round" = [1, 5, 20]
```

Every grid key is a dotted run-config key (as ``--set`` takes it); the cells are the cross
product of the grid's keys in file order, except that the keys of one ``zip`` group take their
i-th values together. Every cell's config is built and validated here, before any cell runs,
so an unknown key, an empty list, a value of the wrong type or a key that cannot be swept is
one :class:`~fl_privsim.core.errors.ConfigError` line.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fl_privsim.core import config as config_mod
from fl_privsim.core import paths
from fl_privsim.core.config import Config
from fl_privsim.core.errors import ConfigError, did_you_mean

SWEEP_KEYS = ("grid", "repeats", "zip")
# keys a grid may not vary, and why
UNSWEEPABLE = {
    "seed": "seeds come from [sweep] repeats (seed, seed+1, ...)",
    "name": "the sweep's cells share the base config's name",
    "output": "cells are written inside the sweep folder",
    "sweep": "a sweep cannot sweep itself",
}
MAX_CELLS = 100_000


@dataclass(frozen=True)
class Cell:
    """One cell × seed of a sweep: its folder id, grid values and validated run config."""

    id: str
    cell: int
    seed: int
    values: dict[str, Any]
    config: Config


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: the base run config, the ``[sweep]`` table and every cell × seed."""

    base: Config
    grid: dict[str, list[Any]]
    zip: list[list[str]]
    repeats: int
    cells: list[Cell] = field(default_factory=list)

    @property
    def grid_keys(self) -> list[str]:
        """The swept keys, in grid order."""
        return list(self.grid)

    def sweep_table(self) -> dict[str, Any]:
        """The ``[sweep]`` table as it is saved in ``sweep.toml``."""
        table: dict[str, Any] = {"repeats": self.repeats, "grid": self.grid}
        if self.zip:
            table["zip"] = self.zip
        return table

    def to_toml(self) -> str:
        """The base config and the ``[sweep]`` table: what ``sweep.toml`` holds."""
        return config_mod.to_toml(self.base) + "\n" + tomli_w.dumps({"sweep": self.sweep_table()})


def _check_table(table: Any) -> tuple[dict[str, list[Any]], list[list[str]], int]:
    """The ``[sweep]`` table's grid, zip groups and repeats, checked for shape."""
    if not isinstance(table, dict):
        raise ConfigError("[sweep] must be a table with grid, repeats and (optional) zip")
    unknown = [k for k in table if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(
            f"[sweep]: unknown key {unknown[0]!r}{did_you_mean(unknown[0], SWEEP_KEYS)}; "
            f"allowed: {', '.join(SWEEP_KEYS)}"
        )
    repeats = table.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"[sweep] repeats: {repeats!r} is not a whole number >= 1")
    grid = table.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(
            '[sweep.grid] is missing or empty: give at least one key, e.g. "client.batch_size" '
            "= [1, 4, 16]"
        )
    for key, values in grid.items():
        if not isinstance(values, list):
            raise ConfigError(
                f"[sweep.grid] {key!r}: expected a list of values, got {type(values).__name__} "
                f"{values!r}"
            )
        if not values:
            raise ConfigError(f"[sweep.grid] {key!r}: the list of values is empty")
        top = key.split(".", 1)[0]
        if key in UNSWEEPABLE or top in UNSWEEPABLE:
            why = UNSWEEPABLE.get(key, UNSWEEPABLE.get(top))
            raise ConfigError(f"[sweep.grid] {key!r} cannot be swept: {why}")
    groups = table.get("zip", [])
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and all(isinstance(k, str) for k in g) for g in groups
    ):
        raise ConfigError('[sweep] zip: expected a list of lists of grid keys, e.g. [["a", "b"]]')
    seen: set[str] = set()
    for group in groups:
        for key in group:
            if key not in grid:
                raise ConfigError(f"[sweep] zip: {key!r} is not a key of [sweep.grid]")
            if key in seen:
                raise ConfigError(f"[sweep] zip: {key!r} is in more than one group")
            seen.add(key)
        lengths = {len(grid[k]) for k in group}
        if len(lengths) > 1:
            sizes = ", ".join(f"{k} has {len(grid[k])}" for k in group)
            raise ConfigError(
                f"[sweep] zip: keys that vary together need equally many values ({sizes})"
            )
    return grid, groups, repeats


def _combinations(grid: dict[str, list[Any]], groups: list[list[str]]) -> list[dict[str, Any]]:
    """The cells' grid values: the cross product over units (a zip group or a single key)."""
    grouped = {k for g in groups for k in g}
    units: list[list[str]] = []
    for key in grid:
        if key in grouped:
            group = next(g for g in groups if key in g)
            if group not in units:
                units.append(group)
        else:
            units.append([key])
    per_unit = [
        [dict(zip(unit, row, strict=True)) for row in zip(*(grid[k] for k in unit), strict=True)]
        for unit in units
    ]
    total = 1
    for options in per_unit:
        total *= len(options)
    if total > MAX_CELLS:
        raise ConfigError(f"[sweep.grid] has {total} cells; at most {MAX_CELLS} are allowed")
    cells = []
    for combo in itertools.product(*per_unit):
        values: dict[str, Any] = {}
        for part in combo:
            values.update(part)
        cells.append({k: values[k] for k in grid})  # grid order
    return cells


def plan_sweep(data: dict[str, Any], base_dir: Path | None = None) -> SweepPlan:
    """Validate a sweep config (TOML-shaped ``data`` with a ``[sweep]`` table, paths already
    resolved) and expand it into cells × seeds; ``base_dir`` resolves relative path values
    in the grid (the config file's folder)."""
    data = copy.deepcopy(data)
    if "sweep" not in data:
        raise ConfigError(
            "the config has no [sweep] table: add [sweep] repeats = N and [sweep.grid] "
            '"key" = [values] (fl-privsim run runs a single config)'
        )
    grid, groups, repeats = _check_table(data.pop("sweep"))
    base_dict = config_mod.to_dict(config_mod.from_dict(data))
    # defaults that are relative paths (output.dir = "runs") resolve against the current
    # folder now, so the saved sweep.toml means the same wherever --resume runs
    paths.resolve_keys(base_dict, config_mod.PATH_KEYS)
    base = config_mod.from_dict(copy.deepcopy(base_dict))
    cells: list[Cell] = []
    for index, values in enumerate(_combinations(grid, groups)):
        cell_data = copy.deepcopy(base_dict)
        for key, value in values.items():
            config_mod.set_value(cell_data, key, copy.deepcopy(value), label="[sweep.grid]")
            paths.resolve_keys(cell_data, config_mod.PATH_KEYS, base_dir, under=key)
        for r in range(repeats):
            cell_data["seed"] = base.seed + r
            try:
                cfg = config_mod.from_dict(copy.deepcopy(cell_data))
            except ConfigError as exc:
                shown = ", ".join(f"{k} = {v!r}" for k, v in values.items())
                raise ConfigError(f"[sweep.grid] cell {index} ({shown}): {exc}") from None
            cells.append(
                Cell(id=f"c{index:03d}_s{r}", cell=index, seed=cfg.seed, values=values, config=cfg)
            )
    return SweepPlan(base=base, grid=grid, zip=groups, repeats=repeats, cells=cells)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepPlan:
    """Read a sweep config file, apply ``--set`` overrides to its run config (not to the grid's
    keys: a ``--set`` of a swept key is refused), and plan it."""
    data = config_mod.read_toml_file(path, "sweep config")
    folder = paths.absolute(path).parent
    paths.resolve_keys(data, config_mod.PATH_KEYS, folder)
    swept = (
        set((data.get("sweep") or {}).get("grid") or {})
        if isinstance(data.get("sweep"), dict)
        else set()
    )
    for assignment in overrides:
        key = config_mod.override_key(assignment)
        if key in swept:
            raise ConfigError(
                f"--set {key}: the key is swept by [sweep.grid]; change the grid instead"
            )
        if key.split(".", 1)[0] == "sweep":
            raise ConfigError(
                f"--set {key}: [sweep] is set in the sweep config file, not with --set"
            )
        if key.startswith("attacks") and "attacks" not in data:
            data["attacks"] = config_mod.default_dict()["attacks"]
        config_mod.apply_override(data, assignment)
        paths.resolve_keys(data, config_mod.PATH_KEYS, under=key)
    return plan_sweep(data, folder)
