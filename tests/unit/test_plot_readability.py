"""Figures are readable: no two visible x tick labels overlap, and legends stay off the data.

Checked on the drawn canvas from the renderer's bounding boxes, for the I2F histogram of
``fl-privsim measure`` (with per-sample values as the measure produces them) and for the axis
helpers of :mod:`fl_privsim.core.plots` it uses; then for every other figure the package writes (the
per-layer bar plot of ``measure`` / ``layer_localisation``, the inference-game ROC, and the
figures of the reproductions), built from data shaped like what their runs produce.
"""

from __future__ import annotations

import math
import random
from itertools import combinations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fl_privsim.app.measure import _histogram, histogram_figure
from fl_privsim.core.plots import legend_outside, log_ticks, set_log_xticks


def _visible_xtick_labels(fig, ax, renderer):
    labels = [
        t
        for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
        if t.get_visible() and t.get_text().strip()
    ]
    lo, hi = sorted(ax.get_xlim())
    inside = []
    for t in labels:  # tick labels outside the view are not drawn
        x = t.get_position()[0]
        if lo <= x <= hi:
            inside.append(t)
    return inside


def _overlapping_pairs(fig, ax):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [
        (t.get_text(), t.get_window_extent(renderer))
        for t in _visible_xtick_labels(fig, ax, renderer)
    ]
    return [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)], len(boxes)


def _legend_overlaps_data(fig, ax):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend()
    assert legend is not None
    return legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def _i2f_rows(n: int, *, lam_range: tuple[float, float], eps: float, seed: int = 0) -> list[dict]:
    """Per-sample rows shaped like the measure's (λ_max, ‖Jδ‖, the three I2F values)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lam = math.exp(rng.uniform(math.log(lam_range[0]), math.log(lam_range[1])))
        jd = rng.uniform(0.015, 0.035)
        rows.append(
            {
                "index": i,
                "label": i % 10,
                "lambda_max": lam,
                "jdelta_norm": jd,
                "lower_bound": jd / lam,
                "exact": jd / (lam + eps) * rng.uniform(1.0, 1.08),
                "lower_bound_eps": jd / (lam + eps),
                "cg_converged": True,
            }
        )
    return rows


@pytest.mark.parametrize(
    "lam_range, eps",
    [
        ((0.04, 0.08), 1.0),  # digits / sigmoid LeNet: the ε=0 bound is ~20x the regularised value
        (
            (20.0, 60.0),
            1.0,
        ),  # MNIST / CIFAR: everything within one decade (many minor ticks by default)
        ((1e-3, 50.0), 1e-4),
    ],  # a wide spread over many decades
)
def test_i2f_histogram_ticks_and_legend(lam_range, eps, tmp_path):
    rows = _i2f_rows(16, lam_range=lam_range, eps=eps)
    fig = histogram_figure(rows, title="I2F on lenet / digits: gaussian 0.001", eps=eps)
    ax = fig.axes[0]
    pairs, shown = _overlapping_pairs(fig, ax)
    assert shown >= 2, "the x axis needs at least two labelled ticks"
    assert not pairs, pairs
    assert not _legend_overlaps_data(fig, ax)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"ε={eps:g}" in t for t in labels) and any(
        "ε=0" in t for t in labels
    )  # each series names its ε
    _histogram(rows, tmp_path / "plot.png", title="t", eps=eps)
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_i2f_histogram_monte_carlo_rows_have_the_same_eps_bound():
    """Monte Carlo rows carry means (no ``lower_bound_eps``): the same-ε bound is derived."""
    rows = [
        {k: v for k, v in r.items() if k != "lower_bound_eps"}
        for r in _i2f_rows(4, lam_range=(0.04, 0.08), eps=1.0)
    ]
    fig = histogram_figure(rows, title="mc", eps=1.0)
    assert len(fig.axes[0].get_legend().get_texts()) == 3


@pytest.mark.parametrize(
    "lo, hi", [(0.018, 0.52), (0.3, 0.35), (1e-6, 10.0), (2.0, 9.0), (15.0, 70.0)]
)
def test_log_axis_helper_never_overlaps(lo, hi):
    fig = Figure(figsize=(4.0, 3.0))  # narrower than the measure's figure
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([lo, hi], [0, 1], label="series a")
    ax.plot([lo, hi], [1, 0], label="series b with a longer name")
    ticks = set_log_xticks(ax, lo, hi)
    legend_outside(ax)
    assert 1 <= len(ticks) <= 5 and all(lo <= t <= hi for t in ticks)
    pairs, shown = _overlapping_pairs(fig, ax)
    assert shown >= 2 and not pairs, pairs
    assert not _legend_overlaps_data(fig, ax)


def test_log_ticks_are_round_values():
    assert log_ticks(1e-5, 1e-1) == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert log_ticks(0.018, 0.52) == [0.02, 0.05, 0.1, 0.2, 0.5]
    assert len(log_ticks(1e-12, 1e6)) <= 5
    with pytest.raises(ValueError):
        log_ticks(0.0, 1.0)


# ----------------------------------------------------------------------------- every figure of the package
# The other figures the package writes, built by their figure functions from data shaped like what the
# runs produce: no two tick labels overlap (x or y, within or across panels) and every legend stays off
# every axes' area and inside the figure.


def _visible_ticklabels(ax, axis: str):
    """Drawn, non-empty major and minor tick labels of one axis inside its view."""
    if axis == "x":
        labels = ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
        lo, hi = sorted(ax.get_xlim())
    else:
        labels = ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True)
        lo, hi = sorted(ax.get_ylim())
    i = 0 if axis == "x" else 1
    return [
        t
        for t in labels
        if t.get_visible() and t.get_text().strip() and lo <= t.get_position()[i] <= hi
    ]


def _figure_problems(fig) -> list[str]:
    """Overlapping tick labels and legends over data or outside the figure, as readable strings."""
    problems = []
    for ax in fig.axes:  # the existing x check, per axes
        pairs, _ = _overlapping_pairs(fig, ax)
        problems += [
            f"x tick labels {a!r} and {b!r} overlap ({ax.get_title()!r})" for a, b in pairs
        ]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [
        (
            (i, axis),
            f"{axis} tick {t.get_text()!r} ({ax.get_title()!r})",
            t.get_window_extent(renderer),
        )
        for i, ax in enumerate(fig.axes)
        for axis in ("x", "y")
        for t in _visible_ticklabels(ax, axis)
    ]
    for (ka, a, ba), (kb, b, bb) in combinations(
        ticks, 2
    ):  # y labels, and labels of different axes
        if ba.overlaps(bb) and not (
            ka == kb and ka[1] == "x"
        ):  # (same-axes x pairs: checked above)
            problems.append(f"{a} overlaps {b}")
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(
        fig.legends
    )
    fig_box = fig.bbox
    for legend in legends:
        box = legend.get_window_extent(renderer)
        name = ", ".join(t.get_text() for t in legend.get_texts())
        for ax in fig.axes:
            if box.overlaps(ax.get_window_extent(renderer)):
                problems.append(f"legend [{name}] overlaps the data area of {ax.get_title()!r}")
        problems += [f"legend [{name}] overlaps {a}" for _, a, bb in ticks if box.overlaps(bb)]
        if (
            box.x0 < fig_box.x0 - 1
            or box.x1 > fig_box.x1 + 1
            or box.y0 < fig_box.y0 - 1
            or box.y1 > fig_box.y1 + 1
        ):
            problems.append(f"legend [{name}] is cut off by the figure edge")
    return problems


def _assert_readable(fig, *, legends: int | None = None) -> None:
    problems = _figure_problems(fig)
    assert not problems, "\n".join(problems)
    drawn = [ax for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    if legends is not None:
        assert len(drawn) == legends
    for ax in fig.axes:
        if ax.get_legend() is not None:
            assert not _legend_overlaps_data(fig, ax)


def _resnet18_parameter_names() -> list[str]:
    """``named_parameters()`` of torchvision's resnet18 (62 names), spelled out: no torchvision here."""
    names = ["conv1.weight", "bn1.weight", "bn1.bias"]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            names += [
                f"{p}.conv1.weight",
                f"{p}.bn1.weight",
                f"{p}.bn1.bias",
                f"{p}.conv2.weight",
                f"{p}.bn2.weight",
                f"{p}.bn2.bias",
            ]
            if layer > 1 and block == 0:
                names += [
                    f"{p}.downsample.0.weight",
                    f"{p}.downsample.1.weight",
                    f"{p}.downsample.1.bias",
                ]
    return names + ["fc.weight", "fc.bias"]


def _layer_rows(names: list[str], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "layer": n,
            "v_information": rng.uniform(0.0, 0.7),
            "stderr": rng.uniform(0.005, 0.05),
            "sensitivity": 10 ** rng.uniform(-2, 1),
            "sensitivity_stderr": 0.01,
            "normalized_distance": rng.uniform(0.1, 0.9),
        }
        for n in names
    ]


@pytest.mark.parametrize(
    "names",
    [
        _resnet18_parameter_names(),  # 62 long names
        ["conv1", "conv2", "conv3", "fc1", "fc2"],  # the CNN of layer_localisation
        [
            "",
            "features.0",
            "features.3",
            "features.6.weight",
            "classifier.1.weight",
            "classifier.1.bias",
        ],
    ],
)
@pytest.mark.parametrize(
    "key, err_key",
    [
        ("v_information", "stderr"),
        ("sensitivity", "sensitivity_stderr"),
        ("normalized_distance", None),
    ],
)
def test_layer_table_figure_is_readable(names, key, err_key, tmp_path):
    from adversaries.measures.vinfo import layer_table_figure, plot_layer_table

    rows = _layer_rows(names)
    fig = layer_table_figure(
        rows,
        key=key,
        err_key=err_key,
        title="V-information about the label per layer",
        ylabel="I_V (nats)",
    )
    _assert_readable(fig)
    shown = {
        t.get_text()
        for ax in fig.axes
        for axis in ("x", "y")
        for t in _visible_ticklabels(ax, axis)
    }
    assert {n or "(root)" for n in names} <= shown, "every layer keeps its full name"
    out = plot_layer_table(rows, tmp_path / "plot.png", key=key, err_key=err_key)
    assert out.stat().st_size > 0


def test_roc_figure_is_readable(tmp_path):
    import numpy as np

    from adversaries.inference.metrics import roc_figure, save_roc_plot

    rng = np.random.default_rng(0)
    secrets = rng.integers(0, 2, 300)
    scores = secrets * 0.8 + rng.normal(size=300)
    _assert_readable(roc_figure(secrets, scores, title="attribute game on adult, batch 4"))
    assert save_roc_plot(tmp_path / "roc.png", secrets, scores).stat().st_size > 0


def _defenses_summary(datasets: list[str]) -> dict:
    from fl_privsim.app.reproduce.defenses import ROWS

    rng = random.Random(1)
    out = {}
    for d in datasets:
        for r in ROWS:
            out[f"{d}_accuracy_{r}"] = rng.uniform(0.3, 0.95)
            out[f"{d}_accuracy_std_{r}"] = rng.uniform(0.0, 0.03)
    return out


@pytest.mark.parametrize("datasets", [["mnist", "cifar10"], ["cifar10"]])
def test_defenses_accuracy_figure_is_readable(datasets, tmp_path):
    from fl_privsim.app.reproduce.defenses import accuracy_figure, plot_accuracy

    summary = _defenses_summary(datasets)
    _assert_readable(accuracy_figure(summary, datasets))
    plot_accuracy(summary, datasets, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("sizes", [[2, 4, 8, 16], [2, 8], [1, 2, 4, 8, 16, 32, 64]])
def test_demixing_avd_figure_is_readable(sizes):
    from fl_privsim.app.reproduce.demixing import avd_figure

    rng = random.Random(2)
    kinds = ["random", "identical", "iid"]
    cells = {
        (k, n): {"avd": [rng.uniform(0, 0.5) * n / 16 for _ in range(5)]}
        for k in kinds
        for n in sizes
    }
    _assert_readable(avd_figure(cells, kinds, sizes, 10), legends=1)


def _eigen_rows(mus_by_sample: dict[int, list[float]]) -> list[dict]:
    rows = []
    for index, mus in mus_by_sample.items():
        rows += [
            {"index": index, "kind": "eigen", "mu": mu, "rmse": 0.35 * mu**-0.51} for mu in mus
        ]
        rows.append({"index": index, "kind": "random", "mu": math.nan, "rmse": 0.49})
    return rows


@pytest.mark.parametrize(
    "mus_by_sample, inits",
    [
        # the defaults: 4 samples, 4 of the top 64 eigenvalues (experiments/README.md), 4 inits
        (
            {
                0: [28.2, 1.11, 0.58, 0.42],
                1: [31.0, 1.3, 0.62, 0.45],
                2: [9.1, 0.3, 0.12, 0.08],
                3: [25.4, 1.0, 0.55, 0.4],
            },
            ["uniform", "normal", "kaiming", "xavier"],
        ),
        (
            {0: [2.1, 1.4]},
            ["uniform", "xavier"],
        ),  # quick: one sample, 2 directions of the top 6 (within a decade)
    ],
)
def test_eigen_init_figure_is_readable(mus_by_sample, inits):
    from fl_privsim.app.reproduce.i2f_eigen_init import eigen_init_figure

    medians = {
        "uniform": (0.27, 4.2e-4, 0.249),
        "normal": (4.1, 1.1e-5, 0.076),
        "kaiming": (50.0, 0.084, 3.46),
        "xavier": (124.7, 0.495, 12.1),
    }
    init_rows = [
        {
            "init": i,
            "index": s,
            "rmse": medians[i][0],
            "lb_rmse": medians[i][1],
            "svd_rmse": medians[i][2],
        }
        for i in inits
        for s in mus_by_sample
    ]
    _assert_readable(eigen_init_figure(_eigen_rows(mus_by_sample), init_rows, inits))


def _dgl_records(settings: list[str], samples: int) -> list[dict]:
    rng = random.Random(3)
    scale = {
        "gaussian:1e-5": 4.6e-5,
        "gaussian:1e-4": 1.4e-4,
        "gaussian:1e-3": 4.5e-4,
        "gaussian:1e-2": 1e-3,
        "laplace:1e-3": 4.4e-4,
        "pruning:0.4": 2e-4,
    }
    out = []
    for s in settings:
        for i in range(samples):
            lb = scale[s] * rng.uniform(0.8, 1.3)
            out.append(
                {
                    "setting": s,
                    "index": i,
                    "lb_rmse": lb,
                    "exact_rmse": lb * rng.uniform(10, 25),
                    "rmse": lb * 10 ** rng.uniform(2, 4),
                    "rmse_ig": 10 ** rng.uniform(-1.2, 0),
                }
            )
    return out


@pytest.mark.parametrize(
    "settings, samples, attacks",
    [
        (
            [
                "gaussian:1e-5",
                "gaussian:1e-4",
                "gaussian:1e-3",
                "gaussian:1e-2",
                "laplace:1e-3",
                "pruning:0.4",
            ],
            16,
            ["idlg", "inverting_gradients"],
        ),
        (["gaussian:1e-3"], 3, ["idlg", "inverting_gradients"]),  # quick
        (["gaussian:1e-3", "pruning:0.4"], 8, ["idlg"]),
    ],
)
def test_i2f_vs_dgl_scatter_figure_is_readable(settings, samples, attacks):
    from fl_privsim.app.reproduce.i2f_vs_dgl import scatter_figure

    _assert_readable(scatter_figure(_dgl_records(settings, samples), settings, attacks))


def _sweep_rows(datasets, games, batch_sizes, clients) -> list[dict]:
    rng = random.Random(4)
    rows = []
    for ds in datasets:
        for g in games:
            for axis, xs in (("batch_size", batch_sizes), ("clients", clients)):
                for x in xs:
                    auc = rng.uniform(0.45, 0.95)
                    rows.append(
                        {
                            "dataset": ds,
                            "game": g,
                            "sweep": axis,
                            axis: x,
                            "auc": auc,
                            "auc_ci": [auc - 0.05, min(1.0, auc + 0.05)],
                        }
                    )
    return rows


@pytest.mark.parametrize(
    "batch_sizes, clients", [([1, 4, 16, 64, 256], [1, 5, 10, 50]), ([1, 16], [1, 5])]
)
@pytest.mark.parametrize("axis", ["batch_size", "clients"])
def test_inference_aggregation_sweep_figure_is_readable(batch_sizes, clients, axis):
    from fl_privsim.app.reproduce.inference_aggregation import GAMES4, sweep_figure

    datasets = ["adult", "utkface"]
    rows = _sweep_rows(datasets, list(GAMES4), batch_sizes, clients)
    _assert_readable(sweep_figure(rows, axis, datasets, list(GAMES4)))


@pytest.mark.parametrize(
    "cases",
    [
        [("adult", "attribute"), ("utkface", "attribute")],
        [
            ("adult", "attribute"),
            ("adult", "property"),
            ("utkface", "attribute"),
            ("utkface", "property"),
        ],
    ],
)
def test_inference_aggregation_defenses_figure_is_readable(cases):
    from fl_privsim.app.reproduce.inference_aggregation import DEFENSES5, defenses_figure

    rng = random.Random(5)
    rows = [
        {"dataset": ds, "game": g, "defense": d, "adversary": adv, "auc": rng.uniform(0.35, 0.85)}
        for ds, g in cases
        for d in ("none", *DEFENSES5)
        for adv in ("static", "adaptive")
    ]
    _assert_readable(defenses_figure(rows))


@pytest.mark.parametrize(
    "models, batch_sizes, steps",
    [(["convnet", "resnet18"], [1, 2, 4, 8, 16], [1, 2, 4, 8]), (["convnet"], [1], [2])],
)
def test_inverting_batch_steps_figure_is_readable(models, batch_sizes, steps):
    from fl_privsim.app.reproduce.inverting_batch_steps import psnr_figure

    rng = random.Random(6)
    curves = {}
    for m in models:
        curves[(m, "fedsgd")] = [(b, rng.uniform(8, 17), rng.uniform(0.5, 3)) for b in batch_sizes]
        curves[(m, "fedavg")] = [(s, rng.uniform(8, 17), rng.uniform(0.5, 3)) for s in steps]
    _assert_readable(psnr_figure(curves))


@pytest.mark.parametrize(
    "batch_sizes, bin_counts", [([64, 128, 256, 512], [64, 128, 256, 512, 1024]), ([64], [256])]
)
def test_robbing_the_fed_asr_figure_is_readable(batch_sizes, bin_counts):
    from fl_privsim.app.reproduce.robbing_the_fed import asr_figure

    summary = []
    for group, xkey, xs in (
        ("imprint vs batch", "records", batch_sizes),
        ("imprint vs bins", "bins", bin_counts),
    ):
        for x in xs:
            n, k = (x, 256) if xkey == "records" else (64, x)
            alone = (1 - 1 / k) ** (n - 1)
            summary.append(
                {
                    "group": group,
                    "records": n,
                    "bins": k,
                    "asr": alone * 0.97,
                    "asr_std": 0.03,
                    "expected_alone": alone,
                    "alone_share": alone * 1.01,
                }
            )
    summary.append({"group": "trap weights", "records": 64, "bins": None, "asr": 0.4})
    _assert_readable(asr_figure(summary))


@pytest.mark.parametrize("clients", [[3, 10, 50], [3], [2, 5, 10, 20, 50, 100]])
def test_secure_aggregation_figure_is_readable(clients):
    from fl_privsim.app.reproduce.secure_aggregation import _figure

    rows = [
        {"kind": kind, "clients": n, "secagg": True, "psnr": 80.0 - n / 10, "asr": 0.8 - n / 500}
        for n in clients
        for kind in ("isolation", "honest_b1", "imprint", "loki", "honest")
    ]
    _assert_readable(_figure(rows))


def _sweep_summary(batch_sizes, clients, roles):
    """A sweep summary (fl_privsim.app.sweep_results) of a batch x clients (x role) grid: per-client
    and aggregate attacks, an inference attack, the model's accuracy; cells share sizes."""
    import pandas as pd

    from fl_privsim.app.sweep_results import results_columns, summarize

    grid = ["client.batch_size", "federation.clients_per_round", "server.role"]
    rng = random.Random(7)
    rows, cell = [], 0
    for bs in batch_sizes:
        for k in clients:
            for role in roles:
                for seed in range(3):
                    for attack in (
                        "inverting_gradients",
                        "inverting_gradients@aggregate",
                        "membership_inference",
                    ):
                        x = bs * (k if attack.endswith("@aggregate") else 1)
                        row = dict.fromkeys(results_columns(grid), math.nan)
                        row.update(
                            {
                                "cell_id": f"c{cell:03d}_s{seed}",
                                "cell": cell,
                                "seed": seed,
                                "client.batch_size": bs,
                                "federation.clients_per_round": k,
                                "server.role": role,
                                "attack": attack,
                                "status": "done",
                                "error": "",
                                "aggregate_size": float(x),
                                "model_accuracy": rng.uniform(0.7, 0.9),
                                "server_role": role,
                                "secure_aggregation": "off",
                            }
                        )
                        if attack == "membership_inference":
                            row["auc"] = rng.uniform(0.5, 0.9)
                        else:
                            row["psnr"] = 30 - 5 * math.log10(x) + rng.uniform(-1, 1)
                        rows.append(row)
                cell += 1
    return summarize(pd.DataFrame(rows, columns=results_columns(grid)))


@pytest.mark.parametrize(
    "batch_sizes, clients, roles",
    [
        ([1, 4, 20], [1, 5], ["honest_but_curious", "malicious"]),  # shared x, 6 lines
        ([1, 2, 4, 8, 16, 32, 64, 128], [1, 10, 100], ["honest_but_curious"]),  # many decades
        ([4], [5], ["honest_but_curious"]),  # one point per line
    ],
)
@pytest.mark.parametrize("metric", ["psnr", "auc", "model_accuracy"])
def test_sweep_figure_is_readable(batch_sizes, clients, roles, metric):
    from fl_privsim.app.sweep_plots import sweep_figure

    fig = sweep_figure(_sweep_summary(batch_sizes, clients, roles), metric)
    _assert_readable(fig, legends=1)
