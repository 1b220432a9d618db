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

The config has the sections of :data:`DEFAULTS`; only the keys it changes are needed, and
every key is checked (unknown key or bad value: :class:`~fl_privsim.errors.ConfigError`, one
line naming what is allowed). The default config runs offline on scikit-learn's digits.
Run folder: ``config.toml``, ``env.json``, ``summary.json``, ``table.csv``, ``table.md`` and
``plot.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_privsim.errors import ConfigError, UserError
from fl_privsim.progress import configure_logging

log = logging.getLogger(__name__)

KINDS = ("i2f", "vinfo", "sensitivity", "subspace")
#: Perturbations of the ``i2f`` measure (and of the ``i2f_vs_dgl`` reproduction).
I2F_NOISES = ("gaussian", "laplace", "pruning")
TARGETS = ("label", "parity")
#: Targets of the ``vinfo`` measure: the discrete ones, or the (continuous) input.
VINFO_TARGETS = (*TARGETS, "input")
#: ``vinfo.input_variance``: the Gaussian decoders' variance (one per dimension, or shared).
INPUT_VARIANCES = ("per_dim", "shared")
SPLITS = ("train", "test")
DEVICES = ("auto", "cpu", "cuda")

#: Every section and key of a measure config, with its default (the type of the default is
#: the type a value must have; ``root = ""`` means the loader's default).
DEFAULTS: dict[str, dict[str, Any]] = {
    "measure": {"kind": "i2f", "seed": 0, "threads": 1, "device": "cpu"},
    "data": {"name": "digits", "root": "", "split": "test"},
    "model": {"name": "lenet", "init": "uniform"},
    "i2f": {"samples": 16, "first_index": 0, "noise": "gaussian", "scale": 1e-3, "eps": 1.0,
            "mc_samples": 0, "cg_max_iter": 500},
    "vinfo": {"target": "label", "samples_per_class": 30, "max_features": 256, "mlp_epochs": 300,
              "input_components": 16, "input_variance": "per_dim"},
    "sensitivity": {"samples": 8, "first_index": 0, "probes": 16},
    "subspace": {"target": "label", "classes": [0, 1], "samples_per_class": 20, "k": 5},
    "output": {"dir": "runs"},
}

#: Allowed values of the string keys that take one of a few.
CHOICES: dict[str, tuple[str, ...]] = {
    "measure.kind": KINDS,
    "measure.device": DEVICES,
    "data.split": SPLITS,
    "i2f.noise": I2F_NOISES,
    "vinfo.target": VINFO_TARGETS,
    "vinfo.input_variance": INPUT_VARIANCES,
    "subspace.target": TARGETS,
}

#: Integer keys and their minimum.
MINIMUM: dict[str, int] = {
    "measure.threads": 1, "i2f.samples": 1, "i2f.first_index": 0, "i2f.mc_samples": 0,
    "i2f.cg_max_iter": 1, "vinfo.samples_per_class": 4, "vinfo.max_features": 1, "vinfo.mlp_epochs": 1,
    "vinfo.input_components": 1,
    "sensitivity.samples": 1, "sensitivity.first_index": 0, "sensitivity.probes": 2,
    "subspace.samples_per_class": 2, "subspace.k": 1,
}

HELP = """\
A config is TOML with the sections below; it only needs the keys it changes. --set overrides any:
  fl-privsim measure --set measure.kind=\\"vinfo\\" --set vinfo.samples_per_class=20
  fl-privsim measure experiments/measure_i2f.toml --set i2f.noise=\\"laplace\\"

Keys (default):
{keys}
i2f.scale: gaussian/laplace: the noise VARIANCE (the paper's convention; Laplace b = sqrt(var/2));
pruning: the fraction of smallest-magnitude gradient entries zeroed.
"""


def describe() -> str:
    """One line per key: ``section.key = default`` (and the allowed values)."""
    lines = []
    for section, keys in DEFAULTS.items():
        for key, default in keys.items():
            full = f"{section}.{key}"
            extra = f"  ({' | '.join(CHOICES[full])})" if full in CHOICES else ""
            lines.append(f"  {full} = {default!r}{extra}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- config


def _check_value(full: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        want = "true or false"
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        want = "a number"
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
        want = "a string"
    else:  # list of ints
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        want = "a list of integers"
    if not ok:
        raise ConfigError(f"{full}: expected {want}, got {value!r}")
    if full in CHOICES and value not in CHOICES[full]:
        raise ConfigError(f"{full}: unknown value {value!r}; allowed: {', '.join(CHOICES[full])}")
    if full in MINIMUM and value < MINIMUM[full]:
        raise ConfigError(f"{full}: must be >= {MINIMUM[full]}, got {value}")
    return value


def validate(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Defaults updated by ``data`` (a parsed config), every section, key and value checked."""
    cfg = copy.deepcopy(DEFAULTS)
    for section, table in data.items():
        if section not in DEFAULTS:
            raise ConfigError(f"unknown section [{section}]; allowed: {', '.join(DEFAULTS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{section}] must be a table of keys, got {table!r}")
        for key, value in table.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"unknown key {section}.{key}; allowed in [{section}]: "
                                  f"{', '.join(DEFAULTS[section])}")
            cfg[section][key] = _check_value(f"{section}.{key}", value, DEFAULTS[section][key])
    i2f = cfg["i2f"]
    if i2f["scale"] < 0 or (i2f["noise"] == "pruning" and i2f["scale"] > 1):
        raise ConfigError(f"i2f.scale: must be a variance >= 0 (gaussian, laplace) or a ratio in [0, 1] "
                          f"(pruning), got {i2f['scale']}")
    if i2f["eps"] < 0:
        raise ConfigError(f"i2f.eps: must be >= 0, got {i2f['eps']}")
    if i2f["noise"] == "pruning" and i2f["mc_samples"] > 0:
        raise ConfigError("i2f.mc_samples: pruning is deterministic; use mc_samples = 0 with noise = \"pruning\"")
    sub = cfg["subspace"]
    if sub["target"] == "label" and (len(sub["classes"]) != 2 or sub["classes"][0] == sub["classes"][1]):
        raise ConfigError(f"subspace.classes: expected two different class labels, got {sub['classes']}")
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The TOML file (if any), then the ``--set`` overrides, validated (:func:`validate`)."""
    from fl_privsim.config import apply_override, read_toml_file

    data: dict[str, Any] = read_toml_file(path) if path else {}
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if "=" in assignment and key.count(".") != 1:
            raise ConfigError(f"--set {key}: expected SECTION.KEY=VALUE; sections: {', '.join(DEFAULTS)}")
        apply_override(data, assignment)
    return validate(data)


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
    from adversaries.measures.i2f import pruning_perturbation, sample_noise

    if noise == "gaussian":
        return sample_noise("gaussian", gaussian_sigma(scale), op.d_theta, generator=generator, dtype=op.dtype)
    if noise == "laplace":
        return sample_noise("laplace", laplace_b(scale), op.d_theta, generator=generator, dtype=op.dtype)
    if noise == "pruning":
        return pruning_perturbation(op, scale)
    raise ConfigError(f"unknown noise {noise!r}; allowed: {', '.join(I2F_NOISES)}")


def _load(cfg: dict[str, dict[str, Any]]) -> tuple[Any, Any, Any]:
    """(dataset, model in eval mode on the device, device)."""
    import torch

    from fl_privsim.data import load_dataset
    from fl_privsim.devices import resolve_device
    from fl_privsim.models import build_model
    from fl_privsim.seeding import torch_generator

    d, m = cfg["data"], cfg["model"]
    data = load_dataset(d["name"], root=d["root"] or None, seed=cfg["measure"]["seed"])
    device = resolve_device(cfg["measure"]["device"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["measure"]["seed"])
        model = build_model(m["name"], data.input_shape, data.num_classes, init=m["init"],
                            generator=torch_generator(cfg["measure"]["seed"], "model_init"))
    return data, model.to(device).eval(), device


def _labels(data: Any, split: str) -> Any:
    return data.labels(split, slice(None))


def _first(data: Any, split: str, first: int, count: int, key: str) -> list[int]:
    n = len(_labels(data, split))
    if first + count > n:
        raise ConfigError(f"{key}: {count} samples from index {first} need {first + count} {split} "
                          f"examples; the {split} split has {n}")
    return list(range(first, first + count))


def _per_class(data: Any, split: str, classes: Sequence[int], per_class: int, key: str) -> list[int]:
    labels = _labels(data, split)
    out: list[int] = []
    for c in classes:
        idx = (labels == c).nonzero().flatten().tolist()
        if len(idx) < per_class:
            raise ConfigError(f"{key}: class {c} has {len(idx)} {split} examples, fewer than {per_class}")
        out += idx[:per_class]
    return sorted(out)


def _batch(data: Any, split: str, idx: list[int], device: Any) -> tuple[Any, Any]:
    x = data.normalize(data.images(split, idx)).to(device)
    return x, data.labels(split, idx).to(device)


# ----------------------------------------------------------------------------- the measures


def _measure_i2f(cfg: dict[str, dict[str, Any]], data: Any, model: Any, device: Any,
                 out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from adversaries.measures.i2f import (
        InversionJacobian,
        i2f_expected,
        i2f_for_operator,
        max_eigenvalue,
    )
    from fl_privsim.seeding import torch_generator

    c, split, seed = cfg["i2f"], cfg["data"]["split"], cfg["measure"]["seed"]
    idx = _first(data, split, c["first_index"], c["samples"], "i2f.samples")
    x, y = _batch(data, split, idx, device)
    gen = torch_generator(seed, "defense")
    rows: list[dict[str, Any]] = []
    for i, index in enumerate(idx):
        xi, yi = x[i : i + 1], y[i : i + 1]
        if c["mc_samples"] > 0:
            scale = gaussian_sigma(c["scale"]) if c["noise"] == "gaussian" else laplace_b(c["scale"])
            (e,) = i2f_expected(model, xi, yi, noise=c["noise"], scale=scale, n_draws=c["mc_samples"],
                                eps=c["eps"], cg_max_iter=c["cg_max_iter"], generator=gen)
            row = {"index": index, "label": int(yi[0]), "lambda_max": e.lambda_max,
                   "jdelta_norm": e.jdelta_norm_mean, "lower_bound": e.lower_bound_mean,
                   "lower_bound_stderr": e.lower_bound_stderr, "exact": e.exact_mean,
                   "exact_stderr": e.exact_stderr, "cg_converged": e.all_converged}
        else:
            op = InversionJacobian(model, xi, yi)
            lam = max_eigenvalue(op, generator=gen)
            delta = make_perturbation(op, c["noise"], c["scale"], gen)
            r = i2f_for_operator(op, delta, lambda_max=lam, eps=c["eps"], cg_max_iter=c["cg_max_iter"])
            row = {"index": index, "label": int(yi[0]), "lambda_max": r.lambda_max,
                   "jdelta_norm": r.jdelta_norm, "delta_norm": float(delta.double().norm()),
                   "lower_bound": r.lower_bound, "exact": r.exact, "lower_bound_eps": r.lower_bound_eps,
                   "cg_iterations": r.cg_iterations, "cg_converged": r.cg_converged}
        d_x = int(xi.numel())
        row["lower_bound_rmse"] = row["lower_bound"] / math.sqrt(d_x)
        row["exact_rmse"] = row["exact"] / math.sqrt(d_x) if row["exact"] is not None else None
        rows.append(row)
        log.info("i2f sample %d/%d (index %d): lb %.4g, exact %.4g", i + 1, len(idx), index,
                 row["lower_bound"], row["exact"] or math.nan)
    _histogram(rows, out / "plot.png", title=f"I2F on {cfg['model']['name']} / {cfg['data']['name']}: "
               f"{c['noise']} {c['scale']:g}")
    lbs = [r["lower_bound"] for r in rows]
    exs = [r["exact"] for r in rows if r["exact"] is not None]
    summary = {
        "samples": len(rows), "noise": c["noise"], "scale": c["scale"], "eps": c["eps"],
        "mc_samples": c["mc_samples"], "d_x": int(x[0].numel()),
        "lower_bound_mean": _mean(lbs), "lower_bound_min": min(lbs), "lower_bound_max": max(lbs),
        "exact_mean": _mean(exs), "lambda_max_mean": _mean([r["lambda_max"] for r in rows]),
        "all_cg_converged": all(bool(r["cg_converged"]) for r in rows),
    }
    return summary, rows


def _target(labels: Any, target: str) -> Any:
    return labels % 2 if target == "parity" else labels


def _measure_vinfo(cfg: dict[str, dict[str, Any]], data: Any, model: Any, device: Any,
                   out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from adversaries.measures import (
        layer_gaussian_v_information,
        layer_v_information,
        per_sample_layer_gradients,
        plot_layer_table,
    )
    from fl_privsim.seeding import torch_generator

    c, split = cfg["vinfo"], cfg["data"]["split"]
    idx = _per_class(data, split, range(data.num_classes), c["samples_per_class"], "vinfo.samples_per_class")
    x, y = _batch(data, split, idx, device)
    grads = {k: v.cpu() for k, v in per_sample_layer_gradients(model, x, y).items()}
    if c["target"] == "input":
        table = layer_gaussian_v_information(
            grads, x.detach().cpu(), generator=torch_generator(cfg["measure"]["seed"], "split"),
            max_features=c["max_features"], mlp_epochs=c["mlp_epochs"],
            target_components=c["input_components"], variance=c["input_variance"])
        plot_layer_table(table, out / "plot.png", key="v_information", err_key="stderr",
                         title=f"V-information about the input ({table[0]['target_dim']} PCs) per layer",
                         ylabel="I_V (nats)")
        best = max(table, key=lambda r: float(r["v_information"]))  # type: ignore[arg-type]
        summary = {"samples": len(idx), "target": "input", "input_components": table[0]["target_dim"],
                   "input_variance": c["input_variance"], "explained_variance": table[0]["explained_variance"],
                   "h_x": table[0]["h_x"], "layers": len(table), "most_informative_layer": best["layer"],
                   "max_v_information": best["v_information"],
                   "max_v_information_per_dim": best["v_information_per_dim"]}
        return summary, [dict(r) for r in table]
    target = _target(y.cpu(), c["target"])
    table = layer_v_information(grads, target, generator=torch_generator(cfg["measure"]["seed"], "split"),
                                max_features=c["max_features"], mlp_epochs=c["mlp_epochs"])
    plot_layer_table(table, out / "plot.png", key="v_information", err_key="stderr",
                     title=f"V-information about the {c['target']} per layer", ylabel="I_V (nats)")
    best = max(table, key=lambda r: float(r["v_information"]))  # type: ignore[arg-type]
    summary = {"samples": len(idx), "target": c["target"], "h_y": table[0]["h_y"],
               "layers": len(table), "most_informative_layer": best["layer"],
               "max_v_information": best["v_information"]}
    return summary, [dict(r) for r in table]


def _measure_sensitivity(cfg: dict[str, dict[str, Any]], data: Any, model: Any, device: Any,
                         out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from adversaries.measures import jacobian_sensitivity, plot_layer_table, summarize_sensitivity
    from fl_privsim.seeding import torch_generator

    c, split = cfg["sensitivity"], cfg["data"]["split"]
    idx = _first(data, split, c["first_index"], c["samples"], "sensitivity.samples")
    x, y = _batch(data, split, idx, device)
    rows = jacobian_sensitivity(model, x, y, n_probes=c["probes"],
                                generator=torch_generator(cfg["measure"]["seed"], "sampling"))
    table = summarize_sensitivity(rows)
    plot_layer_table(table, out / "plot.png", key="sensitivity", err_key="sensitivity_stderr",
                     title="Jacobian sensitivity per layer", ylabel="‖∂g_l/∂x‖_F")
    best = max(table, key=lambda r: float(r["sensitivity"]))
    summary = {"samples": len(idx), "probes": c["probes"], "layers": len(table),
               "most_sensitive_layer": best["layer"], "max_sensitivity": best["sensitivity"]}
    return summary, table


def _measure_subspace(cfg: dict[str, dict[str, Any]], data: Any, model: Any, device: Any,
                      out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from adversaries.measures import group_subspace_distance, plot_layer_table

    c, split = cfg["subspace"], cfg["data"]["split"]
    classes = c["classes"] if c["target"] == "label" else range(data.num_classes)
    bad = [k for k in classes if not 0 <= k < data.num_classes]
    if bad:
        raise ConfigError(f"subspace.classes: {bad} are not labels of {cfg['data']['name']} "
                          f"(0..{data.num_classes - 1})")
    idx = _per_class(data, split, classes, c["samples_per_class"], "subspace.samples_per_class")
    x, y = _batch(data, split, idx, device)
    group = _target(y, c["target"])
    results = group_subspace_distance(model, x, y, group, k=c["k"])
    table = [{k: v for k, v in r.to_dict().items() if k != "angles"}
             | {"max_angle_deg": math.degrees(max(r.angles)) if r.angles else 0.0} for r in results]
    plot_layer_table(table, out / "plot.png", key="normalized_distance", err_key=None,
                     title=f"Gradient subspace distance per layer ({c['target']})", ylabel="distance / √k")
    best = max(table, key=lambda r: float(r["normalized_distance"]))
    summary = {"samples": len(idx), "target": c["target"], "k": c["k"], "layers": len(table),
               "most_separating_layer": best["layer"], "max_normalized_distance": best["normalized_distance"]}
    return summary, table


MEASURES = {"i2f": _measure_i2f, "vinfo": _measure_vinfo, "sensitivity": _measure_sensitivity,
            "subspace": _measure_subspace}


# ----------------------------------------------------------------------------- outputs


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _histogram(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> None:
    """Histogram of the per-sample I2F lower bound and regularised value (log x axis)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series = [("lower bound ‖Jδ‖/λ_max", [r["lower_bound"] for r in rows]),
              ("regularised ‖(JJᵀ+εI)⁻¹Jδ‖", [r["exact"] for r in rows if r["exact"] is not None])]
    pos = [v for _, vals in series for v in vals if v and v > 0 and math.isfinite(v)]
    if pos:
        bins = np.logspace(math.log10(min(pos)) - 0.05, math.log10(max(pos)) + 0.05, 20)
        for label, vals in series:
            good = [v for v in vals if v and v > 0 and math.isfinite(v)]
            if good:
                ax.hist(good, bins=bins, alpha=0.6, label=label)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("I2F (input-space L2 norm)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _write_table(rows: Sequence[Mapping[str, Any]], out: Path) -> None:
    from fl_privsim.reproduce.base import markdown_table

    header = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in header})
    (out / "table.md").write_text(markdown_table(header, [[r.get(k) for k in header] for r in rows]) + "\n",
                                  encoding="utf-8")


def run_measure(cfg: dict[str, dict[str, Any]], *, out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run the measure of a validated config (:func:`load_config`) into a fresh run folder;
    returns the folder and the summary."""
    import tomli_w
    import torch

    from fl_privsim.results import RunFolder, make_run_dir

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
            summary, rows = MEASURES[kind](cfg, data, model, device, path)
        except UserError:
            # e.g. too few samples in the split: leave no half-made folder behind
            if {f.name for f in path.iterdir()} <= {"config.toml", "env.json"}:
                shutil.rmtree(path, ignore_errors=True)
            raise
        summary = {"kind": kind, "data": cfg["data"]["name"], "split": cfg["data"]["split"],
                   "model": cfg["model"]["name"], "init": cfg["model"]["init"], **summary,
                   "seconds": time.perf_counter() - start}
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--out", help="run folder to create (default: <output.dir>/<UTC time>_measure_KIND)")
    p.add_argument("--verbose", action="store_true", help="log progress")
    return p


def cmd_measure(args: argparse.Namespace) -> int:
    """The ``measure`` subcommand: print the summary and the run folder."""
    cfg = load_config(args.config, args.overrides)
    configure_logging(args.verbose)
    path, summary = run_measure(cfg, out=args.out)
    print(json.dumps(summary, indent=2, default=str))
    print(f"run folder: {path}")
    return 0
