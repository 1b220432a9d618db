"""Layer-wise empirical V-information of gradients about a discrete target (latent leakage).

Xu, Zhao, Song, Stewart, Ermon, "A Theory of Usable Information under Computational
Constraints" (ICLR 2020) define, for a predictive family ``V``,
``H_V(Y|G) = inf_{f∈V} E[−log f[G](Y)]``, ``H_V(Y) = inf_{f∈V} E[−log f[∅](Y)]`` and
``I_V(G → Y) = H_V(Y) − H_V(Y|G)``. Mo, Borovykh, Malekzadeh, Haddadi, Demetriou
("Quantifying and Localizing Usable Information Leakage from Neural Network Gradients",
arXiv:2105.13929) apply it per layer: ``G = g_l``, the gradient of layer ``l``, and ``Y`` a
private attribute or the label; ``V`` is a family of attack models.

Estimate (the per-layer use is [derived] in methods.md §2; choices documented here):

- split the samples once into train and held-out parts (``test_fraction``);
- ``H_V(Y)`` = held-out NLL of the best constant predictor, the train split's label
  distribution (add-one smoothed so an unseen class costs ``log(n_train + K)``, not ∞);
- ``H_V(Y|G)`` = the smallest held-out NLL over the family: multinomial logistic regression
  (L-BFGS, L2 penalty) and a one-hidden-layer ReLU MLP (Adam, weight decay), both trained
  on the train split's gradients, standardised with train statistics and, when wider than
  ``max_features``, projected on the train split's top principal components;
- ``stderr`` is the standard error of the paired per-sample NLL difference on the held-out
  split. Values are in nats; a negative estimate means the family found no usable
  information (overfitting makes held-out NLL exceed ``H_V(Y)``); the minimum over two
  families is slightly optimistic.

Threat model: the attack models are trained by an analyst who knows the target of the
training samples (an upper estimate of what a server with auxiliary labelled data learns).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

FAMILIES = ("logistic", "mlp")


@dataclass(frozen=True)
class VInfoResult:
    """Empirical V-information (nats) of one feature set (one layer's gradients)."""

    layer: str
    h_y: float
    h_y_given_g: float
    v_information: float
    stderr: float
    best_family: str
    n_train: int
    n_test: int
    n_features: int
    n_classes: int
    nll: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update({f"nll_{k}": v for k, v in d.pop("nll").items()})
        return d


def standardise_features(
    xtr: torch.Tensor, xte: torch.Tensor, max_features: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both splits with the train split's mean and std (constant columns kept
    as is), then project on the train split's top ``max_features`` principal components
    when wider. Shared by the discrete and the Gaussian-decoder V-information."""
    mu, sd = xtr.mean(0), xtr.std(0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if max_features is not None and xtr.shape[1] > max_features:
        _, _, vh = torch.linalg.svd(xtr, full_matrices=False)
        basis = vh[:max_features].T
        xtr, xte = xtr @ basis, xte @ basis
    return xtr, xte


def _fit_logistic(
    xtr: torch.Tensor, ytr: torch.Tensor, k: int, weight_decay: float, max_iter: int
) -> nn.Module:
    model = nn.Linear(xtr.shape[1], k).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(xtr), ytr) + 0.5 * weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def _fit_mlp(
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    k: int,
    *,
    hidden: int,
    weight_decay: float,
    epochs: int,
    lr: float,
    seed: int,
) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(xtr.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, k)
        ).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model


def v_information(
    features: torch.Tensor,
    target: torch.Tensor,
    *,
    layer: str = "",
    families: Sequence[str] = FAMILIES,
    test_fraction: float = 0.3,
    max_features: int | None = 256,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
    hidden: int = 64,
    mlp_epochs: int = 300,
    mlp_lr: float = 1e-2,
    permutation: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VInfoResult:
    """``I_V(G → Y)`` for ``features`` ``(N, d)`` and a discrete ``target`` ``(N,)``.

    ``permutation`` (of ``range(N)``) fixes the split (the first ``round(test_fraction·N)``
    indices are held out); otherwise it is drawn from ``generator``, as is the MLP's init.
    """
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {list(families)}")
    n = features.shape[0]
    if target.shape != (n,):
        raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    classes, y = torch.unique(target.detach().cpu(), return_inverse=True)
    k = int(classes.numel())
    feats = features.detach().reshape(n, -1).double().cpu()
    perm = torch.randperm(n, generator=generator) if permutation is None else permutation
    n_test = max(1, min(n - 2, round(test_fraction * n)))
    te, tr = perm[:n_test], perm[n_test:]
    xtr, xte, ytr, yte = feats[tr], feats[te], y[tr], y[te]
    # Constant predictor: the (add-one smoothed) train label distribution.
    prior = (torch.bincount(ytr, minlength=k).double() + 1.0) / (ytr.numel() + k)
    nll_const = -prior.log()[yte]
    xtr, xte = standardise_features(xtr, xte, max_features)
    per_family: dict[str, torch.Tensor] = {}
    for fam in families:
        if k == 1:
            per_family[fam] = torch.zeros_like(nll_const)
            continue
        if fam == "logistic":
            model = _fit_logistic(xtr, ytr, k, weight_decay, max_iter)
        else:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            model = _fit_mlp(
                xtr,
                ytr,
                k,
                hidden=hidden,
                weight_decay=weight_decay,
                epochs=mlp_epochs,
                lr=mlp_lr,
                seed=seed,
            )
        with torch.no_grad():
            per_family[fam] = F.cross_entropy(model(xte), yte, reduction="none")
    best = min(per_family, key=lambda f: float(per_family[f].mean()))
    diff = nll_const - per_family[best]
    se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else math.nan
    h_y, h_yg = float(nll_const.mean()), float(per_family[best].mean())
    log.debug("layer %s: H_V(Y)=%.4f H_V(Y|G)=%.4f (%s)", layer, h_y, h_yg, best)
    return VInfoResult(
        layer,
        h_y,
        h_yg,
        h_y - h_yg,
        se,
        best,
        int(tr.numel()),
        n_test,
        int(xtr.shape[1]),
        k,
        {f: float(v.mean()) for f, v in per_family.items()},
    )


def layer_v_information(
    layer_features: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> list[dict[str, object]]:
    """:func:`v_information` for every layer (e.g. the output of
    :func:`~adversaries.measures._common.per_sample_layer_gradients`) on one shared split;
    returns the per-layer table (one dict per layer, module order)."""
    n = int(target.shape[0])
    perm = torch.randperm(n, generator=generator)
    return [
        v_information(
            feats, target, layer=name, permutation=perm, generator=generator, **kwargs
        ).to_dict()
        for name, feats in layer_features.items()
    ]


#: Height of one layer's row in :func:`layer_table_figure` (inches): room for an 8 pt name.
_LAYER_ROW_INCHES = 0.2


def plot_layer_table(
    table: Sequence[Mapping[str, object]],
    path: str | Path,
    *,
    key: str = "v_information",
    err_key: str | None = "stderr",
    title: str | None = None,
    ylabel: str | None = None,
) -> Path:
    """Bar plot of ``key`` per layer (error bars from ``err_key``) saved to ``path``
    (matplotlib's Agg canvas; no pyplot global state). Works for any per-layer table:
    V-information, :func:`~adversaries.measures.sensitivity.summarize_sensitivity`
    (``key="sensitivity"``, ``err_key="sensitivity_stderr"``), subspace distances.

    Horizontal bars, one row per layer in table order (first on top), each labelled with its
    full name on the y axis; the figure grows taller with the number of layers, so even the
    60+ parameter names of a ResNet stay readable. ``ylabel`` names the value (x) axis."""
    fig = layer_table_figure(table, key=key, err_key=err_key, title=title, ylabel=ylabel)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def layer_table_figure(
    table: Sequence[Mapping[str, object]],
    *,
    key: str = "v_information",
    err_key: str | None = "stderr",
    title: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """The figure :func:`plot_layer_table` saves (a matplotlib ``Figure`` on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = [str(row["layer"]) or "(root)" for row in table]
    values = [float(row[key]) for row in table]  # type: ignore[arg-type]
    errors = [float(row[err_key]) for row in table] if err_key else None  # type: ignore[arg-type]
    n = len(layers)
    longest = max((len(name) for name in layers), default=0)  # names take ~0.065 in a character
    fig = Figure(figsize=(max(6.4, 4.6 + 0.065 * longest), max(2.5, _LAYER_ROW_INCHES * n + 1.4)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(n), values, xerr=errors, capsize=2 if n > 20 else 3, color="tab:blue")
    ax.set_yticks(range(n), layers, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)  # first layer on top
    ax.set_xlabel(ylabel or key)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
