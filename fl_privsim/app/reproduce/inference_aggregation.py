"""Inference attacks vs aggregation size and defenses (Li et al., "Analyzing Inference Privacy
Risks Through Gradients in Machine Learning", arXiv:2408.16913, CCS 2024; methods.md §1).

Seed 000's headline: the attack AUC of the attribute, property, distributional and user games
as the aggregate grows (batch size, then clients averaged into one aggregate), on UCI Adult
and UTKFace; and the five defenses (pruning, signSGD, adversarial perturbation, VIB, DP-SGD)
against a static adversary (shadow updates without the defense) and an adaptive one (shadow
updates through the same defense and parameters), at one aggregation size.

Each dataset gets one global model θ (an MLP, pretrained with plain SGD on the held-out split,
as ``fl-privsim game`` does); every point is one game of :mod:`adversaries.inference` (the
release is the real client update, vectorised when possible), scored with the ROC-AUC and a
seeded bootstrap 95% CI. The VIB row uses the same MLP with a VIB head, pretrained with the
VIB objective (CE + β·KL), since VIB is a model plus a training loss, not a gradient transform.

Outputs in the run folder: ``aggregation.{csv,json}``, ``defenses.{csv,json}``, ``table.md``,
``auc_vs_batch.png``, ``auc_vs_clients.png``, ``defenses.png``.

The paper's qualitative claims (the abstract; no numbers are quoted in methods.md): AUC stays
well above 0.5 as the aggregation grows, and defenses must be judged against adaptive
adversaries.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from adversaries.inference import Game, MetaClassifier, Pool, Release
from adversaries.inference.datasets import load_game_data
from adversaries.inference.metrics import game_metrics
from adversaries.inference.release import flat_per_sample_gradients
from clients.defenses import build_defenses
from clients.local_update import local_update
from fl_privsim.app.game import _build_model, _trajectory, load_game_config
from fl_privsim.app.reproduce.base import (
    ReproContext,
    Reproduction,
    ReproResult,
    register,
)
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.results import markdown_table
from fl_privsim.core.seeding import numpy_rng, torch_generator

log = logging.getLogger(__name__)

GAMES4 = ("attribute", "property", "distributional", "user")
DEFENSES5 = ("pruning", "signsgd", "adversarial_perturbation", "vib", "dp_sgd")


def _defense_specs(name: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    params = {
        "none": None,
        "pruning": {"ratio": s["pruning_ratio"]},
        "signsgd": {},
        "adversarial_perturbation": {"budget": s["adv_budget"], "steps": s["adv_steps"]},
        "vib": {"beta": s["vib_beta"]},
        "dp_sgd": {
            "noise_multiplier": s["dp_noise_multiplier"],
            "max_grad_norm": s["dp_max_grad_norm"],
        },
    }
    if name not in params:
        raise ConfigError(
            f"inference_aggregation.defenses: {name!r} is not allowed; allowed: {', '.join(params)}"
        )
    return [] if name == "none" else [{"name": name, "params": params[name]}]


class _Setup:
    """One dataset: pools, the global model θ (and its VIB twin, built lazily)."""

    def __init__(self, name: str, s: dict[str, Any], ctx: ReproContext) -> None:

        sens = s["adult_sensitive"] if name == "adult" else s["utkface_sensitive"]
        pool = s["adult_pool"] if name == "adult" else s["utkface_pool"]
        self.cfg = load_game_config(
            None,
            [
                f'data.name="{name}"',
                f'data.sensitive="{sens}"',
                f"model.width={s['width']}",
                f"model.pretrain_steps={s['pretrain_steps']}",
                f"seed={s['seed']}",
            ],
        )
        self.data = load_game_data(
            name,
            root=ctx.data(name),
            sensitive=sens,
            pool_size=pool,
            aux_size=pool,
            seed=s["seed"],
            image_size=s["image_size"],
        )
        d = self.data
        self.model = _trajectory(
            _build_model(self.cfg, d.input_shape, d.num_classes),
            d.x_pre,
            d.y_pre,
            [s["pretrain_steps"]],
            s["seed"],
        )[s["pretrain_steps"]]
        self.pool, self.aux = Pool(d.x_pool, d.y_pool, d.a_pool), Pool(d.x_aux, d.y_aux, d.a_aux)
        self.grads = {
            "pool": flat_per_sample_gradients(self.model, d.x_pool, d.y_pool),
            "aux": flat_per_sample_gradients(self.model, d.x_aux, d.y_aux),
        }
        with torch.no_grad():
            self.accuracy = float((self.model(d.x_pre).argmax(1) == d.y_pre).float().mean())
        self.s, self.name, self._vib = s, name, None

    def vib_model(self) -> nn.Module:
        """The MLP with a VIB head, pretrained with CE + β·KL (local_update with the vib defense)."""
        if self._vib is None:
            cfg = dataclasses.replace(
                self.cfg, model=dataclasses.replace(self.cfg.model, name="mlp_vib")
            )
            model, d = _build_model(cfg, self.data.input_shape, self.data.num_classes), self.data
            gen = torch_generator(self.s["seed"], "batch", 998)
            batches = [
                (d.x_pre[i], d.y_pre[i])
                for i in (
                    torch.randint(0, int(d.y_pre.shape[0]), (64,), generator=gen)
                    for _ in range(self.s["pretrain_steps"])
                )
            ]
            local_update(
                model,
                batches,
                protocol="fedavg",
                lr=0.1,
                defenses=build_defenses(_defense_specs("vib", self.s)),
                generator=gen,
            )
            for p in model.parameters():
                p.requires_grad_(True)
            self._vib = model
        return self._vib


def _play(
    setup: _Setup,
    kind: str,
    batch: int,
    clients: int,
    defense: str,
    trials: int,
    shadow_trials: int,
    key: int,
    adversaries: tuple[str, ...] = ("adaptive",),
) -> dict[str, dict[str, Any]]:
    """One game; returns the metrics of each adversary (static/adaptive share the challenge)."""

    s, d = setup.s, setup.data
    model = setup.vib_model() if defense == "vib" else setup.model
    reuse = model is setup.model
    game = Game(
        kind,
        batch_size=batch,
        clients_per_aggregate=clients,
        alpha0=s["alpha0"],
        alpha1=s["alpha1"],
        user_records=s["user_records"],
        attr_column=d.attr_column,
    )
    specs = _defense_specs(defense, s)
    release = Release(model, defenses=build_defenses(specs), seed=s["seed"])
    obs, secrets = game.play(
        setup.pool,
        release,
        trials,
        numpy_rng(s["seed"], "attack", 2, key),
        stream=0,
        pool_grads=setup.grads["pool"] if reuse else None,
    )
    out = {}
    for adv in adversaries:
        shadow = Release(
            model, defenses=build_defenses(specs) if adv == "adaptive" else [], seed=s["seed"] + 1
        )
        sobs, ssec = game.play(
            setup.aux,
            shadow,
            shadow_trials,
            numpy_rng(s["seed"], "attack", 1, key),
            stream=1,
            pool_grads=setup.grads["aux"] if reuse else None,
        )
        clf = MetaClassifier(
            model,
            attack_model=s["attack_model"],
            features=s["features"],
            attr_column=d.attr_column if kind == "attribute" else None,
            seed=s["seed"],
        )
        m = game_metrics(
            secrets, clf.fit(sobs, ssec).score(obs), n_boot=s["bootstrap"], seed=s["seed"]
        )
        out[adv] = {k: m[k] for k in ("auc", "auc_ci", "advantage", "tpr_at_1pct_fpr", "trials")}
    return out


def _write_csv(path: Any, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: (f"{v[0]:.4f};{v[1]:.4f}" if isinstance(v, list) else v) for k, v in r.items()}
            )


def _plot_sweep(
    path: Any, rows: list[dict[str, Any]], axis: str, datasets: list[str], games: list[str]
) -> None:
    sweep_figure(rows, axis, datasets, games).savefig(path, dpi=90, bbox_inches="tight")


def sweep_figure(
    rows: list[dict[str, Any]], axis: str, datasets: list[str], games: list[str]
) -> Any:
    """AUC against ``axis`` (batch size or clients), one panel per dataset, one line per game
    (a matplotlib ``Figure`` on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fl_privsim.core.plots import shared_legend_outside

    fig = Figure(figsize=(5 * len(datasets) + 1.2, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        for g, kind in enumerate(games):
            pts = sorted(
                (r[axis], r["auc"], r["auc_ci"])
                for r in rows
                if r["dataset"] == ds and r["game"] == kind and r["sweep"] == axis
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = np.array([p[1] for p in pts])
            err = np.abs(np.array([[p[2][0], p[2][1]] for p in pts]).T - ys)
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{g % 10}", label=kind)
        ax.axhline(0.5, color="k", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_ylim(0.3, 1.02)
        ax.set_xlabel("batch size" if axis == "batch_size" else "clients per aggregate")
        ax.set_ylabel("attack ROC-AUC (95% bootstrap CI)")
        ax.set_title(ds)
    shared_legend_outside(
        axes[0], fontsize=8
    )  # one colour per game in every panel: one key, on the right
    fig.tight_layout()
    return fig


def _plot_defenses(path: Any, rows: list[dict[str, Any]]) -> None:
    defenses_figure(rows).savefig(path, dpi=90, bbox_inches="tight")


def defenses_figure(rows: list[dict[str, Any]]) -> Any:
    """AUC per defense, static vs adaptive, one panel per (dataset, game) (a matplotlib
    ``Figure`` on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fl_privsim.core.plots import shared_legend_outside

    cases = sorted({(r["dataset"], r["game"]) for r in rows})
    fig = Figure(figsize=(3.6 * len(cases) + 1.0, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(cases), squeeze=False, sharey=True)
    for ax, (ds, kind) in zip(axes[0], cases, strict=True):
        sub = [r for r in rows if r["dataset"] == ds and r["game"] == kind]
        names = list(dict.fromkeys(r["defense"] for r in sub))
        for j, adv in enumerate(("static", "adaptive")):
            ys = [
                next((r["auc"] for r in sub if r["defense"] == n and r["adversary"] == adv), np.nan)
                for n in names
            ]
            ax.bar(np.arange(len(names)) + (j - 0.5) * 0.4, ys, 0.4, label=adv)
        ax.axhline(0.5, color="k", ls="--", lw=0.8)
        ax.set_xticks(
            np.arange(len(names)),
            [n.replace("adversarial_perturbation", "adv_pert") for n in names],
            rotation=60,
            fontsize=7,
        )
        ax.set_ylim(0.3, 1.0)
        ax.set_title(f"{kind} ({ds})", fontsize=9)
    axes[0][0].set_ylabel("attack ROC-AUC")
    shared_legend_outside(axes[0], fontsize=7)  # static / adaptive, the same colours in every panel
    fig.tight_layout()
    return fig


def _check(s: dict[str, Any]) -> None:
    for key, allowed in (
        ("datasets", ("adult", "utkface")),
        ("games", GAMES4),
        ("defense_games", GAMES4),
        ("defense_datasets", ("adult", "utkface")),
        ("defenses", ("none", *DEFENSES5)),
    ):
        bad = [v for v in s[key] if v not in allowed]
        if bad:
            raise ConfigError(
                f"inference_aggregation.{key}: {bad[0]!r} is not allowed; allowed: {', '.join(allowed)}"
            )
    for key in (
        "batch_sizes",
        "clients",
        "clients_batch_size",
        "defense_batch_size",
        "trials",
        "shadow_trials",
        "defense_trials",
        "defense_shadow_trials",
    ):
        vals = s[key] if isinstance(s[key], list) else [s[key]]
        if any(v < 1 for v in vals):
            raise ConfigError(
                f"inference_aggregation.{key}: every value must be >= 1, got {s[key]}"
            )


def run(s: dict[str, Any], ctx: ReproContext) -> ReproResult:
    """Both grids (see the module docstring)."""
    _check(s)
    t0 = time.perf_counter()
    setups: dict[str, _Setup] = {}

    def setup(name: str) -> _Setup:
        if name not in setups:
            setups[name] = _Setup(name, s, ctx)
            ctx.log.info(
                "%s: model accuracy %.3f on the pretraining split", name, setups[name].accuracy
            )
        return setups[name]

    agg: list[dict[str, Any]] = []
    key = 0
    progress = ctx.path / "points.jsonl"  # one line per finished point, to follow a long run

    def done(row: dict[str, Any]) -> None:
        with open(progress, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    for ds in s["datasets"]:
        for kind in s["games"]:
            points = [("batch_size", b, 1) for b in s["batch_sizes"]]
            points += [("clients", s["clients_batch_size"], k) for k in s["clients"]]
            seen: dict[tuple[int, int], dict[str, Any]] = {}
            for sweep, b, k in points:
                key += 1
                t = time.perf_counter()
                if (
                    b,
                    k,
                ) not in seen:  # a clients-sweep point equal to a batch-sweep point is reused
                    seen[b, k] = _play(
                        setup(ds), kind, b, k, "none", s["trials"], s["shadow_trials"], key
                    )["adaptive"]
                m = seen[b, k]
                agg.append(
                    {
                        "sweep": sweep,
                        "dataset": ds,
                        "game": kind,
                        "batch_size": b,
                        "clients": k,
                        "aggregation_size": b * k,
                        **m,
                        "seconds": round(time.perf_counter() - t, 2),
                    }
                )
                done(agg[-1])
                ctx.log.info("%s %s b=%d K=%d: AUC %.3f", ds, kind, b, k, m["auc"])
    t_agg = time.perf_counter()
    dfn: list[dict[str, Any]] = []
    for ds in s["defense_datasets"]:
        for kind in s["defense_games"]:
            for defense in s["defenses"]:
                key += 1
                t = time.perf_counter()
                advs = ("adaptive",) if defense == "none" else ("static", "adaptive")
                res = _play(
                    setup(ds),
                    kind,
                    s["defense_batch_size"],
                    1,
                    defense,
                    s["defense_trials"],
                    s["defense_shadow_trials"],
                    key,
                    advs,
                )
                for adv, m in res.items():
                    dfn.append(
                        {
                            "dataset": ds,
                            "game": kind,
                            "defense": defense,
                            "adversary": "-" if defense == "none" else adv,
                            **m,
                            "seconds": round(time.perf_counter() - t, 2),
                        }
                    )
                    done(dfn[-1])
                ctx.log.info(
                    "%s %s %s: %s",
                    ds,
                    kind,
                    defense,
                    {a: round(m["auc"], 3) for a, m in res.items()},
                )
    t_def = time.perf_counter()
    p = ctx.path
    for stem, rows in (("aggregation", agg), ("defenses", dfn)):
        if rows:
            (p / f"{stem}.json").write_text(json.dumps(rows, indent=1))
            _write_csv(p / f"{stem}.csv", rows)
    if agg:
        _plot_sweep(p / "auc_vs_batch.png", agg, "batch_size", s["datasets"], s["games"])
        _plot_sweep(p / "auc_vs_clients.png", agg, "clients", s["datasets"], s["games"])
    if dfn:
        _plot_defenses(
            p / "defenses.png",
            [r if r["defense"] != "none" else {**r, "adversary": "static"} for r in dfn]
            + [{**r, "adversary": "adaptive"} for r in dfn if r["defense"] == "none"],
        )

    def ci(r: dict[str, Any]) -> str:
        return f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]"

    lines = ["### AUC vs aggregation size (adaptive adversary, no defense)", ""]
    for sweep in ("batch_size", "clients"):
        sub = [r for r in agg if r["sweep"] == sweep]
        cols = sorted({r[sweep] for r in sub})
        rows = [
            [ds, kind]
            + [
                next(
                    (
                        ci(r)
                        for r in sub
                        if r["dataset"] == ds and r["game"] == kind and r[sweep] == c
                    ),
                    None,
                )
                for c in cols
            ]
            for ds in s["datasets"]
            for kind in s["games"]
        ]
        label = "batch" if sweep == "batch_size" else f"K (batch {s['clients_batch_size']})"
        if sub:
            lines += [
                markdown_table(["dataset", "game"] + [f"{label} {c}" for c in cols], rows),
                "",
            ]
    if dfn:
        lines += [
            f"### Defenses at batch {s['defense_batch_size']}, 1 client (AUC, static / adaptive)",
            "",
        ]
        rows = []
        for ds in s["defense_datasets"]:
            for kind in s["defense_games"]:
                for defense in s["defenses"]:
                    sub = {
                        r["adversary"]: r
                        for r in dfn
                        if (r["dataset"], r["game"], r["defense"]) == (ds, kind, defense)
                    }
                    rows.append(
                        [
                            ds,
                            kind,
                            defense,
                            ci(sub["static"]) if "static" in sub else None,
                            ci(sub.get("adaptive", sub.get("-"))),
                        ]
                    )
        lines += [
            markdown_table(["dataset", "game", "defense", "static AUC", "adaptive AUC"], rows),
            "",
        ]
    max_auc = {
        ds: max(
            (r["auc"] for r in agg if r["dataset"] == ds and r["aggregation_size"] >= 64),
            default=None,
        )
        for ds in s["datasets"]
    }
    summary = {
        "aggregation_points": len(agg),
        "defense_points": len(dfn),
        "model_accuracy": {k: v.accuracy for k, v in setups.items()},
        "max_auc_at_aggregation_64_plus": max_auc,
        "seconds": {
            "aggregation": t_agg - t0,
            "defenses": t_def - t_agg,
            "total": time.perf_counter() - t0,
        },
    }
    return ReproResult(summary=summary, table="\n".join(lines))


register(
    Reproduction(
        name="inference_aggregation",
        title="Inference-game AUC vs aggregation size and five defenses, static vs adaptive (Li et al. 2024)",
        defaults={
            "datasets": ["adult", "utkface"],
            "games": list(GAMES4),
            "batch_sizes": [1, 4, 16, 64, 256],
            "clients": [1, 5, 10, 50],
            "clients_batch_size": 4,
            "trials": 300,
            "shadow_trials": 500,
            "defense_datasets": ["adult", "utkface"],
            "defense_games": ["attribute"],
            "defenses": ["none", *DEFENSES5],
            "defense_batch_size": 4,
            "defense_trials": 150,
            "defense_shadow_trials": 200,
            "pruning_ratio": 0.9,
            "adv_budget": 0.5,
            "adv_steps": 5,
            "vib_beta": 0.01,
            "dp_noise_multiplier": 1.0,
            "dp_max_grad_norm": 1.0,
            "width": 32,
            "pretrain_steps": 200,
            "image_size": 24,
            "adult_pool": 4000,
            "utkface_pool": 600,
            "adult_sensitive": "sex",
            "utkface_sensitive": "gender",
            "alpha0": 0.25,
            "alpha1": 0.5,
            "user_records": 8,
            "features": "last",
            "attack_model": "mlp",
            "bootstrap": 200,
        },
        quick={
            "batch_sizes": [1, 16],
            "clients": [1, 5],
            "trials": 60,
            "shadow_trials": 80,
            "defense_trials": 40,
            "defense_shadow_trials": 60,
            "defense_games": ["attribute"],
            "adv_steps": 2,
            "pretrain_steps": 20,
            "bootstrap": 20,
            "adult_pool": 400,
            "utkface_pool": 200,
        },
        run=run,
    )
)
