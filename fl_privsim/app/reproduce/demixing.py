"""Dense-layer de-mixing: random-label vs identical-label batches (Eloul et al., arXiv:2204.12495).

Eloul, Silavong, Kamthe, Georgiadis and Moran, "Enhancing Privacy against Inversion Attacks
in Federated Learning by using Mixing Gradients Strategies" (methods.md §5): a batch of
random labels trained through a dense softmax-CE layer can be de-mixed analytically into
per-sample images (low AVD), while a batch of identical labels leaves every sample mixed
into every row of the gradient (high AVD). This reproduction runs the ``analytic`` attack
(Eloul et al.'s least squares with the fixed point on the softmax) on MNIST test images
through a freshly initialised ``linear`` model (softmax regression) per trial, and scores
PSNR, SSIM, AVD and label-count accuracy, with the condition number of the coefficient
matrix A.

Batch kinds:

* ``random``: labels drawn at random *without replacement* while ``N <= K`` (so all
  distinct); for ``N > K`` every class appears ``N // K`` times and the rest are drawn
  without replacement, so duplicates are unavoidable. One random image per label.
* ``identical``: one class drawn at random, ``N`` distinct images of it (the defense).
* ``iid``: ``N`` images drawn uniformly (labels i.i.d., duplicates likely): the ordinary
  FL batch, not in the paper's comparison.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adversaries import ATTACKS
from adversaries.reconstruction._dense_demix import condition_number
from fl_privsim.app.reproduce.base import (
    ReproContext,
    Reproduction,
    ReproResult,
    register,
)
from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.metrics import avd_matched, label_accuracy, match_reconstructions, psnr, ssim
from fl_privsim.core.models import build_model
from fl_privsim.core.results import markdown_table
from fl_privsim.core.seeding import seed_int
from fl_privsim.engine.offline import client_observation

log = logging.getLogger(__name__)

KINDS = ("random", "identical", "iid")
#: Integer ids of the batch kinds in seed keys (never renumber).
_KIND_ID = {"random": 1, "identical": 2, "iid": 3}
#: PSNR above which a sample counts as recovered.
RECOVERED_DB = 40.0

PAPER = {
    "random": "de-mixed into per-sample images (low AVD)",
    "identical": "stays mixed (high AVD); the defense",
    "iid": "not in the paper",
}

DEFAULTS: dict[str, Any] = {
    "batch_sizes": [2, 4, 8, 16],
    "kinds": ["random", "identical", "iid"],
    "trials": 10,
    "model": "linear",
    "split": "test",
    "demix_iterations": 100,
    "figure_batch": 8,
}
QUICK: dict[str, Any] = {"batch_sizes": [2, 8], "trials": 2}


def _draw_batch(
    data: ImageData, split: str, kind: str, n: int, gen: torch.Generator
) -> torch.Tensor:
    """Indices of one batch of ``kind`` (see the module docstring)."""
    labels = data.labels(split, slice(None))
    k = data.num_classes
    if kind == "iid":
        return torch.randperm(labels.numel(), generator=gen)[:n]
    if kind == "identical":
        classes = torch.full((n,), int(torch.randint(k, (1,), generator=gen)))
    else:
        classes = torch.cat(
            [torch.arange(k).repeat(n // k), torch.randperm(k, generator=gen)[: n % k]]
        )
    picked: list[int] = []
    for c in classes.unique():
        pool = torch.nonzero(labels == c).flatten()
        need = int((classes == c).sum())
        if pool.numel() < need:
            raise ConfigError(
                f"demixing: class {int(c)} has only {pool.numel()} images, need {need}"
            )
        picked += pool[torch.randperm(pool.numel(), generator=gen)[:need]].tolist()
    order = torch.randperm(len(picked), generator=gen)
    return torch.tensor(picked)[order]


def _model(name: str, data: ImageData, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, data.input_shape, data.num_classes).train()


def _stat(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def _agrees(kind: str, n: int, k: int, recovered: float) -> str:
    """Whether the cell shows the paper's qualitative claim for its batch kind."""
    if kind == "random":
        if recovered >= 0.9:
            return "yes"
        return f"no: N ≥ K = {k}, underdetermined" if n >= k else "no"
    if kind == "identical":
        return "yes" if recovered == 0.0 else "no"
    return "-"


def run(settings: dict[str, Any], ctx: ReproContext) -> ReproResult:
    """Attack ``trials`` batches per (kind, N) and tabulate the scores (see module doc)."""
    kinds = list(settings["kinds"])
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise ConfigError(f"demixing.kinds: unknown kind(s) {bad}; allowed: {', '.join(KINDS)}")
    sizes = [int(b) for b in settings["batch_sizes"]]
    if min(sizes) < 1 or settings["trials"] < 1:
        raise ConfigError("demixing: batch_sizes and trials must be >= 1")
    data = load_dataset("mnist_idx", root=ctx.data("mnist"))
    split = settings["split"]
    attack = ATTACKS.create("analytic", demix_iterations=settings["demix_iterations"])
    labeller = ATTACKS.create("llg")
    k = data.num_classes

    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    examples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    seconds: list[float] = []
    for n in sizes:
        for t in range(settings["trials"]):
            # The same model for every kind of the same (N, trial): paired comparison.
            model_seed = seed_int(ctx.seed, "model_init", n, t)
            for kind in kinds:
                gen = ctx.generator("batch", _KIND_ID[kind], n, t)
                idx = _draw_batch(data, split, kind, n, gen)
                raw = data.images(split, idx)
                y = data.labels(split, idx)
                x = data.normalize(raw)
                model = _model(settings["model"], data, model_seed)
                obs = client_observation(
                    model,
                    [(x, y)],
                    protocol="fedsgd",
                    lr=0.1,
                    mean=data.mean,
                    std=data.std,
                    num_classes=k,
                )
                start = time.perf_counter()
                res = attack(obs, device=ctx.device, generator=ctx.generator("attack", n, t))
                seconds.append(time.perf_counter() - start)
                lab = labeller(obs, device=ctx.device, generator=ctx.generator("attack", n, t))

                rec = data.denormalize(res.inputs.detach().cpu()).clamp(0, 1)
                perm = torch.as_tensor(match_reconstructions(raw, rec))
                matched = rec[perm]
                with torch.no_grad():
                    p_true = F.softmax(model(x).double(), dim=1)
                a_true = (p_true - F.one_hot(y, k).double()) / n
                cell = cells.setdefault((kind, n), {})
                per_psnr = psnr(raw, matched)
                for key, value in (
                    ("psnr", float(per_psnr.mean())),
                    ("ssim", float(ssim(raw, matched).mean())),
                    ("avd", float(avd_matched(raw, rec).mean())),
                    ("recovered", float((per_psnr >= RECOVERED_DB).double().mean())),
                    ("label_acc", label_accuracy(y, res.labels)),
                    ("llg_acc", label_accuracy(y, lab.labels)),
                    ("log10_cond", math.log10(res.metrics.get("cond_A", float("nan")))),
                    ("log10_cond_true", math.log10(condition_number(a_true))),
                    ("distinct", float(y.unique().numel())),
                    ("residual", res.metrics.get("residual", float("nan"))),
                ):
                    cell.setdefault(key, []).append(value)
                if n == settings["figure_batch"] and t == 0:
                    examples[kind] = (raw, matched)
            log.info("demixing: N=%d trial %d done", n, t)

    summary: dict[str, Any] = {}
    rows = []
    for kind in kinds:
        for n in sizes:
            cell = cells[(kind, n)]
            stats = {key: _stat(vals) for key, vals in cell.items()}
            for key, (mean, std) in stats.items():
                summary[f"{key}_{kind}_b{n}"] = mean
                if key in ("psnr", "ssim", "avd"):
                    summary[f"{key}_std_{kind}_b{n}"] = std
            rows.append(
                [
                    kind,
                    n,
                    f"{stats['distinct'][0]:.1f}",
                    f"{stats['psnr'][0]:.1f} ± {stats['psnr'][1]:.1f}",
                    f"{stats['ssim'][0]:.3f} ± {stats['ssim'][1]:.3f}",
                    f"{stats['avd'][0]:.4f} ± {stats['avd'][1]:.4f}",
                    f"{stats['recovered'][0]:.2f}",
                    f"{stats['label_acc'][0]:.3f} ± {stats['label_acc'][1]:.3f}",
                    f"{stats['llg_acc'][0]:.3f}",
                    f"{stats['log10_cond'][0]:.2f} ± {stats['log10_cond'][1]:.2f}",
                    f"{stats['log10_cond_true'][0]:.2f}",
                    f"{stats['residual'][0]:.2g}",
                    PAPER[kind],
                    _agrees(kind, n, k, stats["recovered"][0]),
                ]
            )
    summary["seconds_per_update_mean"] = float(np.mean(seconds))
    summary["seconds_per_update_max"] = float(np.max(seconds))
    header = [
        "batch kind",
        "N",
        "distinct labels",
        "PSNR (dB)",
        "SSIM",
        "AVD",
        f"recovered (≥{RECOVERED_DB:.0f} dB)",
        "label acc (analytic)",
        "label acc (llg)",
        "log10 cond(Â)",
        "log10 cond(A_true)",
        "gradient residual",
        "paper (qualitative; no numbers in methods.md)",
        "ours agrees",
    ]
    table = markdown_table(header, rows)
    table += (
        f"\n\nMNIST {split} images, model `{settings['model']}` (fresh seeded init per trial), "
        f"FedSGD, {settings['trials']} trials per cell, mean ± std. PSNR/SSIM per original after "
        "MSE matching; AVD per reconstruction against its AVD-closest original. Â is the "
        "attack's final coefficient matrix (1/eps ≈ 4.5e15 when rows coincide), A_true the "
        "ground-truth one (scorer side); gradient residual = ‖Â(X)ᵀX − ∇W‖/‖∇W‖ at the "
        f"returned X. The rows of A sum to zero, so rank(A) ≤ K − 1 = {k - 1}: a batch of "
        f"N ≥ {k} can never be fully de-mixed by this layer alone (cond = 1/eps for any labels). "
        "The paper gives no exact numbers (methods.md §5)."
    )
    _plots(ctx, cells, kinds, sizes, examples, k)
    return ReproResult(summary=summary, table=table)


def _plots(
    ctx: ReproContext,
    cells: dict[tuple[str, int], dict[str, list[float]]],
    kinds: list[str],
    sizes: list[int],
    examples: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avd_figure(cells, kinds, sizes, num_classes).savefig(
        ctx.path / "avd_vs_batch.png", dpi=120, bbox_inches="tight"
    )

    if not examples:
        return
    shown = [kind for kind in kinds if kind in examples]
    n = examples[shown[0]][0].shape[0]
    fig, axes = plt.subplots(2 * len(shown), n, figsize=(1.1 * n, 2.3 * len(shown)), squeeze=False)
    for r, kind in enumerate(shown):
        raw, rec = examples[kind]
        for j in range(n):
            for row, img, tag in ((2 * r, raw, "original"), (2 * r + 1, rec, "recon")):
                ax = axes[row][j]
                ax.imshow(img[j].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{kind}\n{tag}", fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.path / "examples.png", dpi=120)
    plt.close(fig)


def avd_figure(
    cells: dict[tuple[str, int], dict[str, list[float]]],
    kinds: list[str],
    sizes: list[int],
    num_classes: int,
) -> Any:
    """AVD against the batch size, one line per batch kind (``avd_vs_batch.png``; a matplotlib
    ``Figure`` on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fl_privsim.core.plots import legend_outside

    fig = Figure(figsize=(6.2, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind in kinds:
        means = [np.mean(cells[(kind, n)]["avd"]) for n in sizes]
        stds = [np.std(cells[(kind, n)]["avd"]) for n in sizes]
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=kind)
    if min(sizes) <= num_classes <= max(sizes):
        ax.axvline(num_classes, ls="--", color="gray", lw=1, label=f"N = K = {num_classes}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("batch size N")
    ax.set_ylabel("AVD (lower = better recovery)")
    ax.set_title("Dense-layer de-mixing on MNIST")
    legend_outside(ax, fontsize=10)
    fig.tight_layout()
    return fig


register(
    Reproduction(
        name="demixing",
        title="Eloul et al.: dense-layer de-mixing, random vs identical labels (PSNR/SSIM/AVD)",
        defaults=DEFAULTS,
        quick=QUICK,
        run=run,
    )
)
