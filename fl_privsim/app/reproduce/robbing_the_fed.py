"""The malicious server on real CIFAR-10: imprint (Fowl et al., ICLR 2022), trap weights
(Boenisch et al., EuroS&P 2023) and fishing (Wen et al., ICML 2022), and whether a client's
``model_inspection`` notices them.

Imprint: ``asr`` at 30 dB (share of the observed records whose one-to-one matched
reconstruction has MSE ≤ 0.001) against the batch size of one client and against the number of
bins, for FedSGD and FedAvg (4 local steps), and on the aggregate of 10 clients; beside it the
expected share of records alone in their bin, ``(1 − 1/k)^(n−1)`` for n records and k
equal-mass bins (a record is recovered exactly when no other record falls in its bin; breaching's
``imprint_guarantee`` gives a lower expectation, 24/44/64/79/89 % for n = 64 at k =
64/128/256/512/1024, methods.md §7) and the share that was really alone (from the truth, for
the scorer only). Trap weights: ``asr`` against the batch size on the ``mlp``. Fishing: the
PSNR of the target record under class fishing against Inverting Gradients on the unmodified
aggregate. Inspection: detection rate per modification and false-alarm rate on honest models
across rounds of real training (:mod:`fl_privsim.app.inspection_rates`).

Data: the exact CIFAR-10 subset in ``../shared/data/cifar10``: the clients' records come from its
train part (932 images), the server's own data (for the bins' quantiles) from its test part.
The paper's own figures are not in this project's reference material (methods.md §7 gives the
formula and breaching's numbers), so the table compares with the derived expectation.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from adversaries.malicious.imprint import expected_alone_share
from fl_privsim.app.reproduce._malicious_cells import Cell, run_cell
from fl_privsim.app.reproduce._malicious_fishing import fishing_comparison, inspection_table
from fl_privsim.app.reproduce.base import (
    ReproContext,
    Reproduction,
    ReproResult,
    register,
)
from fl_privsim.core.data import load_dataset
from fl_privsim.core.results import markdown_table

DEFAULTS: dict[str, Any] = {
    "seeds": 3,
    "model": "convnet",
    "threshold": 0.001,
    "bins": 256,
    "batch_sizes": [64, 128, 256, 512],
    "bin_counts": [64, 128, 256, 512, 1024],
    "fedavg_steps": 4,
    "fedavg_batch_sizes": [16, 32, 64, 128],
    "aggregate_clients": 10,
    "aggregate_bins": 512,
    "aggregate_batch_sizes": [8, 16, 32, 64],
    "trap_batch_sizes": [16, 32, 64, 128],
    "fishing": True,
    "inspection": True,
}

QUICK: dict[str, Any] = {
    "seeds": 1,
    "batch_sizes": [64],
    "bin_counts": [256],
    "fedavg_batch_sizes": [16],
    "aggregate_batch_sizes": [8],
    "trap_batch_sizes": [64],
    "fishing": False,
    "inspection": False,
}


def _cells(s: dict[str, Any]) -> list[tuple[str, Cell]]:
    m, k = s["model"], s["bins"]
    out = [
        ("imprint vs batch", Cell("imprint", {"bins": k}, "imprint", m, "fedsgd", 1, b))
        for b in s["batch_sizes"]
    ]
    out += [
        ("imprint vs bins", Cell("imprint", {"bins": kk}, "imprint", m, "fedsgd", 1, 64))
        for kk in s["bin_counts"]
    ]
    out += [
        (
            "imprint fedavg",
            Cell("imprint", {"bins": k}, "imprint", m, "fedavg", 1, b, s["fedavg_steps"]),
        )
        for b in s["fedavg_batch_sizes"]
    ]
    out += [
        (
            "imprint aggregate",
            Cell(
                "imprint",
                {"bins": s["aggregate_bins"]},
                "imprint",
                m,
                "fedsgd",
                s["aggregate_clients"],
                b,
            ),
        )
        for b in s["aggregate_batch_sizes"]
    ]
    out += [
        ("trap weights", Cell("trap_weights", {}, "trap_weights", "mlp", "fedsgd", 1, b))
        for b in s["trap_batch_sizes"]
    ]
    return out


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (
            r["group"],
            r["modification"],
            r["model"],
            r["protocol"],
            r["clients"],
            r["batch"],
            r["steps"],
            json.dumps(r["params"], sort_keys=True),
        )
        groups.setdefault(key, []).append(r)
    out = []
    for (group, mod, model, protocol, clients, batch, steps, params), rs in groups.items():
        bins = json.loads(params).get("bins")
        n = rs[0]["records"]
        entry = {
            "group": group,
            "modification": mod,
            "model": model,
            "protocol": protocol,
            "clients": clients,
            "batch": batch,
            "steps": steps,
            "records": n,
            "bins": bins,
            "seeds": len(rs),
        }
        for key in ("asr", "leakage_rate", "alone_share", "seconds", "reconstructions"):
            vals = [
                r[key] for r in rs if key in r and r[key] is not None and not math.isnan(r[key])
            ]
            if vals:
                entry[key] = float(np.mean(vals))
                entry[f"{key}_std"] = float(np.std(vals))
        if bins:
            entry["expected_alone"] = expected_alone_share(n, int(bins))
        out.append(entry)
    return out


def _plot(summary: list[dict[str, Any]], ctx: ReproContext) -> None:
    asr_figure(summary).savefig(ctx.path / "imprint_asr.png", dpi=110, bbox_inches="tight")


def asr_figure(summary: list[dict[str, Any]]) -> Any:
    """Imprint ASR against batch size and bin count, with the expected and true share of
    records alone in a bin (``imprint_asr.png``; a matplotlib ``Figure`` on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fl_privsim.core.plots import shared_legend_outside

    fig = Figure(figsize=(12.5, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for group, ax, xkey in (
        ("imprint vs batch", axes[0], "records"),
        ("imprint vs bins", axes[1], "bins"),
    ):
        rows = sorted((r for r in summary if r["group"] == group), key=lambda r: r[xkey])
        if not rows:
            continue
        xs = [r[xkey] for r in rows]
        ax.errorbar(
            xs,
            [r["asr"] for r in rows],
            yerr=[r.get("asr_std", 0) for r in rows],
            marker="o",
            color="C0",
            label="asr at 30 dB (measured)",
        )
        ax.plot(
            xs,
            [r.get("expected_alone", np.nan) for r in rows],
            "k--",
            label="expected alone (1-1/k)^(n-1)",
        )
        ax.plot(
            xs,
            [r.get("alone_share", np.nan) for r in rows],
            "g:",
            marker="x",
            label="really alone (truth)",
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("records in the update" if xkey == "records" else "bins")
        ax.set_ylabel("share of records")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{group} (FedSGD, one client)")
    shared_legend_outside(
        list(axes), fontsize=7
    )  # the same three series in both panels: one key, on the right
    fig.tight_layout()
    return fig


def run(settings: dict[str, Any], ctx: ReproContext) -> ReproResult:
    """Every cell × seed (see the module docstring); the inspection rates when asked."""
    data = load_dataset("cifar10_npz", root=ctx.data("cifar10"))
    public = (
        data.normalize(data.images("test", np.arange(len(data.test_y)))),
        data.labels("test", np.arange(len(data.test_y))),
    )
    rows: list[dict[str, Any]] = []
    for group, cell in _cells(settings):
        for seed in range(ctx.seed, ctx.seed + settings["seeds"]):
            row = run_cell(data, cell, seed, public, ctx.device, settings["threshold"])
            row["group"] = group
            rows.append(row)
            ctx.log.info(
                "%s %s batch %d bins %s seed %d: asr %.3f",
                group,
                cell.protocol,
                cell.batch,
                cell.params.get("bins"),
                seed,
                row["asr"],
            )
    summary = _summarise(rows)
    (ctx.path / "cells.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    _plot(summary, ctx)
    extra: dict[str, Any] = {}
    tables = [_table(summary)]
    if settings["fishing"]:
        extra["fishing"] = fishing_comparison(data, settings, ctx)
        tables.append(extra["fishing"]["table"])
    if settings["inspection"]:
        extra["inspection"] = inspection_table(settings, ctx)
        tables.append(extra["inspection"]["table"])
    return ReproResult(
        summary={
            "cells": summary,
            **{k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in extra.items()},
        },
        table="\n\n".join(tables),
    )


def _table(summary: list[dict[str, Any]]) -> str:
    header = [
        "setting",
        "protocol",
        "clients × batch × steps",
        "records",
        "bins",
        "expected alone",
        "really alone",
        "asr @30 dB",
        "leakage rate",
        "s / cell",
    ]
    rows = []
    for r in summary:
        asr = f"{r['asr']:.3f} ± {r.get('asr_std', 0):.3f}"
        rows.append(
            [
                r["group"],
                r["protocol"],
                f"{r['clients']} × {r['batch']} × {r['steps']}",
                r["records"],
                r["bins"] if r["bins"] else "-",
                r.get("expected_alone"),
                r.get("alone_share"),
                asr,
                r.get("leakage_rate"),
                r.get("seconds"),
            ]
        )
    return markdown_table(header, rows)


register(
    Reproduction(
        name="robbing_the_fed",
        title="malicious server on CIFAR-10: imprint asr vs batch size, bins, FedAvg and a 10-client aggregate "
        "(beside the expected share alone in its bin), trap weights, fishing, and model_inspection rates",
        defaults=DEFAULTS,
        quick=QUICK,
        run=run,
    )
)
