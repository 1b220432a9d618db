"""The results tables of a sweep folder (issue 15): one tidy row per cell x seed x attack, and
the mean with a bootstrap 95 % CI over seeds per cell x attack x metric.

Input: the sweep folder of ``fl-privsim sweep`` (issue 15's layout): ``sweep.json`` (the
manifest: grid keys, and per cell x seed its id, cell, seed, grid values, folder and status),
``sweep.toml`` and one ordinary run folder per cell x seed under ``cells/``.
Output (:func:`write_tables`): ``results.csv``/``results.parquet`` (:func:`tidy_results`) and
``summary.csv``/``summary.parquet`` (:func:`summarize`), each written atomically. The figures
are :func:`fl_privsim.app.sweep_plots.plot_sweep`'s.

The tables hold no wall-clock value (a run's ``fit_seconds_by_round``, an attack's ``seconds``,
a cell's ``seconds``): the same finished cells give the same tables, whether the sweep ran
through or was resumed. Text columns hold ``""`` when empty (no error, no attack), numeric
ones NaN; :func:`read_csv_table` reads a CSV back into the frame that was written.

How big is the update an attack saw (the ``aggregate_size`` column: records behind one
observed update = ``batch_size`` x ``local_steps`` x ``clients_in_aggregate``):

- ``batch_size`` is what the clients really drew when the run recorded it: the
  ``num-examples`` each client reports with its update (``metrics.jsonl``, source
  ``client_train``: the records of all its local batches, after
  :func:`~fl_privsim.core.partition.effective_batch_size` clamped the batch to the client's
  partition, or as a sampler defense drew them), averaged over the updates the attack was run
  on (its ``attack/<name>`` rows: round and client) and divided by ``local_steps``. Without
  such rows (no ``metrics.jsonl``, a failed cell, an attack that never ran) it is the
  configured ``client.batch_size`` (the partition size is not known without loading the data);
- ``local_steps`` is the config's ``client.local_steps`` for FedAvg, 1 for FedSGD;
- ``clients_in_aggregate`` is, for an ``@aggregate`` attack or when secure aggregation is on,
  the number of clients that sent an update in the attacked rounds (the ``client_train`` rows
  of those rounds, averaged over the rounds); without records ``federation.clients_per_round``;
  for any other row 1 (one client's update).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from fl_privsim.core.config import default_dict
from fl_privsim.core.errors import UserError

log = logging.getLogger(__name__)

#: Metrics of one attack (from ``summary["attacks"][name]``), in table order.
ATTACK_METRICS: tuple[str, ...] = (
    "psnr",
    "ssim",
    "avd",
    "asr",
    "leakage_rate",
    "label_accuracy",
    "auc",
    "auc_ci_low",
    "auc_ci_high",
    "attack_accuracy",
    "advantage",
    "attacked",
    "refused",
    "failed",
)
#: Metrics of the run (the same on every row of a cell x seed), in table order.
RUN_METRICS: tuple[str, ...] = ("model_accuracy", "initial_accuracy", "epsilon", "central_epsilon")
#: Every metric column: what :func:`summarize` summarizes.
METRICS: tuple[str, ...] = ATTACK_METRICS + RUN_METRICS
#: The size columns derived for each row (module docstring).
SIZE_COLUMNS: tuple[str, ...] = (
    "batch_size",
    "local_steps",
    "clients_in_aggregate",
    "aggregate_size",
)
#: The results table's text columns ("" when empty).
TEXT_COLUMNS: tuple[str, ...] = (
    "cell_id",
    "attack",
    "status",
    "error",
    "server_role",
    "secure_aggregation",
)
#: Columns of the summary table after the grid keys.
SUMMARY_STATS: tuple[str, ...] = ("metric", "mean", "ci_low", "ci_high", "n", "std")
#: Bootstrap of :func:`summarize`: resamples, confidence level and the seed of its generator.
N_RESAMPLES = 9999
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
#: Suffix of an attack run on the round's aggregate (``strategies.attack_runner``).
AGGREGATE_SUFFIX = "@aggregate"
#: Prefix of an analysis row's ``attack``.
ANALYSIS_PREFIX = "analysis:"
#: The run config's defaults (the last place a cell's config value is looked up).
_DEFAULTS = default_dict()


def results_columns(grid_keys: Iterable[str]) -> list[str]:
    """The results table's columns, in order, for a sweep over ``grid_keys``."""
    return [
        "cell_id",
        "cell",
        "seed",
        *grid_keys,
        "attack",
        "status",
        "error",
        *SIZE_COLUMNS,
        *METRICS,
        "server_role",
        "secure_aggregation",
    ]


def grid_columns(frame: pd.DataFrame) -> list[str]:
    """The grid-key columns of a results table (between ``seed`` and ``attack``) or of a
    summary table (between ``attack`` and ``aggregate_size``)."""
    cols = list(frame.columns)
    if "cell_id" in cols:
        return cols[cols.index("seed") + 1 : cols.index("attack")]
    return cols[cols.index("attack") + 1 : cols.index("aggregate_size")]


# --------------------------------------------------------------------------- reading a sweep


def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    """``sweep.json`` of ``sweep_dir`` (a missing or unreadable one is a :class:`UserError`)."""
    path = Path(sweep_dir) / "sweep.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} does not exist: not a sweep folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {str(path)!r}: {exc}") from None
    if manifest.get("version") != 1:
        log.warning("%s: version %r, expected 1", path, manifest.get("version"))
    return manifest


def _lookup(data: Mapping[str, Any] | None, key: str) -> Any:
    """The value at dotted ``key`` of a nested dict (``None`` when absent)."""
    node: Any = data
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _read_toml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def _num(value: Any) -> float:
    """A summary value as a float; NaN for ``None``, text, lists and other non-numbers."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return math.nan


def _grid_value(value: Any) -> Any:
    """A grid value as a table cell: lists and dicts as JSON text, the rest as it is."""
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return value


@dataclass
class _Records:
    """What a run's ``metrics.jsonl`` says about the updates: each client's ``num-examples``
    per round, and the (round, client) pairs each attack/analysis source was run on."""

    examples: dict[tuple[int, int], float] = field(default_factory=dict)
    observed: dict[str, set[tuple[int, Any]]] = field(default_factory=lambda: defaultdict(set))

    @classmethod
    def read(cls, path: Path) -> _Records | None:
        """The records of ``path`` (``None`` when there is no such file)."""
        if not path.is_file():
            return None
        out = cls()
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rnd, client, source = int(row["round"]), row.get("client"), row["source"]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("%s:%d: not a metric line, skipped", path, n)
                    continue
                if source == "client_train" and row.get("key") == "num-examples":
                    value = _num(row.get("value"))
                    if isinstance(client, int) and math.isfinite(value):
                        out.examples[(rnd, client)] = value
                elif source.startswith(("attack/", "analysis/")):
                    out.observed[source].add((rnd, client))
        return out

    def per_client(self, source: str | None) -> float | None:
        """Mean records of one client's update over the updates ``source`` observed (every
        recorded update for ``None``); ``None`` when none is recorded."""
        if source is None:
            vals = list(self.examples.values())
        else:
            pairs = self.observed.get(source, set())
            vals = [self.examples[p] for p in sorted(pairs, key=str) if p in self.examples]
        return float(np.mean(vals)) if vals else None

    def aggregate(self, source: str | None) -> tuple[float, float] | None:
        """(mean records of a member's update, mean members) over the rounds ``source``
        observed (every recorded round for ``None``); ``None`` when none is recorded."""
        by_round: dict[int, list[float]] = defaultdict(list)
        for (rnd, _), value in sorted(self.examples.items()):
            by_round[rnd].append(value)
        rounds = (
            set(by_round) if source is None else {r for r, _ in self.observed.get(source, set())}
        )
        members = [by_round[r] for r in sorted(rounds) if by_round.get(r)]
        if not members:
            return None
        total = sum(len(m) for m in members)
        return sum(sum(m) for m in members) / total, total / len(members)


@dataclass(frozen=True)
class _Cell:
    """One cell x seed of the manifest with the config values this module needs."""

    entry: Mapping[str, Any]
    run_dir: Path
    config: dict[str, Any] | None
    base: dict[str, Any] | None

    def value(self, key: str) -> Any:
        """``key`` of the cell's run config: its ``config.toml``, else the cell's grid value,
        else ``sweep.toml``, else the default (``None`` when none has it)."""
        found = _lookup(self.config, key)
        if found is not None:
            return found
        values = self.entry.get("values") or {}
        if key in values:
            return values[key]
        found = _lookup(self.base, key)
        return found if found is not None else _lookup(_DEFAULTS, key)


def _sizes(cell: _Cell, attack: str, records: _Records | None) -> dict[str, float]:
    """The size columns of one row (module docstring: recorded first, else the config)."""
    fedavg = cell.value("federation.protocol") == "fedavg"
    steps = float(cell.value("client.local_steps") or 1) if fedavg else 1.0
    secagg = (cell.value("federation.secure_aggregation.mode") or "off") != "off"
    source: str | None = None
    if attack.startswith(ANALYSIS_PREFIX):
        source = "analysis/" + attack.removeprefix(ANALYSIS_PREFIX)
    elif attack:
        source = f"attack/{attack}"
    per_client: float | None = None
    clients = 1.0
    if attack.endswith(AGGREGATE_SUFFIX) or secagg:
        recorded = records.aggregate(source) if records is not None else None
        if recorded is not None:
            per_client, clients = recorded
        else:
            clients = float(cell.value("federation.clients_per_round") or 1)
    elif records is not None:
        per_client = records.per_client(source)
    if per_client is None:
        per_client = float(cell.value("client.batch_size") or 1) * steps
    return {
        "batch_size": per_client / steps,
        "local_steps": steps,
        "clients_in_aggregate": clients,
        "aggregate_size": per_client * clients,
    }


def _attack_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The attack-metric columns of one ``summary["attacks"]`` entry."""
    out = {k: _num(entry.get(k)) for k in ATTACK_METRICS}
    ci = entry.get("auc_ci")
    if isinstance(ci, list) and len(ci) == 2:
        out["auc_ci_low"], out["auc_ci_high"] = _num(ci[0]), _num(ci[1])
    out["attack_accuracy"] = _num(entry.get("accuracy"))
    return out


def _analysis_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """An analysis' counts: analysed updates as ``attacked``, and ``failed``."""
    out = dict.fromkeys(ATTACK_METRICS, math.nan)
    out["attacked"], out["failed"] = _num(entry.get("analysed")), _num(entry.get("failed"))
    return out


def _cell_rows(
    sweep_dir: Path, entry: Mapping[str, Any], grid_keys: list[str], base: Any
) -> list[dict[str, Any]]:
    """The rows of one cell x seed: one per attack (and analysis) of a finished run, one for a
    failed run, none for a pending or running one."""
    cell_id = str(entry["id"])
    run_dir = sweep_dir / str(entry.get("dir") or f"cells/{cell_id}")
    summary_path = run_dir / "summary.json"
    status = entry.get("status")
    error = str(entry.get("error") or "")
    summary: dict[str, Any] | None = None
    present = summary_path.is_file()
    if present:  # finished exactly when its summary exists (the contract) ...
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("cell %s: unreadable summary.json (%s): counted as failed", cell_id, exc)
            error = error or f"unreadable summary.json: {exc}"
    if summary is not None and summary.get("status") == "interrupted":
        # ... and does not say it was stopped by SIGINT/SIGTERM (--resume reruns such a cell)
        summary, present = None, False
    if not present:
        if status == "done":
            log.warning("cell %s: sweep.json says done but %s is missing", cell_id, summary_path)
            error = error or "sweep.json says done but summary.json is missing"
        elif status != "failed":
            return []  # pending or running
    cell = _Cell(entry, run_dir, _read_toml(run_dir / "config.toml"), base)
    values = entry.get("values") or {}
    common: dict[str, Any] = {
        "cell_id": cell_id,
        "cell": int(entry["cell"]),
        "seed": int(entry["seed"]),
        **{k: _grid_value(values.get(k)) for k in grid_keys},
        "server_role": str(cell.value("server.role") or ""),
        "secure_aggregation": str(cell.value("federation.secure_aggregation.mode") or ""),
    }
    if summary is None:
        return [
            {
                **common,
                "attack": "",
                "status": "failed",
                "error": error,
                **_sizes(cell, "", None),
                **dict.fromkeys(METRICS, math.nan),
            }
        ]
    run = {
        "model_accuracy": _num(summary.get("final_accuracy")),
        "initial_accuracy": _num(summary.get("initial_accuracy")),
        "epsilon": _num(summary.get("epsilon")),
        "central_epsilon": _num(summary.get("central_epsilon")),
    }
    server = summary.get("server")
    if isinstance(server, Mapping) and server.get("role"):
        common["server_role"] = str(server["role"])
    secagg = summary.get("secure_aggregation")
    if isinstance(secagg, Mapping) and secagg.get("mode"):
        common["secure_aggregation"] = str(secagg["mode"])
    per_attack: list[tuple[str, dict[str, float]]] = [
        (str(name), _attack_metrics(e))
        for name, e in (summary.get("attacks") or {}).items()
        if isinstance(e, Mapping)
    ]
    per_attack += [
        (ANALYSIS_PREFIX + str(name), _analysis_metrics(e))
        for name, e in (summary.get("analyses") or {}).items()
        if isinstance(e, Mapping)
    ]
    if not per_attack:
        per_attack = [("", dict.fromkeys(ATTACK_METRICS, math.nan))]
    records = _Records.read(run_dir / "metrics.jsonl")
    return [
        {
            **common,
            "attack": name,
            "status": "done",
            "error": error,
            **_sizes(cell, name, records),
            **metrics,
            **run,
        }
        for name, metrics in per_attack
    ]


def _typed(frame: pd.DataFrame, grid_keys: list[str]) -> pd.DataFrame:
    """Fixed dtypes: text columns ``str``, ids ``int64``, sizes and metrics ``float64``; a grid
    column mixing text with other values holds them all as text (JSON for the others)."""
    for col in TEXT_COLUMNS:
        frame[col] = frame[col].astype("str")
    for col in ("cell", "seed"):
        frame[col] = frame[col].astype("int64")
    for col in (*SIZE_COLUMNS, *METRICS):
        frame[col] = frame[col].astype("float64")
    for key in grid_keys:
        vals = [v for v in frame[key] if not _missing(v)]
        if any(isinstance(v, str) for v in vals) and not all(isinstance(v, str) for v in vals):
            frame[key] = [
                v
                if isinstance(v, str) or _missing(v)
                else json.dumps(v.item() if isinstance(v, np.generic) else v)
                for v in frame[key]
            ]
    return frame


def _missing(value: Any) -> bool:
    """``None`` or a float NaN (a grid key a cell does not set)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def tidy_results(sweep_dir: Path) -> pd.DataFrame:
    """One row per cell x seed x attack of the sweep in ``sweep_dir``.

    ``attack`` is each key of the run summary's ``attacks`` (``"<name>@aggregate"`` for an
    attack on the round's aggregate), ``"analysis:<name>"`` for each of its ``analyses``
    (``attacked`` = updates analysed, ``failed``; their values are not table columns), or
    ``""`` for a finished run without either. A failed cell is one row with ``attack = ""``,
    ``status = "failed"``, its ``error`` and NaN metrics; pending and running cells are left
    out. Columns: :func:`results_columns` (the grid keys by their dotted names, values as in
    ``sweep.json``, lists and dicts as JSON text). Rows sorted by cell, seed, attack.
    """
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    grid_keys = [str(k) for k in manifest.get("grid_keys") or []]
    extra = sorted(
        {str(k) for c in manifest.get("cells") or [] for k in (c.get("values") or {})}
        - set(grid_keys)
    )
    grid_keys += extra  # keys a cell sets that the manifest's grid_keys omit (zipped ones)
    clash = set(grid_keys) & set(results_columns([]))
    if clash:
        raise UserError(f"{sweep_dir}: grid keys {sorted(clash)} clash with the table's columns")
    base = _read_toml(sweep_dir / "sweep.toml")
    rows = [
        row
        for entry in manifest.get("cells") or []
        for row in _cell_rows(sweep_dir, entry, grid_keys, base)
    ]
    frame = pd.DataFrame.from_records(rows, columns=results_columns(grid_keys))
    frame = _typed(frame, grid_keys)
    return frame.sort_values(["cell", "seed", "attack"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- summary over seeds


def _bootstrap_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean of each row of ``values`` (G, n), n >= 2: one
    vectorized :func:`scipy.stats.bootstrap` call with a generator seeded with
    :data:`BOOTSTRAP_SEED`. SciPy draws one index matrix for all rows, so a row's CI depends
    only on its own values (not on which other rows share the call)."""
    with np.errstate(invalid="ignore"):
        res = stats.bootstrap(
            (values,),
            np.mean,
            n_resamples=N_RESAMPLES,
            vectorized=True,
            axis=-1,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        )
    ci = res.confidence_interval
    return np.atleast_1d(ci.low), np.atleast_1d(ci.high)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % percentile-bootstrap CI over seeds, one row per cell x attack x metric.

    Only ``status == "done"`` rows count. For each (cell, attack) and each metric with at
    least one value (NaN is no value): ``mean``, ``ci_low``/``ci_high`` (the bootstrap of the
    mean over the seeds with a value, :data:`N_RESAMPLES` resamples, seeded: the table is
    reproducible; one seed, or all seeds equal: ``ci_low = ci_high = mean``), ``n`` (seeds
    with a value) and ``std`` (sample standard deviation, NaN for one seed). The grid-key
    columns are carried along, and ``aggregate_size`` (its mean over the seeds).
    """
    grid = grid_columns(results)
    columns = ["cell", "attack", *grid, "aggregate_size", *SUMMARY_STATS]
    done = results[results["status"] == "done"]
    rows: list[dict[str, Any]] = []
    pending: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (cell, attack), group in done.groupby(["cell", "attack"], sort=True):
        carried = {k: group[k].iloc[0] for k in grid}
        size = (
            float(np.nanmean(group["aggregate_size"]))
            if group["aggregate_size"].notna().any()
            else math.nan
        )
        for metric in METRICS:
            vals = group[metric].to_numpy(dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            if not vals.size:
                continue
            same = bool(np.all(vals == vals[0]))  # one seed, or all equal: the CI is the value
            mean = float(vals[0]) if same else float(np.mean(vals))
            row = {
                "cell": cell,
                "attack": attack,
                **carried,
                "aggregate_size": size,
                "metric": metric,
                "mean": mean,
                "ci_low": mean,
                "ci_high": mean,
                "n": int(vals.size),
                "std": math.nan if vals.size == 1 else 0.0 if same else float(np.std(vals, ddof=1)),
            }
            rows.append(row)
            if not same:
                pending[int(vals.size)].append((len(rows) - 1, vals))
    for group_rows in pending.values():  # one bootstrap call per number of seeds
        low, high = _bootstrap_ci(np.stack([v for _, v in group_rows]))
        for (i, _), lo, hi in zip(group_rows, low, high, strict=True):
            rows[i]["ci_low"], rows[i]["ci_high"] = float(lo), float(hi)
    frame = pd.DataFrame.from_records(rows, columns=columns)
    order = {m: i for i, m in enumerate(METRICS)}
    frame = frame.sort_values(
        ["cell", "attack", "metric"], key=_metric_order(order), kind="stable"
    ).reset_index(drop=True)
    frame["attack"] = frame["attack"].astype("str")
    frame["metric"] = frame["metric"].astype("str")
    frame["cell"] = frame["cell"].astype("int64")
    frame["n"] = frame["n"].astype("int64")
    for col in ("aggregate_size", "mean", "ci_low", "ci_high", "std"):
        frame[col] = frame[col].astype("float64")
    for key in grid:
        if len(frame) == 0:
            frame[key] = frame[key].astype(results[key].dtype)
    return frame


def _metric_order(order: Mapping[str, int]) -> Callable[[pd.Series], pd.Series]:
    """Sort key: metrics in :data:`METRICS` order, other columns as they are."""

    def key(col: pd.Series) -> pd.Series:
        return col.map(order) if col.name == "metric" else col

    return key


# --------------------------------------------------------------------------- files


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _float_text(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (Python's float ``repr``)."""
    return repr(float(value))


def write_frame(frame: pd.DataFrame, stem: Path) -> tuple[Path, Path]:
    """Write ``frame`` as ``<stem>.csv`` (floats in full ``repr``: they read back exactly, NaN
    as an empty field) and ``<stem>.parquet`` (pyarrow), each atomically."""
    csv, parquet = stem.with_suffix(".csv"), stem.with_suffix(".parquet")
    _atomic(
        csv, lambda p: frame.to_csv(p, index=False, float_format=_float_text, lineterminator="\n")
    )
    _atomic(parquet, lambda p: frame.to_parquet(p, engine="pyarrow", index=False))
    return csv, parquet


def read_csv_table(path: Path) -> pd.DataFrame:
    """A results or summary CSV read back as the frame that was written: text columns keep
    ``""``, an empty numeric field is NaN, floats round-trip exactly."""
    header = pd.read_csv(path, nrows=0).columns
    text = {c for c in (*TEXT_COLUMNS, "metric") if c in header}
    numeric = [c for c in header if c not in text]
    return pd.read_csv(
        path,
        keep_default_na=False,
        na_values={c: [""] for c in numeric},
        dtype=dict.fromkeys(text, "str"),
    )


def write_tables(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``results.csv``/``.parquet`` (:func:`tidy_results`) and ``summary.csv``/``.parquet``
    (:func:`summarize`) into ``sweep_dir``; returns (results, summary)."""
    sweep_dir = Path(sweep_dir)
    results = tidy_results(sweep_dir)
    summary = summarize(results)
    write_frame(results, sweep_dir / "results")
    write_frame(summary, sweep_dir / "summary")
    log.info(
        "sweep tables: %d result rows, %d summary rows in %s", len(results), len(summary), sweep_dir
    )
    return results, summary
