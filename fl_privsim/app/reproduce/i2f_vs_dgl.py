"""I²F vs the measured error of iDLG and Inverting Gradients on LeNet / MNIST (Zhang et al., NeurIPS 2023).

Zhang, Hong, Deng, Mahdavi, Zhou, "Understanding Deep Gradient Leakage via Inversion Influence
Functions" (arXiv:2309.13016), headline figure and ``demos/codes/bound_I2F.py`` of
``illidanlab/inversion-influence-function``: the RMSE of a gradient-matching (DGL, L2) attack
on a defended gradient ``g₀ + δ`` tracks the Inversion Influence Function, and
``I2F_lb = ‖Jδ‖/λ_max(JJᵀ)`` lower-bounds it.

Protocol (per MNIST test sample, batch 1, one sigmoid ``lenet`` shared by all samples):

1. The client computes its FedSGD gradient ``g₀`` with the project's client code
   (:func:`fl_privsim.engine.offline.client_observation`).
2. For each noise setting the defense perturbation δ is drawn (Gaussian of variance σ²,
   Laplace of the same variance, or global magnitude pruning: δ = −g₀ on the pruned entries);
   the server sees ``g₀ + δ`` (a hand-made :class:`~adversaries.base.Observation` with the
   noisy update).
3. Each attack of ``attacks`` reconstructs the input from ``g₀ + δ``: the registered
   ``idlg`` (label from the last layer, then L-BFGS L2 gradient matching; Zhao et al. 2020)
   and/or ``inverting_gradients`` (cosine matching + TV prior, signed Adam, ``ig_iterations``
   steps; Geiping et al., NeurIPS 2020), both from an N(0, 1) start that is the same for
   every noise setting of a sample. The error is measured in the model's (normalised)
   input space: ``RMSE = ‖x̂ − x₀‖/√d_x``.
4. For the same δ: ``I2F_lb`` and the ε-regularised ``‖(JJᵀ+εI)⁻¹Jδ‖``
   (:mod:`adversaries.measures.i2f`), both divided by ``√d_x`` to be in RMSE units.

Reported per noise setting and attack: Spearman's ρ across samples between the measured RMSE
and each I²F value (the paper's claim: they track each other; aim ρ ≥ 0.8), and the fraction of samples
where ``I2F_lb ≤ RMSE``; also pooled over all (sample, setting) pairs, which is what the
paper's figure shows (points of several noise levels on one plot). Summary keys without a
suffix are iDLG's, those ending in ``_ig`` Inverting Gradients'.

Differences to the paper: the L2 attack is iDLG with L-BFGS (``iterations`` steps, each up to
20 inner iterations) instead of DGL with Adam (lr 1e-4, 24 000 iterations); Inverting
Gradients runs ``ig_iterations`` steps (Geiping et al. use 4 800–24 000 on CIFAR/ImageNet);
labels are inferred, not given; far fewer samples by default (see ``experiments/reproduce/i2f_vs_dgl.toml``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adversaries import ATTACKS
from adversaries.base import Observation
from adversaries.measures.i2f import InversionJacobian, i2f_for_operator, max_eigenvalue
from fl_privsim.app.measure import I2F_NOISES, make_perturbation
from fl_privsim.app.reproduce.base import (
    ReproContext,
    Reproduction,
    ReproResult,
    register,
)
from fl_privsim.core.data import load_dataset
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import INITS, build_model
from fl_privsim.core.results import markdown_table
from fl_privsim.core.seeding import seed_int
from fl_privsim.engine.offline import client_observation

#: The paper's target (methods.md §4): I2F tracks the attack's RMSE; we aim for ρ ≥ 0.8.
TARGET_SPEARMAN = 0.8
#: Attacks the reproduction can run, and the suffix of their summary keys / record fields.
ATTACK_SUFFIX = {"idlg": "", "inverting_gradients": "_ig"}
ATTACK_LABEL = {"idlg": "iDLG (L2)", "inverting_gradients": "Inverting Gradients"}
NOISES = [
    "gaussian:1e-5",
    "gaussian:1e-4",
    "gaussian:1e-3",
    "gaussian:1e-2",
    "laplace:1e-3",
    "pruning:0.4",
]


def parse_noise(text: str) -> tuple[str, float]:
    """``"gaussian:1e-3"`` → ``("gaussian", 1e-3)`` (variance; pruning: ratio)."""
    kind, _, value = text.partition(":")
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if (
        kind not in I2F_NOISES
        or not math.isfinite(scale)
        or scale < 0
        or (kind == "pruning" and scale > 1)
    ):
        raise ConfigError(
            f"i2f_vs_dgl.noises: bad entry {text!r}; expected KIND:VALUE with KIND one of "
            f"{', '.join(I2F_NOISES)} and VALUE a variance >= 0 (pruning: a ratio in [0, 1])"
        )
    return kind, scale


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ (NaN inputs count as +inf: a diverged attack has the largest error);
    NaN when fewer than 3 pairs or a constant column."""
    import numpy as np
    from scipy.stats import spearmanr

    if len(a) < 3:
        return math.nan
    x = np.nan_to_num(np.asarray(a, dtype=float), nan=np.inf)
    y = np.nan_to_num(np.asarray(b, dtype=float), nan=np.inf)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


def _noisy(obs: Observation, delta: torch.Tensor) -> Observation:
    """``obs`` with the FedSGD update ``g₀ + δ`` (δ flat, ``param_names()`` order)."""
    update, offset = dict(obs.update), 0
    for name in obs.param_names():
        g = update[name]
        update[name] = g + delta[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    if offset != delta.numel():
        raise ValueError(f"delta has {delta.numel()} entries, the update {offset}")
    return dataclasses.replace(obs, update=update)


def _scatter(
    records: list[dict[str, Any]], settings: list[str], attacks: list[str], path: Path
) -> None:
    """One row of two log-log panels (I2F_lb, I2F_ε vs RMSE) per attack."""
    scatter_figure(records, settings, attacks).savefig(path, bbox_inches="tight")


def scatter_figure(records: list[dict[str, Any]], settings: list[str], attacks: list[str]) -> Any:
    """The figure :func:`_scatter` saves (a matplotlib ``Figure`` on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fl_privsim.core.plots import shared_legend_outside

    fig = Figure(figsize=(10.5, 3.8 * len(attacks)))
    FigureCanvasAgg(fig)
    for a, attack in enumerate(attacks):
        rkey = "rmse" + ATTACK_SUFFIX[attack]
        row = []
        for j, key in enumerate(("lb_rmse", "exact_rmse")):
            ax = fig.add_subplot(len(attacks), 2, 2 * a + j + 1)
            row.append(ax)
            for si, s in enumerate(
                settings
            ):  # one colour per setting in every panel: one key per row
                pts = [
                    (r[key], r[rkey])
                    for r in records
                    if r["setting"] == s and r[key] > 0 and math.isfinite(r[rkey]) and r[rkey] > 0
                ]
                if pts:
                    ax.scatter(
                        [p[0] for p in pts], [p[1] for p in pts], s=14, color=f"C{si % 10}", label=s
                    )
            lo_hi = [v for r in records for v in (r[key], r[rkey]) if v > 0 and math.isfinite(v)]
            if lo_hi:
                ax.plot(
                    [min(lo_hi), max(lo_hi)], [min(lo_hi), max(lo_hi)], "k--", lw=0.8, label="y = x"
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(
                "I2F lower bound (RMSE units)"
                if key == "lb_rmse"
                else "I2F regularised (RMSE units)"
            )
            ax.set_ylabel(f"{ATTACK_LABEL[attack]} RMSE (normalised input)", fontsize=8)
        shared_legend_outside(row, fontsize=7)  # the row's settings, right of its second panel
    fig.tight_layout()
    return fig


def _attack_error(
    attack: Any, obs: Observation, x: torch.Tensor, y: torch.Tensor, ctx: ReproContext, i: int
) -> dict[str, Any]:
    """RMSE (normalised input space), label correctness and cost of one attack run."""
    res = attack(obs, device=ctx.device, generator=ctx.generator(i, "attack"))
    err = (res.inputs.detach().to(x.device) - x).double()
    l2 = float(err.norm()) if torch.isfinite(err).all() else math.inf
    return {
        "rmse": l2 / math.sqrt(x[0].numel()),
        "label_correct": int(res.labels[0]) == int(y[0]),
        "attack_loss": float(res.metrics.get("final_loss", math.nan)),
        "attack_seconds": float(res.metrics.get("seconds", math.nan)),
    }


def _stats(sub: list[dict[str, Any]], sfx: str) -> dict[str, float]:
    rmse = [r["rmse" + sfx] for r in sub]
    return {
        "spearman_lb": spearman([r["lb_rmse"] for r in sub], rmse),
        "spearman_exact": spearman([r["exact_rmse"] for r in sub], rmse),
        "lower_bound_holds": sum(r["lb_rmse"] <= r["rmse" + sfx] for r in sub) / len(sub),
        "rmse_median": float(torch.tensor(rmse).median()),
        "lb_median": float(torch.tensor([r["lb_rmse"] for r in sub]).median()),
        "exact_median": float(torch.tensor([r["exact_rmse"] for r in sub]).median()),
        "label_accuracy": sum(r["label_correct" + sfx] for r in sub) / len(sub),
    }


def run(settings: dict[str, Any], ctx: ReproContext) -> ReproResult:
    """I²F and the attacks' RMSE per sample and noise setting (see the module docstring)."""
    noises = [(s, *parse_noise(s)) for s in settings["noises"]]
    count, first, iters = settings["samples"], settings["first_index"], settings["iterations"]
    ig_iters = settings["ig_iterations"]
    if count < 1 or first < 0 or iters < 1 or ig_iters < 1 or settings["eps"] < 0:
        raise ConfigError(
            "i2f_vs_dgl: samples, iterations and ig_iterations must be >= 1, first_index and "
            "eps >= 0"
        )
    attacks = list(dict.fromkeys(settings["attacks"]))
    bad = [a for a in attacks if a not in ATTACK_SUFFIX]
    if bad or not attacks:
        raise ConfigError(
            f"i2f_vs_dgl.attacks: unknown {bad or attacks!r}; allowed: a non-empty list of "
            f"{', '.join(ATTACK_SUFFIX)}"
        )
    if not (math.isfinite(settings["ig_tv_weight"]) and settings["ig_tv_weight"] >= 0):
        raise ConfigError(
            f"i2f_vs_dgl.ig_tv_weight: must be a number >= 0, got {settings['ig_tv_weight']}"
        )
    if settings["init"] not in INITS:
        raise ConfigError(
            f"i2f_vs_dgl.init: unknown {settings['init']!r}; allowed: {', '.join(INITS)}"
        )
    data = load_dataset("mnist_idx", root=ctx.data("mnist"), seed=ctx.seed)
    split = settings["split"]
    n_split = int(data.labels(split, slice(None)).numel())
    if first + count > n_split:
        raise ConfigError(
            f"i2f_vs_dgl: samples {first}..{first + count - 1} exceed the {n_split} {split} images"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(ctx.seed, "model_init"))
        model = build_model(
            "lenet",
            data.input_shape,
            data.num_classes,
            init=settings["init"],
            generator=ctx.generator("model_init"),
        ).to(ctx.device)
    runners = {
        # the paper's baseline: iDLG's own loop, without a line search
        "idlg": lambda: ATTACKS.create("idlg", iterations=iters, line_search="none"),
        "inverting_gradients": lambda: ATTACKS.create(
            "inverting_gradients", iterations=ig_iters, tv_weight=settings["ig_tv_weight"]
        ),
    }
    objs = {a: runners[a]() for a in attacks}
    d_x = math.prod(data.input_shape)
    start = time.perf_counter()
    seconds_by_attack = dict.fromkeys(attacks, 0.0)
    records: list[dict[str, Any]] = []
    for i, index in enumerate(range(first, first + count)):
        x = data.normalize(data.images(split, [index])).to(ctx.device)
        y = data.labels(split, [index]).to(ctx.device)
        obs = client_observation(
            model,
            [(x, y)],
            protocol="fedsgd",
            lr=0.1,
            mean=data.mean,
            std=data.std,
            num_classes=data.num_classes,
        )
        op = InversionJacobian(model, x, y)
        lam = max_eigenvalue(op, generator=ctx.generator(i, "defense"))
        for j, (name, kind, scale) in enumerate(noises):
            delta = make_perturbation(op, kind, scale, ctx.generator(i, j, "defense"))
            r = i2f_for_operator(op, delta, lambda_max=lam, eps=settings["eps"])
            rec: dict[str, Any] = {
                "index": index,
                "label": int(y[0]),
                "setting": name,
                "lambda_max": lam,
                "delta_norm": float(delta.double().norm()),
                "jdelta_norm": r.jdelta_norm,
                "lb": r.lower_bound,
                "exact": r.exact,
                "lb_rmse": r.lower_bound / math.sqrt(d_x),
                "exact_rmse": (r.exact or math.nan) / math.sqrt(d_x),
                "cg_converged": r.cg_converged,
            }
            noisy = _noisy(obs, delta)
            for a in attacks:
                t_a = time.perf_counter()
                rec.update(
                    {
                        k + ATTACK_SUFFIX[a]: v
                        for k, v in _attack_error(objs[a], noisy, x, y, ctx, i).items()
                    }
                )
                seconds_by_attack[a] += time.perf_counter() - t_a
            records.append(rec)
            ctx.log.info(
                "i2f_vs_dgl %d/%d %s: lb %.3g exact %.3g %s",
                i + 1,
                count,
                name,
                rec["lb_rmse"],
                rec["exact_rmse"],
                ", ".join(
                    f"rmse{ATTACK_SUFFIX[a]} {rec['rmse' + ATTACK_SUFFIX[a]]:.3g}" for a in attacks
                ),
            )
    seconds = time.perf_counter() - start
    (ctx.path / "samples.json").write_text(json.dumps(records, indent=1, default=str))
    names = [n for n, _, _ in noises]
    _scatter(records, names, attacks, ctx.path / "i2f_vs_rmse.png")

    summary: dict[str, Any] = {
        "samples": count,
        "iterations": iters,
        "ig_iterations": ig_iters,
        "ig_tv_weight": settings["ig_tv_weight"],
        "eps": settings["eps"],
        "init": settings["init"],
        "settings": names,
        "attacks": attacks,
    }
    table_rows: list[list[Any]] = []
    per_attack: dict[str, tuple[dict[str, dict[str, float]], dict[str, float]]] = {}
    for a in attacks:
        sfx = ATTACK_SUFFIX[a]
        per = {n: _stats([r for r in records if r["setting"] == n], sfx) for n in names}
        pooled = _stats(records, sfx)
        per_attack[a] = (per, pooled)
        summary.update(
            {
                f"spearman_lb{sfx}": {n: per[n]["spearman_lb"] for n in names},
                f"spearman_exact{sfx}": {n: per[n]["spearman_exact"] for n in names},
                f"lower_bound_holds{sfx}": {n: per[n]["lower_bound_holds"] for n in names},
                f"rmse_median{sfx}": {n: per[n]["rmse_median"] for n in names},
                f"spearman_lb_pooled{sfx}": pooled["spearman_lb"],
                f"spearman_exact_pooled{sfx}": pooled["spearman_exact"],
                f"lower_bound_holds_all{sfx}": pooled["lower_bound_holds"],
                f"seconds_attack{sfx}": seconds_by_attack[a],
            }
        )
    for n in [*names, None]:
        for a in attacks:
            per, pooled = per_attack[a]
            st = per[n] if n is not None else pooled
            aim = (
                f"ρ ≥ {TARGET_SPEARMAN:g}, bound holds"
                if n is not None
                else "tracks RMSE (headline figure)"
            )
            table_rows.append(
                [
                    n if n is not None else "pooled (all settings)",
                    ATTACK_LABEL[a],
                    st["spearman_lb"],
                    st["spearman_exact"],
                    st["lower_bound_holds"],
                    st["rmse_median"],
                    st["lb_median"],
                    st["exact_median"],
                    st["label_accuracy"],
                    aim,
                ]
            )
    summary.update(
        {"all_cg_converged": all(bool(r["cg_converged"]) for r in records), "seconds": seconds}
    )
    table = markdown_table(
        [
            "noise (variance; pruning ratio)",
            "attack",
            "Spearman ρ (RMSE, I2F_lb)",
            "Spearman ρ (RMSE, I2F_ε)",
            "fraction I2F_lb ≤ RMSE",
            "median RMSE",
            "median I2F_lb",
            "median I2F_ε",
            "label acc.",
            "paper (aim)",
        ],
        table_rows,
    )
    described = {
        "idlg": f"`idlg` (inferred label, L-BFGS L2 gradient matching, {iters} steps of up to 20 inner "
        "iterations)",
        "inverting_gradients": f"`inverting_gradients` (inferred label, cosine matching + TV "
        f"{settings['ig_tv_weight']:g}, signed Adam lr 0.1, {ig_iters} steps)",
    }
    notes = (
        f"LeNet (sigmoid `lenet`, init `{settings['init']}`, one model for all samples), MNIST {split} images "
        f"{first}..{first + count - 1} (../shared/data/mnist, t10k files), FedSGD batch 1. Attacks: "
        f"{'; '.join(described[a] for a in attacks)}; N(0,1) start, the same for every setting of a sample. "
        f"RMSE and I2F in the normalised input space "
        f"(I2F divided by √d_x = {math.sqrt(d_x):.0f}); ε = {settings['eps']:g} for I2F_ε (CG). Gaussian/Laplace "
        "values are variances (Laplace b = √(var/2)); pruning zeroes the given fraction of smallest-|g| entries. "
        f"Paper: DGL with Adam lr 1e-4, 24k iterations, 5-100 images; we use {count} samples. "
        f"Seed {ctx.seed}, {seconds:.0f} s ("
        + ", ".join(f"{a} {seconds_by_attack[a]:.0f} s" for a in attacks)
        + ")."
    )
    return ReproResult(summary=summary, table=table + "\n\n" + notes)


register(
    Reproduction(
        name="i2f_vs_dgl",
        title="I2F lower bound / regularised value vs iDLG and Inverting Gradients RMSE under noise, LeNet / MNIST "
        "(Zhang et al., NeurIPS 2023)",
        defaults={
            "samples": 16,
            "split": "test",
            "first_index": 0,
            "init": "uniform",
            "attacks": list(ATTACK_SUFFIX),
            "iterations": 50,
            "ig_iterations": 600,
            "ig_tv_weight": 1e-6,
            "eps": 1.0,
            "noises": list(NOISES),
        },
        quick={"samples": 3, "iterations": 2, "ig_iterations": 5, "noises": ["gaussian:1e-3"]},
        run=run,
    )
)
