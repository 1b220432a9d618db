"""The sweep's results tables (fl_privsim.app.sweep_results) and figures (sweep_plots), on sweep
folders built by hand: real run configs (core.config), hand-written summaries and metrics."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fl_privsim.app import sweep_results as sr
from fl_privsim.app.sweep_plots import PLOTTED, plot_sweep
from fl_privsim.core.config import load, to_toml
from fl_privsim.core.errors import UserError

GRID = ["client.batch_size", "federation.protocol"]
BASE = [
    "federation.num_clients=5",
    "federation.clients_per_round=5",
    "client.local_steps=3",
    "attacks.2.targets.aggregate=true",
]
#: cell -> (batch size, protocol); the 2 x 2 grid.
CELLS = {0: (4, "fedsgd"), 1: (4, "fedavg"), 2: (20, "fedsgd"), 3: (20, "fedavg")}
SEEDS = (0, 1, 2)
#: PSNR of the per-client attack by seed in cell 0 (the CI example).
PSNR = (10.0, 12.0, 17.0)
ATTACKS = ("analytic", "inverting_gradients@aggregate", "membership_inference")


def _attacks(cell: int, seed: int) -> dict[str, Any]:
    return {
        "analytic": {
            "psnr": PSNR[seed] + 5 * cell,
            "ssim": 0.5,
            "asr": 0.25 * seed,
            "leakage_rate": 0.5,
            "label_accuracy": 1.0,
            "seconds": 1.5 + seed,  # wall-clock: never in a table
            "attacked": 2.0,
            "refused": 0.0,
            "failed": 0.0,
        },
        "inverting_gradients@aggregate": {
            "psnr": 9.0 + seed,
            "ssim": 0.1,
            "attacked": 1.0,
            "refused": 0.0,
            "failed": 0.0,
        },
        "membership_inference": {
            "attacked": 2.0,
            "refused": 0.0,
            "failed": 0.0,
            "trials": 2,
            "positives": 1,
            "auc": 0.6 + 0.1 * seed,
            "auc_ci": [0.4, 0.9],
            "accuracy": 0.5,
            "advantage": 0.0,
        },
    }


def _summary(cfg_seed: int, attacks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "default",
        "seed": cfg_seed,
        "attacks": attacks,
        "final_accuracy": 0.8 + 0.01 * cfg_seed,
        "initial_accuracy": 0.1,
        "accuracy_by_round": {"0": 0.1, "5": 0.8},
        "fit_seconds_by_round": {"1": 3.2 + cfg_seed},
        "server": {"role": "honest_but_curious"},
        "client_errors": {},
        **extra,
    }


def _write_run(
    run_dir: Path,
    overrides: list[str],
    summary: dict[str, Any] | None,
    metrics: list[dict[str, Any]] | None = None,
) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(load(None, overrides)), encoding="utf-8")
    if metrics:
        lines = [json.dumps(m) for m in metrics]
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


def _train(rnd: int, client: int, n: int) -> dict[str, Any]:
    return {
        "round": rnd,
        "client": client,
        "source": "client_train",
        "key": "num-examples",
        "value": n,
    }


def _attacked(label: str, rnd: int, client: int | str) -> dict[str, Any]:
    return {"round": rnd, "client": client, "source": f"attack/{label}", "key": "psnr", "value": 1}


#: Cell 0's records: client 1's partition holds 3 records (its batch is clamped to 3).
RECORDED_FEDSGD = [
    *(_train(1, c, 3 if c == 1 else 4) for c in range(5)),
    _attacked("analytic", 1, 0),
    _attacked("analytic", 1, 1),
    _attacked("inverting_gradients@aggregate", 1, "agg"),
    _attacked("membership_inference", 1, 0),
]
#: Cell 1, seed 0 (FedAvg, 3 local steps): client 0 reports 9 records = 3 per batch; round 2
#: has 4 of the 5 clients (one refused).
RECORDED_FEDAVG = [
    *(_train(1, c, 9 if c == 0 else 12) for c in range(5)),
    *(_train(2, c, 12) for c in range(4)),
    _attacked("analytic", 1, 0),
    _attacked("inverting_gradients@aggregate", 1, "agg"),
    _attacked("inverting_gradients@aggregate", 2, "agg"),
]


def _entry(cell: int, seed: int, status: str, error: str | None = None) -> dict[str, Any]:
    bs, proto = CELLS[cell]
    return {
        "id": f"c{cell:03d}_s{seed}",
        "cell": cell,
        "seed": seed,
        "values": {"client.batch_size": bs, "federation.protocol": proto},
        "dir": f"cells/c{cell:03d}_s{seed}",
        "status": status,
        "error": error,
        "seconds": None if status in ("pending", "running") else 10.0 + seed,
    }


def build_sweep(root: Path) -> Path:
    """A 2 x 2 grid x 3 seeds: c001_s2 failed, c003_s1 running (a partial folder), c003_s2
    pending; cell 0 (every seed) and c001_s0 with recorded example counts."""
    sweep = root / "sweep"
    entries = []
    for cell, seed in itertools.product(CELLS, SEEDS):
        bs, proto = CELLS[cell]
        overrides = [
            *BASE,
            f"client.batch_size={bs}",
            f'federation.protocol="{proto}"',
            f"seed={seed}",
        ]
        run_dir = sweep / "cells" / f"c{cell:03d}_s{seed}"
        if (cell, seed) == (1, 2):
            entries.append(_entry(cell, seed, "failed", "RuntimeError: CUDA out of memory"))
            _write_run(run_dir, overrides, None)
            continue
        if (cell, seed) == (3, 1):
            entries.append(_entry(cell, seed, "running"))
            _write_run(run_dir, overrides, None)
            continue
        if (cell, seed) == (3, 2):
            entries.append(_entry(cell, seed, "pending"))
            continue
        extra = {"central_epsilon": 2.5} if (cell, seed) == (0, 0) else {}
        metrics = (
            RECORDED_FEDSGD if cell == 0 else RECORDED_FEDAVG if (cell, seed) == (1, 0) else []
        )
        _write_run(run_dir, overrides, _summary(seed, _attacks(cell, seed), **extra), metrics)
        entries.append(_entry(cell, seed, "done"))
    manifest = {
        "version": 1,
        "name": "default",
        "grid_keys": GRID,
        "zip": [],
        "repeats": 3,
        "base_seed": 0,
        "cells": entries,
    }
    (sweep / "sweep.json").write_text(json.dumps(manifest), encoding="utf-8")
    (sweep / "sweep.toml").write_text(to_toml(load(None, BASE)), encoding="utf-8")
    return sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def results(sweep: Path) -> pd.DataFrame:
    return sr.tidy_results(sweep)


def _row(results: pd.DataFrame, cell: int, seed: int, attack: str) -> pd.Series:
    hit = results[(results.cell == cell) & (results.seed == seed) & (results.attack == attack)]
    assert len(hit) == 1, (cell, seed, attack)
    return hit.iloc[0]


# --------------------------------------------------------------------------- the results table


def test_one_row_per_cell_seed_attack(results: pd.DataFrame) -> None:
    done = [
        (c, s) for c, s in itertools.product(CELLS, SEEDS) if (c, s) not in {(1, 2), (3, 1), (3, 2)}
    ]
    assert len(results) == len(done) * len(ATTACKS) + 1  # + the failed cell's row
    keys = list(zip(results.cell, results.seed, results.attack, strict=True))
    assert len(set(keys)) == len(keys)
    assert set(keys) == {(c, s, a) for c, s in done for a in ATTACKS} | {(1, 2, "")}
    assert keys == sorted(keys)
    assert not ((results.cell == 3) & results.seed.isin([1, 2])).any()  # running, pending: left out


def test_columns_in_order_and_no_timing(results: pd.DataFrame) -> None:
    assert list(results.columns) == sr.results_columns(GRID)
    assert list(results.columns[:6]) == ["cell_id", "cell", "seed", *GRID, "attack"]
    assert not [c for c in results.columns if "second" in c or "time" in c]
    assert sr.grid_columns(results) == GRID


def test_grid_values_and_run_metrics(results: pd.DataFrame) -> None:
    for cell, (bs, proto) in CELLS.items():
        rows = results[results.cell == cell]
        assert set(rows["client.batch_size"]) == {bs}
        assert set(rows["federation.protocol"]) == {proto}
        assert set(rows.cell_id) <= {f"c{cell:03d}_s{s}" for s in SEEDS}
    r = _row(results, 2, 1, "analytic")
    assert r.psnr == 22.0 and r.asr == 0.25 and r.status == "done" and r.error == ""
    assert r.model_accuracy == pytest.approx(0.81) and r.initial_accuracy == 0.1
    assert math.isnan(r.epsilon) and math.isnan(r.central_epsilon) and math.isnan(r.auc)
    assert r.server_role == "honest_but_curious" and r.secure_aggregation == "off"
    assert _row(results, 0, 0, "analytic").central_epsilon == 2.5
    mi = _row(results, 0, 2, "membership_inference")
    assert mi.auc == pytest.approx(0.8) and (mi.auc_ci_low, mi.auc_ci_high) == (0.4, 0.9)
    assert mi.attack_accuracy == 0.5 and mi.advantage == 0.0 and math.isnan(mi.psnr)


def test_failed_cell_row(results: pd.DataFrame) -> None:
    r = _row(results, 1, 2, "")
    assert r.status == "failed" and r.error == "RuntimeError: CUDA out of memory"
    assert all(math.isnan(r[m]) for m in sr.METRICS)
    assert (r.batch_size, r.local_steps, r.clients_in_aggregate, r.aggregate_size) == (4, 3, 1, 12)


@pytest.mark.parametrize(
    "cell, seed, attack, sizes",
    [
        # recorded, FedSGD: clients 0 and 1 drew 4 and 3 records
        (0, 1, "analytic", (3.5, 1, 1, 3.5)),
        # recorded aggregate: 5 members drew 4, 3, 4, 4, 4 records
        (0, 1, "inverting_gradients@aggregate", (3.8, 1, 5, 19.0)),
        (0, 1, "membership_inference", (4, 1, 1, 4)),
        # recorded, FedAvg: client 0 sent 9 records over 3 steps
        (1, 0, "analytic", (3, 3, 1, 9)),
        # recorded aggregate over rounds 1 (5 clients, 57 records) and 2 (4 clients, 48)
        (1, 0, "inverting_gradients@aggregate", (105 / 9 / 3, 3, 4.5, 52.5)),
        # not recorded: the config (batch x steps x clients_per_round)
        (1, 1, "analytic", (4, 3, 1, 12)),
        (1, 1, "inverting_gradients@aggregate", (4, 3, 5, 60)),
        (2, 0, "analytic", (20, 1, 1, 20)),
        (2, 0, "inverting_gradients@aggregate", (20, 1, 5, 100)),
        (3, 0, "analytic", (20, 3, 1, 60)),
        (3, 0, "inverting_gradients@aggregate", (20, 3, 5, 300)),
    ],
)
def test_aggregate_size(
    results: pd.DataFrame, cell: int, seed: int, attack: str, sizes: tuple
) -> None:
    r = _row(results, cell, seed, attack)
    got = (r.batch_size, r.local_steps, r.clients_in_aggregate, r.aggregate_size)
    assert got == pytest.approx(sizes)


def test_no_attacks_secure_aggregation_and_analyses(tmp_path: Path) -> None:
    """A finished run without attacks keeps one row (accuracy); with SecAgg+ the observed update
    is the aggregate of clients_per_round clients; analyses get their own rows."""
    sweep = tmp_path / "s"
    secagg = [
        "federation.num_clients=4",
        "federation.clients_per_round=4",
        'federation.secure_aggregation.mode="secagg+"',
        'attacks=[{name="inverting_gradients", targets={clients=[], aggregate=true}}]',
    ]
    plain = ["federation.num_clients=4", "federation.clients_per_round=2", "client.batch_size=8"]
    _write_run(
        sweep / "cells" / "c000_s0",
        [*secagg, "client.batch_size=2"],
        _summary(0, {}, secure_aggregation={"mode": "secagg+"}, epsilon=float("inf")),
    )
    _write_run(
        sweep / "cells" / "c001_s0",
        plain,
        _summary(
            0,
            {},
            analyses={
                "i2f": {"lower_bound_rmse": 0.1, "analysed": 2.0, "skipped": 0.0, "failed": 1.0}
            },
        ),
    )
    cells = [
        {
            "id": "c000_s0",
            "cell": 0,
            "seed": 0,
            "values": {"client.batch_size": 2, "defenses": []},
            "dir": "cells/c000_s0",
            "status": "done",
            "error": None,
            "seconds": 1.0,
        },
        {
            "id": "c001_s0",
            "cell": 1,
            "seed": 0,
            "values": {"client.batch_size": 8, "defenses": [{"name": "noise"}]},
            "dir": "cells/c001_s0",
            "status": "done",
            "error": None,
            "seconds": 1.0,
        },
    ]
    manifest = {
        "version": 1,
        "name": "x",
        "grid_keys": ["client.batch_size"],
        "zip": [],
        "repeats": 1,
        "base_seed": 0,
        "cells": cells,
    }
    sweep.mkdir(exist_ok=True)
    (sweep / "sweep.json").write_text(json.dumps(manifest), encoding="utf-8")
    results = sr.tidy_results(sweep)
    assert list(results.attack) == ["", "analysis:i2f"]
    assert list(results["defenses"]) == ["[]", '[{"name": "noise"}]']  # JSON text
    a, b = results.iloc[0], results.iloc[1]
    assert a.secure_aggregation == "secagg+" and a.model_accuracy == 0.8 and a.epsilon == math.inf
    assert (a.batch_size, a.local_steps, a.clients_in_aggregate, a.aggregate_size) == (2, 1, 4, 8)
    assert (b.attacked, b.failed) == (2.0, 1.0) and math.isnan(b.refused) and math.isnan(b.psnr)
    assert (b.clients_in_aggregate, b.aggregate_size) == (1, 8)
    summary = sr.summarize(results)
    eps = summary[summary.metric == "epsilon"].iloc[0]
    assert (eps["mean"], eps.ci_low, eps.ci_high, eps.n) == (math.inf, math.inf, math.inf, 1)


def test_deterministic(sweep: Path, results: pd.DataFrame) -> None:
    again = sr.tidy_results(sweep)
    pd.testing.assert_frame_equal(results, again)
    pd.testing.assert_frame_equal(sr.summarize(results), sr.summarize(again))


def test_resumed_sweep_gives_the_same_tables(
    sweep: Path, results: pd.DataFrame, tmp_path: Path
) -> None:
    """Another order of the manifest's cells and other wall-clock times (a resumed sweep's)."""
    other = tmp_path / "resumed"
    shutil.copytree(sweep, other)
    manifest = json.loads((other / "sweep.json").read_text())
    manifest["cells"] = [{**c, "seconds": 99.0} for c in reversed(manifest["cells"])]
    (other / "sweep.json").write_text(json.dumps(manifest))
    for path in other.glob("cells/*/summary.json"):
        summary = json.loads(path.read_text())
        summary["fit_seconds_by_round"] = {"1": 123.0}
        for entry in summary["attacks"].values():
            entry["seconds"] = 42.0
        path.write_text(json.dumps(summary))
    pd.testing.assert_frame_equal(sr.tidy_results(other), results)


# --------------------------------------------------------------------------- the summary


def _frame(values: dict[tuple[int, str], list[float]], metric: str = "psnr") -> pd.DataFrame:
    """A results table with ``values[(cell, attack)]`` as ``metric`` over seeds 0, 1, ..."""
    rows = []
    for (cell, attack), vals in values.items():
        for seed, v in enumerate(vals):
            row: dict[str, Any] = dict.fromkeys(sr.results_columns([]), math.nan)
            row.update(
                cell_id=f"c{cell:03d}_s{seed}",
                cell=cell,
                seed=seed,
                attack=attack,
                status="done",
                error="",
                server_role="h",
                secure_aggregation="off",
                aggregate_size=4.0,
                **{metric: v},
            )
            rows.append(row)
    return pd.DataFrame(rows, columns=sr.results_columns([]))


def _exact_quantiles(values: list[float]) -> tuple[float, float]:
    """The 2.5 % and 97.5 % quantiles of the EXACT bootstrap distribution of the mean: all n^n
    equally likely resamples. As the number of resamples grows, the percentile (linear
    interpolation, as scipy's percentile method takes it) of a sample from this discrete
    distribution converges to its inverse CDF at 2.5 % and 97.5 %, wherever that level falls
    strictly inside an atom; returned here (and the margin is checked by the caller)."""
    means = sorted(float(np.mean(r)) for r in itertools.product(values, repeat=len(values)))
    k = len(means)
    low = means[math.ceil(0.025 * k) - 1]  # smallest m with P(mean <= m) >= 2.5 %
    high = means[k - math.ceil(0.025 * k)]  # largest m with P(mean >= m) >= 2.5 %
    return low, high


def _cdf_margin(values: list[float], level: float) -> float:
    """Distance of ``level`` from the nearest step of the exact distribution's CDF."""
    means = np.array([np.mean(r) for r in itertools.product(values, repeat=len(values))])
    steps = np.array([np.mean(means <= m) for m in np.unique(means)])
    return float(np.min(np.abs(steps - level)))


@pytest.mark.parametrize("values", [[10.0, 12.0, 17.0], [10.0, 12.0, 17.0, 30.0]])
def test_bootstrap_ci_is_the_exact_bootstrap_quantile(values: list[float]) -> None:
    """The Monte-Carlo percentile lands on the exact quantile's atom. Tolerance: with 9999
    resamples the share of bootstrap means at or below an atom estimates its exact CDF value
    with standard error sigma = sqrt(0.025 * 0.975 / 9999) ~ 0.0016 near the 2.5 % and 97.5 %
    levels. Where each level is more than 3 sigma from every step of the exact CDF (checked
    first; for four distinct values the nearest step, 5/256, is 3.5 sigma away) a generator
    lands on a neighbouring atom with probability < 0.3 %, and on the right atom both
    estimates are that atom's value: they agree to float rounding (the seed is fixed, so the
    outcome is too)."""
    sigma = math.sqrt(0.025 * 0.975 / sr.N_RESAMPLES)
    for level in (0.025, 0.975):
        assert _cdf_margin(values, level) > 3 * sigma
    summary = sr.summarize(_frame({(0, "a"): values}))
    row = summary[summary.metric == "psnr"].iloc[0]
    assert row["mean"] == sum(values) / len(values)  # exact
    assert (row.ci_low, row.ci_high) == pytest.approx(_exact_quantiles(values), abs=1e-9)
    assert row.n == len(values) and row["std"] == pytest.approx(np.std(values, ddof=1))
    if len(values) == 3:  # n = 3: P(all three resampled values the smallest) = 1/27 > 2.5 %
        assert (row.ci_low, row.ci_high) == (10.0, 17.0)


def test_degenerate_ci() -> None:
    summary = sr.summarize(
        _frame({(0, "a"): [7.5], (1, "a"): [3.0, 3.0, 3.0], (2, "a"): [1.0, math.nan, 2.0]})
    )
    one, same, two = (summary[summary.cell == c].iloc[0] for c in (0, 1, 2))
    assert (one["mean"], one.ci_low, one.ci_high, one.n) == (7.5, 7.5, 7.5, 1) and math.isnan(
        one["std"]
    )
    assert (same["mean"], same.ci_low, same.ci_high, same.n, same["std"]) == (3.0, 3.0, 3.0, 3, 0.0)
    assert two.n == 2 and two.ci_low >= 1.0 and two.ci_high <= 2.0


def test_ci_does_not_depend_on_the_other_groups() -> None:
    both = sr.summarize(_frame({(0, "a"): [1.0, 5.0, 2.0], (1, "a"): [4.0, 8.0, 9.5]}))
    alone = sr.summarize(_frame({(1, "a"): [4.0, 8.0, 9.5]}))
    pd.testing.assert_frame_equal(both[both.cell == 1].reset_index(drop=True), alone)


def test_summary_of_the_sweep(results: pd.DataFrame) -> None:
    summary = sr.summarize(results)
    assert list(summary.columns) == ["cell", "attack", *GRID, "aggregate_size", *sr.SUMMARY_STATS]
    keys = list(zip(summary.cell, summary.attack, summary.metric, strict=True))
    assert len(set(keys)) == len(keys)
    assert "" not in set(summary.attack)  # the failed cell's row is left out
    psnr = summary[
        (summary.cell == 0) & (summary.attack == "analytic") & (summary.metric == "psnr")
    ].iloc[0]
    assert psnr["mean"] == pytest.approx(13.0) and psnr.n == 3
    assert (psnr.ci_low, psnr.ci_high) == (10.0, 17.0)
    assert psnr.aggregate_size == 3.5 and psnr["client.batch_size"] == 4
    cen = summary[
        (summary.cell == 0) & (summary.attack == "analytic") & (summary.metric == "central_epsilon")
    ]
    assert (cen.iloc[0].n, cen.iloc[0].ci_low, cen.iloc[0].ci_high) == (1, 2.5, 2.5)
    f = summary[
        (summary.cell == 1) & (summary.attack == "analytic") & (summary.metric == "psnr")
    ].iloc[0]
    assert f.n == 2 and f.aggregate_size == pytest.approx((9 + 12) / 2)
    assert not summary.metric.isin(["epsilon", "avd"]).any()  # no value anywhere: no row
    order = [
        sr.METRICS.index(m)
        for m in summary[(summary.cell == 0) & (summary.attack == "analytic")].metric
    ]
    assert order == sorted(order)


# --------------------------------------------------------------------------- files


def test_write_tables_round_trip(sweep: Path, tmp_path: Path) -> None:
    results, summary = sr.write_tables(sweep)
    for stem, frame in (("results", results), ("summary", summary)):
        pd.testing.assert_frame_equal(sr.read_csv_table(sweep / f"{stem}.csv"), frame)
        pd.testing.assert_frame_equal(pd.read_parquet(sweep / f"{stem}.parquet"), frame)
    assert not list(sweep.glob(".*.tmp"))
    first = (sweep / "results.csv").read_bytes()
    sr.write_tables(sweep)
    assert (sweep / "results.csv").read_bytes() == first


def test_empty_sweep(tmp_path: Path) -> None:
    (tmp_path / "sweep.json").write_text(
        json.dumps({"version": 1, "grid_keys": ["client.lr"], "cells": []})
    )
    results, summary = sr.write_tables(tmp_path)
    assert results.empty and list(results.columns) == sr.results_columns(["client.lr"])
    assert summary.empty


def test_not_a_sweep_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a sweep folder"):
        sr.tidy_results(tmp_path)


# --------------------------------------------------------------------------- figures


def test_plot_sweep_one_png_per_metric_with_data(results: pd.DataFrame, tmp_path: Path) -> None:
    summary = sr.summarize(results)
    written = plot_sweep(summary, tmp_path / "plots")
    with_data = {m for m in PLOTTED if m in set(summary.metric)}
    assert {p.stem for p in written} == with_data
    assert with_data == {
        "psnr",
        "ssim",
        "asr",
        "label_accuracy",
        "auc",
        "model_accuracy",
        "central_epsilon",
        "leakage_rate",
    }
    assert all(p.suffix == ".png" and p.stat().st_size > 0 for p in written)
    assert not (tmp_path / "plots" / "epsilon.png").exists()
    assert plot_sweep(summary.iloc[0:0], tmp_path / "none") == []
