"""Client defenses against gradient leakage: accuracy, ε, attack success (issue 4's evaluation).

Wei & Liu, "Gradient Leakage Attack Resilient Deep Learning" (IEEE TIFS 2022; methods.md §3)
claim that DP-SGD with *dynamic* noise (σ_t falling over the rounds: linear, staircase,
exponential, cyclic) keeps accuracy higher than fixed-σ DP-SGD at the same privacy guarantee
while the gradient-leakage attacks still fail. This reproduction measures, for every defense,
seed 002's four metrics on an MNIST subset and a CIFAR-10 subset (``datasets``), each over
``num_seeds`` seeds (``seed``, ``seed + 1``, ...; mean ± std in the tables):

1. **test accuracy** after a short offline FedAvg run (``clients`` clients, all taking part in
   each of ``rounds`` rounds, ``local_steps`` SGD steps of ``batch_size`` each), every client
   computing its update with :func:`clients.local_update.local_update` and its own defense
   stack (the code the Flower ClientApp runs), the server averaging the updates;
2. **ε at δ** (the defense's own accountant, worst client, after the last round);
3. **attack success rate** (MSE ≤ ``asr_mse`` after matching, the scorer's rule) and
4. **PSNR / SSIM** of ``idlg`` (batch 1) and ``analytic`` (batch ``analytic_batch``) against
   the defended FedSGD gradient of a client at round ``attack_round`` (the defense's own
   global model of that round).

CIFAR-10 (the bit-exact 932-train / 846-test subset in ``../shared/data/cifar10``, loaded by
``cifar10_npz``) uses the same settings except those given by the ``cifar10_*`` keys (fewer
clients and rounds: the subset is small and the machine slow).

**Equal ε.** The fixed-σ row (``dp_sgd``) and the four dynamic rows (``dynamic_dp``, all with
the same fixed clipping bound ``clip_norm`` and σ_t per round) are calibrated to the same final
ε = ``target_epsilon`` after ``rounds × local_steps`` steps at q = batch / client examples: σ of
``dp_sgd`` and a factor ``a`` on the paper's schedule (σ_t = a·s(t, T), T = rounds − 1, so the
shape 15 → 4.85 is kept) are found by bisection with the simulator's accountant
(:class:`clients.defenses.accounting.PrivacyAccountant`). The factor is applied by replacing the
built defense's ``schedule`` function (``dynamic_dp`` has no scale parameter). The ε in the
table is what the defenses' accountants report after the run, not the target.

**Mixing loss** (``mixing_loss = true``): Eloul et al.'s loss choice against identical labels,
the ``mixing_loss`` table of :mod:`fl_privsim.app.reproduce._defenses_mixing` (MNIST, first seed).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from clients.defenses.losses import LOSSES
from fl_privsim.app.reproduce._defenses_mixing import mixing_loss_table
from fl_privsim.app.reproduce._defenses_rows import (
    ROWS,
    SCHEDULES,
    attack_row,
    calibrate,
    prepare,
    train_row,
)
from fl_privsim.app.reproduce.base import (
    ReproContext,
    Reproduction,
    ReproResult,
    register,
)
from fl_privsim.core.data import load_dataset
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.results import markdown_table

log = logging.getLogger(__name__)

__all__ = ["ROWS", "SCHEDULES", "run"]

PAPER = {
    "none": "attacks succeed",
    "dp_fixed": "loses accuracy; still vulnerable (fixed σ)",
    **{f"dynamic_{s}": "higher accuracy than fixed σ at equal ε; attacks fail" for s in SCHEDULES},
    "pruning": "-",
    "signsgd": "-",
    "quantization": "-",
    "noise": "-",
    "identical_labels": "analytic de-mixing fails (Eloul et al.)",
}
#: Dataset name in ``datasets`` -> (loader, folder in the shared data).
DATASETS = {"mnist": ("mnist_idx", "mnist"), "cifar10": ("cifar10_npz", "cifar10")}
#: Settings a ``cifar10_<key>`` entry overrides for CIFAR-10.
PER_DATASET = (
    "rows",
    "model",
    "clients",
    "examples_per_client",
    "test_examples",
    "rounds",
    "local_steps",
    "batch_size",
    "attack_round",
)

DEFAULTS: dict[str, Any] = {
    "datasets": ["mnist", "cifar10"],
    "num_seeds": 3,
    "rows": list(ROWS),
    "model": "mlp",
    "clients": 5,
    "examples_per_client": 500,
    "test_examples": 2000,
    "rounds": 20,
    "local_steps": 5,
    "batch_size": 32,
    "lr": 0.1,
    "target_epsilon": 3.0,
    "delta": 1e-5,
    "clip_norm": 1.0,
    "pruning_ratio": 0.9,
    "quantization_bits": 8,
    "noise_scale": 0.01,
    "attack_round": 10,
    "attack_trials": 3,
    "idlg_iterations": 100,
    "analytic_batch": 4,
    "asr_mse": 0.01,
    "cifar10_rows": list(ROWS),
    "cifar10_model": "mlp",
    "cifar10_clients": 2,
    "cifar10_examples_per_client": 250,
    "cifar10_test_examples": 846,
    "cifar10_rounds": 8,
    "cifar10_local_steps": 3,
    "cifar10_batch_size": 32,
    "cifar10_attack_round": 4,
    "mixing_loss": True,
    "mixing_losses": ["cross_entropy", "mse"],
    "mixing_batch_sizes": [4, 8],
    "mixing_trials": 10,
    "mixing_model": "linear",
}
QUICK: dict[str, Any] = {
    "datasets": ["mnist"],
    "num_seeds": 1,
    "rows": ["none", "dp_fixed", "dynamic_linear", "identical_labels"],
    "clients": 2,
    "examples_per_client": 128,
    "test_examples": 256,
    "rounds": 3,
    "local_steps": 2,
    "batch_size": 16,
    "attack_round": 2,
    "attack_trials": 1,
    "idlg_iterations": 5,
    "mixing_batch_sizes": [4],
    "mixing_trials": 2,
}


def dataset_settings(settings: dict[str, Any], dataset: str) -> dict[str, Any]:
    """``settings`` with the ``<dataset>_<key>`` overrides applied (only cifar10 has them)."""
    s = dict(settings)
    if dataset == "cifar10":
        s.update({k: settings[f"cifar10_{k}"] for k in PER_DATASET})
    return s


def _check(s: dict[str, Any], where: str) -> None:
    bad = sorted(set(s["rows"]) - set(ROWS))
    if bad:
        raise ConfigError(f"defenses.{where}rows: unknown row(s) {bad}; allowed: {', '.join(ROWS)}")
    if not 1 <= s["attack_round"] <= s["rounds"]:
        raise ConfigError(f"defenses.{where}attack_round must lie in 1..{where}rounds")
    for key in (
        "clients",
        "examples_per_client",
        "rounds",
        "local_steps",
        "batch_size",
        "attack_trials",
        "analytic_batch",
        "test_examples",
    ):
        if s[key] < 1:
            raise ConfigError(f"defenses.{where if key in PER_DATASET else ''}{key} must be >= 1")


def _fmt(vals: list[float | None], fmt: str) -> str:
    arr = np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
    if not np.isfinite(arr).any():
        return "-"
    m, sd = float(np.nanmean(arr)), float(np.nanstd(arr))
    return f"{m:{fmt}}" if len(vals) == 1 else f"{m:{fmt}} ± {sd:{fmt}}"


def _dataset_table(
    dataset: str, s: dict[str, Any], seeds: list[int], ctx: ReproContext, summary: dict[str, Any]
) -> str:
    loader, folder = DATASETS[dataset]
    n_train = s["clients"] * s["examples_per_client"]
    calibration = calibrate(s)
    q, sigma_fixed, scales = calibration
    log.info(
        "defenses %s: q=%.4f, fixed σ=%.3f, schedule factors %s", dataset, q, sigma_fixed, scales
    )
    summary.update(
        {
            f"{dataset}_sample_rate": q,
            f"{dataset}_sigma_fixed": sigma_fixed,
            **{f"{dataset}_schedule_factor_{k}": v for k, v in scales.items()},
        }
    )
    cells: dict[str, list[dict[str, Any]]] = {row: [] for row in s["rows"]}
    setups = []
    for seed in seeds:
        kwargs = {"max_examples": n_train} if dataset == "mnist" else {}
        data = load_dataset(loader, root=ctx.data(folder), seed=seed, **kwargs)
        setup = prepare(s, data, seed, calibration)
        setups.append((seed, setup))
        for row in s["rows"]:
            t0 = time.perf_counter()
            cell, attack_model = train_row(row, s, setup, seed)
            cell.update(attack_row(row, s, setup, seed, attack_model, ctx.device))
            cell["seconds"] = time.perf_counter() - t0
            cells[row].append(cell)
            log.info(
                "defenses %s seed %d: %s done in %.1f s (acc %.3f, eps %s)",
                dataset,
                seed,
                row,
                cell["seconds"],
                cell["accuracy"],
                cell["epsilon"],
            )
    table_rows = []
    for row, runs in cells.items():
        for key in runs[0]:
            vals = [r[key] for r in runs]
            finite = [v for v in vals if v is not None and math.isfinite(v)]
            summary[f"{dataset}_{key}_{row}"] = float(np.mean(finite)) if finite else None
            summary[f"{dataset}_{key}_std_{row}"] = float(np.std(finite)) if finite else None
        eps = [r["epsilon"] for r in runs]
        table_rows.append(
            [
                row,
                _fmt([r["accuracy"] for r in runs], ".3f"),
                "∞ (no DP)" if all(e is None for e in eps) else _fmt(eps, ".2f"),
                _fmt([r["sigma_mean"] for r in runs], ".2f"),
                *(
                    _fmt([r[f"{a}_{m}"] for r in runs], f)
                    for a in ("idlg", "analytic")
                    for m, f in (("asr", ".2f"), ("psnr", ".1f"), ("ssim", ".3f"))
                ),
                PAPER[row],
            ]
        )
    header = [
        "defense",
        "test acc",
        f"ε (δ={s['delta']:g})",
        "mean σ_t",
        "iDLG ASR",
        "iDLG PSNR",
        "iDLG SSIM",
        f"analytic ASR (B={s['analytic_batch']})",
        "analytic PSNR",
        "analytic SSIM",
        "paper (qualitative)",
    ]
    n_test = int(setups[0][1].y_test.numel())
    horizon = max(1, s["rounds"] - 1)
    name = {"mnist": "MNIST", "cifar10": "CIFAR-10 (932/846 subset)"}[dataset]
    return (
        f"### {name}\n\n"
        + markdown_table(header, table_rows)
        + f"\n\n{name}, seeds {seeds} (mean ± std over seeds), {s['clients']} clients × "
        f"{s['examples_per_client']} train images (IID), FedAvg {s['rounds']} rounds × {s['local_steps']} local "
        f"steps, batch {s['batch_size']}, lr {s['lr']}, model `{s['model']}`; test accuracy on {n_test} test "
        f"images. DP rows: clipping C = {s['clip_norm']} (fixed), q = {q:.4f}, calibrated to ε = "
        f"{s['target_epsilon']} at the end: fixed σ = {sigma_fixed:.3f}; schedule factors "
        + ", ".join(f"{k.removeprefix('dynamic_')} ×{v:.3f}" for k, v in scales.items())
        + f" (σ_t = factor · the paper's 15 → 4.85 curve, T = {horizon}). Attacks: the defended FedSGD "
        f"gradient of client 0 at round {s['attack_round']}, {s['attack_trials']} trials each; iDLG batch 1 "
        f"({s['idlg_iterations']} iterations), analytic batch {s['analytic_batch']}; ASR = share of images "
        f"with matched MSE ≤ {s['asr_mse']} (PSNR ≥ {10 * math.log10(1 / s['asr_mse']):.0f} dB). signsgd uses "
        f"the l1 scale; noise is Gaussian σ = {s['noise_scale']} on the update (not DP)."
    )


def plot_accuracy(summary: dict[str, Any], datasets: list[str], path: Path) -> None:
    """Bar chart of test accuracy (mean ± std over seeds) of every row present in ``summary``
    for each dataset (fixed-σ DP red, dynamic schedules orange); written to ``path`` (png)."""
    accuracy_figure(summary, datasets).savefig(path, dpi=110, bbox_inches="tight")


def accuracy_figure(summary: dict[str, Any], datasets: list[str]) -> Any:
    """The figure :func:`plot_accuracy` saves (a matplotlib ``Figure`` on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(datasets), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        rows = [r for r in ROWS if summary.get(f"{d}_accuracy_{r}") is not None]
        means = [summary[f"{d}_accuracy_{r}"] for r in rows]
        stds = [summary.get(f"{d}_accuracy_std_{r}") or 0.0 for r in rows]
        colors = [
            "tab:red"
            if r in ("dp_fixed",)
            else "tab:orange"
            if r.startswith("dynamic_")
            else "tab:gray"
            for r in rows
        ]
        ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
        # vertical names: at 60° the boxes of neighbouring long names (dyn_exponential) overlap
        ax.set_xticks(
            range(len(rows)), [r.replace("dynamic_", "dyn_") for r in rows], rotation=90, fontsize=7
        )
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{d}: mean ± std over seeds (DP rows at equal ε)", fontsize=9)
    fig.tight_layout()
    return fig


def run(settings: dict[str, Any], ctx: ReproContext) -> ReproResult:
    """Train, account and attack every row of every dataset and seed (see the module docstring)."""
    datasets = list(settings["datasets"])
    bad = sorted(set(datasets) - set(DATASETS))
    if bad:
        raise ConfigError(
            f"defenses.datasets: unknown dataset(s) {bad}; allowed: {', '.join(DATASETS)}"
        )
    if settings["num_seeds"] < 1:
        raise ConfigError("defenses.num_seeds must be >= 1")
    per = {d: dataset_settings(settings, d) for d in datasets}
    for d, s in per.items():
        _check(s, "cifar10_" if d == "cifar10" else "")
    if settings["mixing_loss"]:
        if sorted(set(settings["mixing_losses"]) - set(LOSSES)):
            raise ConfigError(f"defenses.mixing_losses: allowed: {', '.join(LOSSES)}")
        if min(settings["mixing_batch_sizes"]) < 1 or settings["mixing_trials"] < 1:
            raise ConfigError("defenses.mixing_batch_sizes and mixing_trials must be >= 1")
    seeds = [ctx.seed + i for i in range(settings["num_seeds"])]
    summary: dict[str, Any] = {"seeds": seeds}
    start = time.perf_counter()
    parts = []
    for d in datasets:
        t0 = time.perf_counter()
        parts.append(_dataset_table(d, per[d], seeds, ctx, summary))
        summary[f"{d}_seconds"] = time.perf_counter() - t0
    if settings["mixing_loss"]:
        t0 = time.perf_counter()
        s = per.get("mnist", dataset_settings(settings, "mnist"))
        data = load_dataset(
            "mnist_idx",
            root=ctx.data("mnist"),
            seed=seeds[0],
            max_examples=s["clients"] * s["examples_per_client"],
        )
        setup = prepare(s, data, seeds[0], (0.0, 0.0, {}))  # rows none / identical_labels: no DP
        mix_summary, mix_table = mixing_loss_table(s, setup, seeds[0], ctx.device)
        summary.update(mix_summary)
        parts.append(
            "### mixing_loss (Eloul et al.: loss choice × identical labels)\n\n" + mix_table
        )
        summary["mixing_loss_seconds"] = time.perf_counter() - t0
    summary["seconds_total"] = time.perf_counter() - start
    plot_accuracy(summary, datasets, ctx.path / "accuracy.png")
    return ReproResult(summary=summary, table="\n\n".join(parts))


register(
    Reproduction(
        name="defenses",
        title="Wei & Liu / seed 002: defenses' accuracy, ε, and iDLG/analytic success (MNIST, CIFAR-10, seeds)",
        defaults=DEFAULTS,
        quick=QUICK,
        run=run,
    )
)
