"""Empirical V-information of gradients about a continuous target (the input), Gaussian decoders.

Mo, Borovykh, Malekzadeh, Haddadi, Demetriou ("Quantifying and Localizing Usable Information
Leakage from Neural Network Gradients", arXiv:2105.13929) measure the *original information*
a layer's gradient ``g_l`` carries about the input ``x`` as the V-information (Xu, Zhao, Song,
Stewart, Ermon, ICLR 2020) ``I_V(g_l → X) = H_V(X|∅) − H_V(X|g_l)`` with a Gaussian-likelihood
decoder, so the NLL is a scaled MSE plus a log-variance term (docs/methods.md §2).

Estimate (choices of this implementation):

- split the samples once into train and held-out parts (``test_fraction``); the layer's
  features are standardised (train statistics) and projected on the train split's top
  ``max_features`` principal components when wider
  (:func:`~adversaries.measures.vinfo.standardise_features`);
- the target is flattened to ``(N, D)`` and, when ``target_components`` is set, projected
  on the train split's top principal components (centred with the train mean). Pixels are
  strongly correlated: on raw pixels a diagonal Gaussian would count the same information
  many times over and the diagonal null model would be far from the best Gaussian fit; on
  principal components the train covariance is diagonal, so the diagonal null model *is*
  the maximum-likelihood Gaussian. The result is then information about those ``k``
  directions only (``explained_variance`` reports the share of pixel variance they hold);
- ``H_V(X|∅)`` = held-out NLL of the Gaussian fitted to the train targets (mean and
  per-dimension or shared variance);
- ``H_V(X|G)`` = the smallest held-out NLL over the family: a linear decoder (ridge
  regression in closed form, penalty chosen per target dimension by generalised
  cross-validation on the train split among those with ``tr H ≤ n/2``; residual variance
  with the degrees-of-freedom correction ``n − tr(H) − 1``) and a one-hidden-layer ReLU MLP (mean output, learned
  homoscedastic log-variance, Adam on the Gaussian NLL with ``weight_decay``);
  ``variance`` = ``"per_dim"`` (one variance per target dimension) or ``"shared"`` (one for
  all);
- values in nats, in the target's own units (the internal rescaling by one scalar is
  undone through its log-Jacobian), total and per target dimension; ``stderr`` is the
  standard error of the paired per-sample NLL difference on the held-out split. A negative
  value means no usable information found; the minimum over two families is slightly
  optimistic.

Threat model: as for :mod:`~adversaries.measures.vinfo`, an analyst who knows the training
samples' inputs fits the decoders (an upper estimate of what a server with auxiliary data
could decode), so this measures leakage, it is not an attack.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from adversaries.measures.vinfo import standardise_features

log = logging.getLogger(__name__)

DECODERS = ("linear", "mlp")
VARIANCES = ("per_dim", "shared")
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GaussianVInfoResult:
    """Empirical V-information (nats) of one feature set about a continuous target."""

    layer: str
    h_x: float
    h_x_given_g: float
    v_information: float
    v_information_per_dim: float
    stderr: float
    best_family: str
    n_train: int
    n_test: int
    n_features: int
    target_dim: int
    explained_variance: float
    variance: str
    nll: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update({f"nll_{k}": v for k, v in d.pop("nll").items()})
        return d


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL (nats) of ``target`` ``(N, D)`` under ``N(mean, diag(var))``; ``var``
    broadcasts (``(D,)`` per dimension, or a scalar tensor shared)."""
    var = var.expand(target.shape[1])
    return 0.5 * (_LOG_2PI + var.log() + (target - mean).pow(2) / var).sum(1)


def _pool(var: torch.Tensor, variance: str) -> torch.Tensor:
    return var.mean().expand_as(var).clone() if variance == "shared" else var


#: Ridge penalties tried by generalised cross-validation, relative to ``n_train`` (the
#: features are standardised, so ``XᵀX/n`` has unit diagonal).
RIDGE_GRID = tuple(10.0**k for k in range(-6, 5))


def _fit_linear(
    xtr: torch.Tensor, ttr: torch.Tensor, *, variance: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge weights ``(p, D)`` (features and targets are train-centred, so no intercept)
    and the residual variance ``RSS/(n − tr(H) − 1)``.

    The penalty ``λ = r·n`` (``r`` in :data:`RIDGE_GRID`) is chosen per target dimension by
    generalised cross-validation on the train split, ``GCV(λ) = n·RSS/(n − tr H_λ − 1)²``
    (Golub, Heath, Wahba, Technometrics 1979; an approximation of leave-one-out error), so a
    decoder with as many features as samples does not interpolate. Penalties whose effective
    number of parameters ``tr H`` exceeds ``n/2`` are skipped: near interpolation both RSS
    and ``n − tr H`` vanish, GCV's ratio becomes meaningless and the in-sample residual
    variance badly underestimates the held-out one."""
    n = xtr.shape[0]
    u, s, vh = torch.linalg.svd(xtr, full_matrices=False)
    uty = u.T @ ttr  # (r, D)
    best_gcv = torch.full((ttr.shape[1],), math.inf, dtype=ttr.dtype)
    w = torch.zeros(xtr.shape[1], ttr.shape[1], dtype=ttr.dtype)
    var = ttr.pow(2).mean(0)
    for r in RIDGE_GRID:
        lam = r * n
        w_l = vh.T @ ((s / (s.pow(2) + lam)).unsqueeze(1) * uty)
        dof = n - float((s.pow(2) / (s.pow(2) + lam)).sum()) - 1.0
        if dof < max(1.0, 0.5 * n):
            continue
        rss = (ttr - xtr @ w_l).pow(2).sum(0)
        gcv = n * rss / dof**2
        better = gcv < best_gcv
        best_gcv = torch.where(better, gcv, best_gcv)
        w[:, better] = w_l[:, better]
        var = torch.where(better, rss / dof, var)
    return w, _pool(var.clamp_min(1e-12), variance)


class _MLPDecoder(nn.Module):
    def __init__(self, p: int, d: int, hidden: int, shared: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(p, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.log_var = nn.Parameter(torch.zeros(1 if shared else d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def _fit_mlp(
    xtr: torch.Tensor,
    ttr: torch.Tensor,
    *,
    hidden: int,
    weight_decay: float,
    epochs: int,
    lr: float,
    variance: str,
    seed: int,
) -> _MLPDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MLPDecoder(xtr.shape[1], ttr.shape[1], hidden, variance == "shared").double()
    opt = torch.optim.Adam(
        [
            {"params": model.net.parameters(), "weight_decay": weight_decay},
            {"params": [model.log_var], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    for _ in range(epochs):
        opt.zero_grad()
        gaussian_nll(ttr, model(xtr), model.log_var.exp()).mean().backward()
        opt.step()
    return model


def gaussian_v_information(
    features: torch.Tensor,
    target: torch.Tensor,
    *,
    layer: str = "",
    families: Sequence[str] = DECODERS,
    variance: str = "per_dim",
    target_components: int | None = None,
    test_fraction: float = 0.3,
    max_features: int | None = 256,
    weight_decay: float = 1e-3,
    hidden: int = 64,
    mlp_epochs: int = 300,
    mlp_lr: float = 1e-2,
    permutation: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> GaussianVInfoResult:
    """``I_V(G → X)`` in nats for ``features`` ``(N, d)`` and a continuous ``target`` ``(N, ...)``.

    ``target_components`` (``None``: all ``D`` dimensions) projects the target on the train
    split's top principal components. ``permutation`` (of ``range(N)``) fixes the split (the
    first ``round(test_fraction·N)`` indices are held out); otherwise it is drawn from
    ``generator``, as is the MLP's init.
    """
    bad = [f for f in families if f not in DECODERS]
    if bad or not families:
        raise ValueError(f"families must be a non-empty subset of {DECODERS}, got {list(families)}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    n = features.shape[0]
    if target.shape[0] != n or n < 4:
        raise ValueError(f"target must have {n} rows (>= 4), got shape {tuple(target.shape)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if target_components is not None and target_components < 1:
        raise ValueError(f"target_components must be >= 1 or None, got {target_components}")
    feats = features.detach().reshape(n, -1).double().cpu()
    tgt = target.detach().reshape(n, -1).double().cpu()
    perm = torch.randperm(n, generator=generator) if permutation is None else permutation
    n_test = max(1, min(n - 3, round(test_fraction * n)))
    te, tr = perm[:n_test], perm[n_test:]
    xtr, xte = standardise_features(feats[tr], feats[te], max_features)
    ttr, tte = tgt[tr], tgt[te]
    mu = ttr.mean(0)
    ttr, tte = ttr - mu, tte - mu
    explained = 1.0
    if target_components is not None and target_components < ttr.shape[1]:
        _, s, vh = torch.linalg.svd(ttr, full_matrices=False)
        explained = float(s[:target_components].pow(2).sum() / s.pow(2).sum().clamp_min(1e-300))
        basis = vh[:target_components].T
        ttr, tte = ttr @ basis, tte @ basis
    d = ttr.shape[1]
    # One scalar rescaling for stable fitting; its log-Jacobian d·log(scale) is added back.
    scale = float(ttr.pow(2).mean().sqrt()) or 1.0
    ttr, tte = ttr / scale, tte / scale
    log_jac = d * math.log(scale)
    nll_null = gaussian_nll(
        tte,
        torch.zeros(d, dtype=tte.dtype),
        _pool(ttr.var(0, correction=0).clamp_min(1e-12), variance),
    )
    per_family: dict[str, torch.Tensor] = {}
    for fam in families:
        if fam == "linear":
            w, var = _fit_linear(xtr, ttr, variance=variance)
            per_family[fam] = gaussian_nll(tte, xte @ w, var)
        else:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            model = _fit_mlp(
                xtr,
                ttr,
                hidden=hidden,
                weight_decay=weight_decay,
                epochs=mlp_epochs,
                lr=mlp_lr,
                variance=variance,
                seed=seed,
            )
            with torch.no_grad():
                per_family[fam] = gaussian_nll(tte, model(xte), model.log_var.exp())
    best = min(per_family, key=lambda f: float(per_family[f].mean()))
    diff = nll_null - per_family[best]
    se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else math.nan
    h_x, h_xg = float(nll_null.mean()) + log_jac, float(per_family[best].mean()) + log_jac
    log.debug("layer %s: H_V(X)=%.4f H_V(X|G)=%.4f (%s)", layer, h_x, h_xg, best)
    return GaussianVInfoResult(
        layer,
        h_x,
        h_xg,
        h_x - h_xg,
        (h_x - h_xg) / d,
        se,
        best,
        int(tr.numel()),
        n_test,
        int(xtr.shape[1]),
        d,
        explained,
        variance,
        {f: float(v.mean()) + log_jac for f, v in per_family.items()},
    )


def layer_gaussian_v_information(
    layer_features: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> list[dict[str, object]]:
    """:func:`gaussian_v_information` for every layer on one shared split (so one shared
    target projection); returns the per-layer table (one dict per layer, module order)."""
    perm = torch.randperm(int(target.shape[0]), generator=generator)
    return [
        gaussian_v_information(
            feats,
            target,
            layer=name,
            permutation=perm,
            generator=generator,
            **kwargs,
        ).to_dict()
        for name, feats in layer_features.items()
    ]
