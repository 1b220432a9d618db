"""``fl-privsim measure``: run one leakage measure of :mod:`adversaries.measures` on real data.

``fl-privsim measure [CONFIG.toml] [--set KEY=VALUE ...] [--out DIR]`` with ``[measure] kind``
one of :data:`KINDS`:

- ``i2f``: the Inversion Influence Function (Zhang et al., NeurIPS 2023, arXiv:2309.13016),
  per sample: the lower bound ``‖Jδ‖/λ_max(JJᵀ)`` and the ε-regularised value
  ``‖(JJᵀ+εI)⁻¹Jδ‖`` for one draw of the defense perturbation δ (``mc_samples = 0``) or their
  Monte Carlo mean over ``mc_samples`` draws. Table: one row per sample; plot: histogram.
- ``vinfo``: layer-wise empirical V-information (Xu et al., ICLR 2020; Mo et al.,
  arXiv:2105.13929) of the per-sample layer gradients about a target: the label, its
  parity as a binary latent attribute (classifier families), or the input itself
  (``vinfo.target = "input"``, Mo et al.'s original information: Gaussian-likelihood
  decoders of the normalised input projected on its top ``vinfo.input_components``
  principal components; nats total and per component). Table: one row per layer; plot:
  bar plot.
- ``sensitivity``: Jacobian sensitivity ``‖∂g_l/∂x‖_F`` per layer by Hutchinson probes (Mo et al.).
- ``subspace``: principal-angle distance per layer between the per-sample gradient subspaces
  of two groups (two classes, or even vs odd labels) (Mo et al.).

The config has the sections of :class:`~fl_privsim.app.measure_config.MeasureConfig`; only the keys it changes are needed, and
every key is checked (unknown key or bad value: :class:`~fl_privsim.core.errors.ConfigError`, one
line naming what is allowed). The default config runs offline on scikit-learn's digits.
Run folder: ``config.toml``, ``env.json``, ``summary.json``, ``table.csv``, ``table.md`` and
``plot.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adversaries.measures import (
    group_subspace_distance,
    jacobian_sensitivity,
    layer_gaussian_v_information,
    layer_v_information,
    per_sample_layer_gradients,
    plot_layer_table,
    summarize_sensitivity,
)
from adversaries.measures.i2f import (
    InversionJacobian,
    i2f_expected,
    i2f_for_operator,
    max_eigenvalue,
    pruning_perturbation,
    sample_noise,
)
from fl_privsim.app.measure_config import (  # the schema and loader (re-exported)
    I2F_NOISES,
    describe,
    load_config,
)
from fl_privsim.core import plugins
from fl_privsim.core.config import add_set_option
from fl_privsim.core.data import load_dataset
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.errors import ConfigError, UserError
from fl_privsim.core.models import build_model
from fl_privsim.core.progress import configure_logging
from fl_privsim.core.results import RunFolder, make_run_dir, markdown_table
from fl_privsim.core.seeding import torch_generator

log = logging.getLogger(__name__)

#: The measures (``measure.kind``): the registry :data:`fl_privsim.core.plugins.MEASURES`, which
#: each ``_measure_<kind>`` function below joins; each runs ``(cfg, data, model, device, out)
#: -> (summary, rows)``.
MEASURES = KINDS = plugins.MEASURES
HELP = """\
A config is TOML with the sections below; it only needs the keys it changes. --set overrides any:
  fl-privsim measure --set measure.kind=\\"vinfo\\" --set vinfo.samples_per_class=20
  fl-privsim measure experiments/measure_i2f.toml --set i2f.noise=\\"laplace\\"

Keys (default):
{keys}
i2f.scale: gaussian/laplace: the noise VARIANCE (the paper's convention; Laplace b = sqrt(var/2));
pruning: the fraction of smallest-magnitude gradient entries zeroed.
"""


# ----------------------------------------------------------------------------- shared helpers


def gaussian_sigma(variance: float) -> float:
    """σ of N(0, σ²) from the variance (the paper's σ² ∈ {1e-5, …, 1e-2})."""
    return math.sqrt(variance)


def laplace_b(variance: float) -> float:
    """Laplace scale ``b`` with variance ``2b²`` equal to ``variance``."""
    return math.sqrt(variance / 2.0)


def make_perturbation(op: Any, noise: str, scale: float, generator: Any) -> Any:
    """The flat parameter-space δ of one defense draw at ``op``
    (:class:`~adversaries.measures.i2f.InversionJacobian`): Gaussian/Laplace noise of variance
    ``scale`` (i.i.d. per entry) or global magnitude pruning of ratio ``scale`` (δ = −g₀ on the
    pruned entries, :func:`~adversaries.measures.i2f.pruning_perturbation`)."""

    if noise == "gaussian":
        return sample_noise(
            "gaussian", gaussian_sigma(scale), op.d_theta, generator=generator, dtype=op.dtype
        )
    if noise == "laplace":
        return sample_noise(
            "laplace", laplace_b(scale), op.d_theta, generator=generator, dtype=op.dtype
        )
    if noise == "pruning":
        return pruning_perturbation(op, scale)
    raise ConfigError(f"unknown noise {noise!r}; allowed: {', '.join(I2F_NOISES)}")


def _load(cfg: dict[str, dict[str, Any]]) -> tuple[Any, Any, Any]:
    """(dataset, model in eval mode on the device, device)."""
    import torch

    d, m = cfg["data"], cfg["model"]
    data = load_dataset(d["name"], root=d["root"] or None, seed=cfg["measure"]["seed"])
    device = resolve_device(cfg["measure"]["device"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["measure"]["seed"])
        model = build_model(
            m["name"],
            data.input_shape,
            data.num_classes,
            init=m["init"],
            generator=torch_generator(cfg["measure"]["seed"], "model_init"),
        )
    return data, model.to(device).eval(), device


def _labels(data: Any, split: str) -> Any:
    return data.labels(split, slice(None))


def _first(data: Any, split: str, first: int, count: int, key: str) -> list[int]:
    n = len(_labels(data, split))
    if first + count > n:
        raise ConfigError(
            f"{key}: {count} samples from index {first} need {first + count} {split} "
            f"examples; the {split} split has {n}"
        )
    return list(range(first, first + count))


def _per_class(
    data: Any, split: str, classes: Sequence[int], per_class: int, key: str
) -> list[int]:
    labels = _labels(data, split)
    out: list[int] = []
    for c in classes:
        idx = (labels == c).nonzero().flatten().tolist()
        if len(idx) < per_class:
            raise ConfigError(
                f"{key}: class {c} has {len(idx)} {split} examples, fewer than {per_class}"
            )
        out += idx[:per_class]
    return sorted(out)


def _batch(data: Any, split: str, idx: list[int], device: Any) -> tuple[Any, Any]:
    x = data.normalize(data.images(split, idx)).to(device)
    return x, data.labels(split, idx).to(device)


# ----------------------------------------------------------------------------- the measures


@plugins.MEASURES.register("i2f")
def _measure_i2f(
    cfg: dict[str, dict[str, Any]], data: Any, model: Any, device: Any, out: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:

    c, split, seed = cfg["i2f"], cfg["data"]["split"], cfg["measure"]["seed"]
    idx = _first(data, split, c["first_index"], c["samples"], "i2f.samples")
    x, y = _batch(data, split, idx, device)
    gen = torch_generator(seed, "defense")
    rows: list[dict[str, Any]] = []
    for i, index in enumerate(idx):
        xi, yi = x[i : i + 1], y[i : i + 1]
        if c["mc_samples"] > 0:
            scale = (
                gaussian_sigma(c["scale"]) if c["noise"] == "gaussian" else laplace_b(c["scale"])
            )
            (e,) = i2f_expected(
                model,
                xi,
                yi,
                noise=c["noise"],
                scale=scale,
                n_draws=c["mc_samples"],
                eps=c["eps"],
                cg_max_iter=c["cg_max_iter"],
                generator=gen,
            )
            row = {
                "index": index,
                "label": int(yi[0]),
                "lambda_max": e.lambda_max,
                "jdelta_norm": e.jdelta_norm_mean,
                "lower_bound": e.lower_bound_mean,
                "lower_bound_stderr": e.lower_bound_stderr,
                "exact": e.exact_mean,
                "exact_stderr": e.exact_stderr,
                "cg_converged": e.all_converged,
            }
        else:
            op = InversionJacobian(model, xi, yi)
            lam = max_eigenvalue(op, generator=gen)
            delta = make_perturbation(op, c["noise"], c["scale"], gen)
            r = i2f_for_operator(
                op, delta, lambda_max=lam, eps=c["eps"], cg_max_iter=c["cg_max_iter"]
            )
            row = {
                "index": index,
                "label": int(yi[0]),
                "lambda_max": r.lambda_max,
                "jdelta_norm": r.jdelta_norm,
                "delta_norm": float(delta.double().norm()),
                "lower_bound": r.lower_bound,
                "exact": r.exact,
                "lower_bound_eps": r.lower_bound_eps,
                "cg_iterations": r.cg_iterations,
                "cg_converged": r.cg_converged,
            }
        d_x = int(xi.numel())
        row["lower_bound_rmse"] = row["lower_bound"] / math.sqrt(d_x)
        row["exact_rmse"] = row["exact"] / math.sqrt(d_x) if row["exact"] is not None else None
        rows.append(row)
        log.info(
            "i2f sample %d/%d (index %d): lb %.4g, exact %.4g",
            i + 1,
            len(idx),
            index,
            row["lower_bound"],
            row["exact"] or math.nan,
        )
    _histogram(
        rows,
        out / "plot.png",
        title=f"I2F on {cfg['model']['name']} / {cfg['data']['name']}: {c['noise']} {c['scale']:g}",
        eps=c["eps"],
    )
    lbs = [r["lower_bound"] for r in rows]
    exs = [r["exact"] for r in rows if r["exact"] is not None]
    summary = {
        "samples": len(rows),
        "noise": c["noise"],
        "scale": c["scale"],
        "eps": c["eps"],
        "mc_samples": c["mc_samples"],
        "d_x": int(x[0].numel()),
        "lower_bound_mean": _mean(lbs),
        "lower_bound_min": min(lbs),
        "lower_bound_max": max(lbs),
        "exact_mean": _mean(exs),
        "lambda_max_mean": _mean([r["lambda_max"] for r in rows]),
        "all_cg_converged": all(bool(r["cg_converged"]) for r in rows),
    }
    return summary, rows


def _target(labels: Any, target: str) -> Any:
    return labels % 2 if target == "parity" else labels


@plugins.MEASURES.register("vinfo")
def _measure_vinfo(
    cfg: dict[str, dict[str, Any]], data: Any, model: Any, device: Any, out: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:

    c, split = cfg["vinfo"], cfg["data"]["split"]
    idx = _per_class(
        data, split, range(data.num_classes), c["samples_per_class"], "vinfo.samples_per_class"
    )
    x, y = _batch(data, split, idx, device)
    grads = {k: v.cpu() for k, v in per_sample_layer_gradients(model, x, y).items()}
    if c["target"] == "input":
        table = layer_gaussian_v_information(
            grads,
            x.detach().cpu(),
            generator=torch_generator(cfg["measure"]["seed"], "split"),
            max_features=c["max_features"],
            mlp_epochs=c["mlp_epochs"],
            target_components=c["input_components"],
            variance=c["input_variance"],
        )
        plot_layer_table(
            table,
            out / "plot.png",
            key="v_information",
            err_key="stderr",
            title=f"V-information about the input ({table[0]['target_dim']} PCs) per layer",
            ylabel="I_V (nats)",
        )
        best = max(table, key=lambda r: float(r["v_information"]))  # type: ignore[arg-type]
        summary = {
            "samples": len(idx),
            "target": "input",
            "input_components": table[0]["target_dim"],
            "input_variance": c["input_variance"],
            "explained_variance": table[0]["explained_variance"],
            "h_x": table[0]["h_x"],
            "layers": len(table),
            "most_informative_layer": best["layer"],
            "max_v_information": best["v_information"],
            "max_v_information_per_dim": best["v_information_per_dim"],
        }
        return summary, [dict(r) for r in table]
    target = _target(y.cpu(), c["target"])
    table = layer_v_information(
        grads,
        target,
        generator=torch_generator(cfg["measure"]["seed"], "split"),
        max_features=c["max_features"],
        mlp_epochs=c["mlp_epochs"],
    )
    plot_layer_table(
        table,
        out / "plot.png",
        key="v_information",
        err_key="stderr",
        title=f"V-information about the {c['target']} per layer",
        ylabel="I_V (nats)",
    )
    best = max(table, key=lambda r: float(r["v_information"]))  # type: ignore[arg-type]
    summary = {
        "samples": len(idx),
        "target": c["target"],
        "h_y": table[0]["h_y"],
        "layers": len(table),
        "most_informative_layer": best["layer"],
        "max_v_information": best["v_information"],
    }
    return summary, [dict(r) for r in table]


@plugins.MEASURES.register("sensitivity")
def _measure_sensitivity(
    cfg: dict[str, dict[str, Any]], data: Any, model: Any, device: Any, out: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:

    c, split = cfg["sensitivity"], cfg["data"]["split"]
    idx = _first(data, split, c["first_index"], c["samples"], "sensitivity.samples")
    x, y = _batch(data, split, idx, device)
    rows = jacobian_sensitivity(
        model,
        x,
        y,
        n_probes=c["probes"],
        generator=torch_generator(cfg["measure"]["seed"], "sampling"),
    )
    table = summarize_sensitivity(rows)
    plot_layer_table(
        table,
        out / "plot.png",
        key="sensitivity",
        err_key="sensitivity_stderr",
        title="Jacobian sensitivity per layer",
        ylabel="‖∂g_l/∂x‖_F",
    )
    best = max(table, key=lambda r: float(r["sensitivity"]))
    summary = {
        "samples": len(idx),
        "probes": c["probes"],
        "layers": len(table),
        "most_sensitive_layer": best["layer"],
        "max_sensitivity": best["sensitivity"],
    }
    return summary, table


@plugins.MEASURES.register("subspace")
def _measure_subspace(
    cfg: dict[str, dict[str, Any]], data: Any, model: Any, device: Any, out: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:

    c, split = cfg["subspace"], cfg["data"]["split"]
    classes = c["classes"] if c["target"] == "label" else range(data.num_classes)
    bad = [k for k in classes if not 0 <= k < data.num_classes]
    if bad:
        raise ConfigError(
            f"subspace.classes: {bad} are not labels of {cfg['data']['name']} "
            f"(0..{data.num_classes - 1})"
        )
    idx = _per_class(data, split, classes, c["samples_per_class"], "subspace.samples_per_class")
    x, y = _batch(data, split, idx, device)
    group = _target(y, c["target"])
    results = group_subspace_distance(model, x, y, group, k=c["k"])
    table = [
        {k: v for k, v in r.to_dict().items() if k != "angles"}
        | {"max_angle_deg": math.degrees(max(r.angles)) if r.angles else 0.0}
        for r in results
    ]
    plot_layer_table(
        table,
        out / "plot.png",
        key="normalized_distance",
        err_key=None,
        title=f"Gradient subspace distance per layer ({c['target']})",
        ylabel="distance / √k",
    )
    best = max(table, key=lambda r: float(r["normalized_distance"]))
    summary = {
        "samples": len(idx),
        "target": c["target"],
        "k": c["k"],
        "layers": len(table),
        "most_separating_layer": best["layer"],
        "max_normalized_distance": best["normalized_distance"],
    }
    return summary, table


# ----------------------------------------------------------------------------- outputs


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _i2f_series(
    rows: Sequence[Mapping[str, Any]], eps: float | None
) -> list[tuple[str, list[float]]]:
    """The per-sample I2F values, each named with the ε it uses: the ε-regularised value, the
    bound at the same ε (never above it) and the paper's bound at ε = 0."""
    e = "ε" if eps is None else f"ε={eps:g}"
    same = [
        r.get("lower_bound_eps")
        if r.get("lower_bound_eps") is not None
        else (
            r["jdelta_norm"] / (r["lambda_max"] + eps)
            if eps is not None and r["lambda_max"] + eps > 0
            else None
        )
        for r in rows
    ]
    return [
        (f"I2F exact ‖(JJᵀ+εI)⁻¹Jδ‖, {e}", [r["exact"] for r in rows]),
        (f"bound ‖Jδ‖/(λ_max+ε), {e}", same),
        ("bound ‖Jδ‖/λ_max, ε=0 (Eq. 5)", [r["lower_bound"] for r in rows]),
    ]


def _histogram(
    rows: Sequence[Mapping[str, Any]], path: Path, *, title: str, eps: float | None = None
) -> None:
    """Save :func:`histogram_figure` to ``path`` (legend included: ``bbox_inches="tight"``)."""
    histogram_figure(rows, title=title, eps=eps).savefig(path, dpi=100, bbox_inches="tight")


def histogram_figure(
    rows: Sequence[Mapping[str, Any]], *, title: str, eps: float | None = None
) -> Any:
    """Histogram of the per-sample I2F values (log x axis, few tick labels, legend right of
    the axes), each series named with its ε (:func:`_i2f_series`); a matplotlib Figure."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from fl_privsim.core.plots import legend_outside, set_log_xticks

    fig = Figure(figsize=(8.0, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series = [
        (label, [v for v in vals if v is not None and v > 0 and math.isfinite(v)])
        for label, vals in _i2f_series(rows, eps)
    ]
    pos = [v for _, vals in series for v in vals]
    if pos:
        lo, hi = 10 ** (math.log10(min(pos)) - 0.05), 10 ** (math.log10(max(pos)) + 0.05)
        bins = np.logspace(math.log10(lo), math.log10(hi), 25)
        styles = [
            {"alpha": 0.6},
            {"histtype": "step", "linewidth": 1.5},
            {"histtype": "step", "linewidth": 1.5, "linestyle": "--"},
        ]
        for (label, vals), style in zip(series, styles, strict=True):
            if vals:
                ax.hist(vals, bins=bins, label=label, **style)
        set_log_xticks(ax, lo, hi)
        legend_outside(ax)
    else:
        ax.text(
            0.5,
            0.5,
            "no positive I2F value to plot",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    ax.set_xlabel("I2F (input-space L2 norm)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    return fig


def _write_table(rows: Sequence[Mapping[str, Any]], out: Path) -> None:

    header = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in header})
    (out / "table.md").write_text(
        markdown_table(header, [[r.get(k) for k in header] for r in rows]) + "\n", encoding="utf-8"
    )


def run_measure(
    cfg: dict[str, dict[str, Any]], *, out: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run the measure of a validated config (:func:`load_config`) into a fresh run folder;
    returns the folder and the summary."""
    import tomli_w
    import torch

    kind = cfg["measure"]["kind"]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["measure"]["threads"])
    try:
        data, model, device = _load(cfg)  # data errors before the run folder exists
        path = make_run_dir(cfg["output"]["dir"], f"measure_{kind}", out)
        folder = RunFolder(path)
        folder.write_config(tomli_w.dumps(cfg))
        folder.write_env(seed=cfg["measure"]["seed"], device=str(device), extra={"measure": kind})
        start = time.perf_counter()
        try:
            summary, rows = MEASURES.get(kind)(cfg, data, model, device, path)
        except UserError:
            # e.g. too few samples in the split: leave no half-made folder behind
            if {f.name for f in path.iterdir()} <= {"config.toml", "env.json"}:
                shutil.rmtree(path, ignore_errors=True)
            raise
        summary = {
            "kind": kind,
            "data": cfg["data"]["name"],
            "split": cfg["data"]["split"],
            "model": cfg["model"]["name"],
            "init": cfg["model"]["init"],
            **summary,
            "seconds": time.perf_counter() - start,
        }
    finally:
        torch.set_num_threads(threads)
    _write_table(rows, path)
    folder.write_summary(summary)
    return path, summary


# ----------------------------------------------------------------------------- CLI


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``measure`` subcommand on the CLI's subparsers."""
    p = sub.add_parser(
        "measure",
        help="run one leakage measure (i2f, vinfo, sensitivity, subspace) on real data",
        description="Run one leakage measure; results (summary.json, table.csv/.md, plot.png) go to a "
        "run folder.",
        epilog=HELP.format(keys=describe()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="TOML config file (default: i2f on digits)")
    add_set_option(p, metavar="SECTION.KEY=VALUE")
    p.add_argument(
        "--out", help="run folder to create (default: <output.dir>/<UTC time>_measure_KIND)"
    )
    p.add_argument("--verbose", action="store_true", help="log progress")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the summary (summary.json plus run_dir) as JSON instead of the table",
    )
    return p


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """``table.csv`` back as rows: numbers as floats, ``True``/``False`` as bools, empty as None."""

    def value(text: str) -> Any:
        if text == "":
            return None
        if text in ("True", "False"):
            return text == "True"
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _num(v: Any, err: Any = None) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-" if v is None else str(v)
    text = f"{v:.4g}"
    return f"{text} ± {err:.2g}" if isinstance(err, (int, float)) and math.isfinite(err) else text


#: Columns of the per-layer tables: (header, key, stderr key).
LAYER_COLUMNS: dict[str, list[tuple[str, str, str | None]]] = {
    "vinfo": [
        ("I_V (nats)", "v_information", "stderr"),
        ("H (nats)", "h_y", None),
        ("decoder", "best_family", None),
    ],
    "vinfo_input": [
        ("I_V (nats)", "v_information", "stderr"),
        ("per PC", "v_information_per_dim", None),
        ("H_V(X)", "h_x", None),
    ],
    "sensitivity": [
        ("‖∂g_l/∂x‖_F", "sensitivity", "sensitivity_stderr"),
        ("per parameter", "normalized", "normalized_stderr"),
        ("params", "d_params", None),
    ],
    "subspace": [
        ("distance/√k", "normalized_distance", None),
        ("distance", "distance", None),
        ("max angle (deg)", "max_angle_deg", None),
    ],
}


def _grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, widths from the content."""
    widths = [max(len(str(r[i])) for r in (header, *body)) for i in range(len(header))]
    return [
        "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in (header, *body)
    ]


def format_measure(
    summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, max_rows: int = 20
) -> str:
    """A short human table of a measure's result (``fl-privsim measure`` prints it)."""
    kind = summary.get("kind")
    where = (
        f"{summary.get('model')} / {summary.get('data')} ({summary.get('split')} split, "
        f"{summary.get('samples')} samples)"
    )
    lines: list[str] = []
    shown = list(rows)[:max_rows]
    if kind == "i2f":
        eps, mc = summary.get("eps"), int(summary.get("mc_samples") or 0)
        draws = f"mean ± stderr over {mc} draws" if mc else "one draw per sample"
        lines.append(
            f"I2F on {where}, d_x = {summary.get('d_x')}: {summary.get('noise')} "
            f"{'ratio' if summary.get('noise') == 'pruning' else 'variance'} {summary.get('scale'):g}, {draws}"
        )
        (_, ex), (_, same), (_, lb) = _i2f_series(shown, eps)
        header = [
            "index",
            "label",
            "λ_max(JJᵀ)",
            "‖Jδ‖",
            f"I2F exact (ε={eps:g})",
            f"bound (ε={eps:g})",
            "bound (ε=0)",
            "CG",
        ]
        body = [
            [
                f"{int(r['index'])}",
                f"{int(r['label'])}",
                _num(r["lambda_max"]),
                _num(r["jdelta_norm"]),
                _num(e, r.get("exact_stderr")),
                _num(m),
                _num(b, r.get("lower_bound_stderr")),
                "ok" if r.get("cg_converged") else "not converged",
            ]
            for r, e, m, b in zip(shown, ex, same, lb, strict=True)
        ]
        all_same = [v for v in _i2f_series(rows, eps)[1][1] if v is not None]
        body.append(
            [
                "mean",
                "",
                _num(summary.get("lambda_max_mean")),
                "",
                _num(summary.get("exact_mean")),
                _num(_mean(all_same)),
                _num(summary.get("lower_bound_mean")),
                "",
            ]
        )
        lines += _grid(header, body)
        lines += textwrap.wrap(
            f"I2F exact = ‖(JJᵀ+εI)⁻¹Jδ‖ at ε = {eps:g}; bound (ε={eps:g}) = ‖Jδ‖/(λ_max+ε) never exceeds it. "
            "bound (ε=0) = ‖Jδ‖/λ_max (Eq. 5) bounds the unregularised I2F (ε = 0), not the "
            f"ε = {eps:g} value, so it can exceed the exact column when λ_max is small next to ε "
            f"(here mean λ_max = {_num(summary.get('lambda_max_mean'))}).",
            100,
        )
    else:
        key = "vinfo_input" if kind == "vinfo" and summary.get("target") == "input" else str(kind)
        columns = LAYER_COLUMNS.get(key, [])
        about = {
            "vinfo": f"V-information about the {summary.get('target')}",
            "sensitivity": "Jacobian sensitivity",
            "subspace": f"gradient subspace distance ({summary.get('target')}, k = {summary.get('k')})",
        }
        lines.append(f"{about.get(str(kind), kind)} per layer, {where}")
        body = [
            [
                str(r.get("layer") or "(root)"),
                *(_num(r.get(k), r.get(e) if e else None) for _, k, e in columns),
            ]
            for r in shown
        ]
        lines += _grid(["layer", *(h for h, _, _ in columns)], body)
        best = {
            "vinfo": ("most informative layer", "most_informative_layer", "max_v_information"),
            "sensitivity": ("most sensitive layer", "most_sensitive_layer", "max_sensitivity"),
            "subspace": (
                "most separating layer",
                "most_separating_layer",
                "max_normalized_distance",
            ),
        }
        if kind in best:
            text, layer, value = best[str(kind)]
            lines.append(f"{text}: {summary.get(layer)} ({_num(summary.get(value))})")
    if len(rows) > len(shown):
        lines.append(f"... {len(rows) - len(shown)} more rows in table.csv")
    return "\n".join(lines)


def cmd_measure(args: argparse.Namespace) -> int:
    """The ``measure`` subcommand: print a short table and the run folder (``--json``: the
    summary as JSON, with ``run_dir``)."""
    cfg = load_config(args.config, args.overrides)
    configure_logging(args.verbose)
    path, summary = run_measure(cfg, out=args.out)
    if getattr(args, "json", False):
        print(json.dumps({**summary, "run_dir": str(path)}, indent=2, default=str))
        return 0
    print(format_measure(summary, _read_rows(path / "table.csv")))
    print(f"run folder: {path}")
    return 0
