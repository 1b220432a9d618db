"""Canary auditing of DP-SGD with the attribute game: an empirical ε lower bound.

The attribute game under DP-SGD is a replace-one distinguishing experiment: the target record
(x_ns, a = s, y) is in client 0's batch with s ~ Bernoulli(1/2), and the release is the real
client update (:class:`~adversaries.inference.release.Release` with the ``dp_sgd`` defense,
one Opacus step). Any adversary's test "ŝ = 1 iff score ≥ τ" has (TPR, FPR) that an
(ε, δ)-DP mechanism must keep within ``TPR ≤ e^ε·FPR + δ`` and
``1 − FPR ≤ e^ε·(1 − TPR) + δ``. With exact Clopper–Pearson intervals on TPR and FPR this
gives, with confidence ≥ 1 − α (two two-sided (1 − α/2)… see :func:`epsilon_lower_bound`),

    ε_lb = max(0, log((TPR_lo − δ) / FPR_hi), log((1 − FPR_hi − δ) / (1 − TPR_lo)))

(Jagielski, Ullman & Oprea, "Auditing Differentially Private Machine Learning: How Private
is Private SGD?", NeurIPS 2020; Nasr, Song, Thakurta, Papernot & Carlini, "Adversary
Instantiation: Lower Bounds for Differentially Private Machine Learning", S&P 2021). Both
terms use the pessimistic end of each interval, so ε_lb is a valid lower bound: it can only
exceed the true ε of the mechanism with probability ≤ α.

Adversary (white-box, as in those papers): it knows θ, the clipping norm C, the batch size B
and the K clients per aggregate, and x_ns, y. It computes the clipped per-sample gradients
c_0, c_1 of the two hypotheses (flat clipping over all parameters, as Opacus does), estimates
the rest of the aggregate's clipped sum with the mean clipped gradient m of its auxiliary
pool, and scores the Gaussian log-likelihood-ratio statistic
``(⟨K·B·u − (K·B − 1)·m, d⟩ − (‖c_1‖² − ‖c_0‖²)/2) / ‖d‖`` with d = c_1 − c_0 (> 0
favours s = 1; the natural threshold is 0 for every target).

Canaries: the non-sensitive features of a record are optimised by projected gradient ascent
(Adam, inside the per-column range of the auxiliary pool) to maximise ‖c_1 − c_0‖, the
separation of the two attribute values' per-sample gradients *after* clipping (at most 2C:
the sensitivity of the clipped sum under replacement). Natural records (a random pool record
per trial, as in the plain attribute game) are audited beside the canary.

The threshold is chosen on the first half of the trials (maximising the bound there) and the
bound is computed on the second half, so the selection does not bias the interval.

Accountant ε reported beside ε_lb (one DP-SGD step per trial, q = 1: the target is always in
the batch), at the defense's δ:

- ``epsilon``: RDP accountant (the one the ``dp_sgd`` defense uses) for the game's
  replace-one adjacency: sensitivity 2C, i.e. noise multiplier σ/2;
- ``epsilon_add_remove``: what the ``dp_sgd`` defense reports for one step (add/remove
  adjacency, sensitivity C);
- ``epsilon_exact``: the exact ε(δ) of one Gaussian mechanism with μ = 2/σ (Balle & Wang,
  ICML 2018), the tightest ceiling ε_lb can reach.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize, stats
from torch import nn
from torch.func import functional_call, grad

from adversaries.inference.games import Game, Observations, Pool, sample_secrets
from adversaries.inference.metrics import auc_score, clopper_pearson, game_metrics, save_roc_plot
from adversaries.inference.release import Release, flat_per_sample_gradients, param_layout
from clients.defenses.accounting import PrivacyAccountant
from clients.defenses.dp_sgd import DPSGD
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.results import RunFolder, atomic_write_text
from fl_privsim.core.seeding import numpy_rng

logger = logging.getLogger(__name__)

__all__ = [
    "AuditScorer",
    "Canary",
    "accountant_epsilons",
    "audit_bound",
    "craft_canary",
    "epsilon_lower_bound",
    "gaussian_epsilon",
    "run_audit",
]


# ---------------------------------------------------------------------------------------------
# the bound


def epsilon_lower_bound(
    tp: int, n_pos: int, fp: int, n_neg: int, delta: float, *, alpha: float = 0.05
) -> dict[str, Any]:
    """Empirical ε lower bound of one threshold test from its counts (Jagielski et al. 2020).

    ``tp`` of ``n_pos`` trials with s = 1 and ``fp`` of ``n_neg`` with s = 0 were called 1.
    TPR and FPR get two-sided (1 − alpha) Clopper–Pearson intervals
    (:func:`~adversaries.inference.metrics.clopper_pearson`); the bound takes the pessimistic
    end of each: ``max(0, log((TPR_lo − δ)/FPR_hi), log((1 − FPR_hi − δ)/(1 − TPR_lo)))``.
    A log of a non-positive numerator, or of a ratio < 1, contributes 0. Returns the bound and
    the rates with their intervals.
    """
    if n_pos < 1 or n_neg < 1:
        raise ValueError("need at least one trial of each secret")
    tpr_lo, tpr_hi = clopper_pearson(int(tp), int(n_pos), alpha)
    fpr_lo, fpr_hi = clopper_pearson(int(fp), int(n_neg), alpha)

    def safe_log(num: float, den: float) -> float:
        if num <= 0:
            return 0.0
        if den <= 0:
            return math.inf
        return max(0.0, math.log(num / den))

    eps = max(0.0, safe_log(tpr_lo - delta, fpr_hi), safe_log(1.0 - fpr_hi - delta, 1.0 - tpr_lo))
    return {
        "epsilon_lower_bound": eps,
        "tpr": tp / n_pos,
        "fpr": fp / n_neg,
        "tpr_ci": [tpr_lo, tpr_hi],
        "fpr_ci": [fpr_lo, fpr_hi],
    }


def audit_bound(
    secrets: np.ndarray,
    scores: np.ndarray,
    delta: float,
    *,
    alpha: float = 0.05,
    max_thresholds: int = 200,
) -> dict[str, Any]:
    """ε_lb from a game's scores: the threshold τ is chosen on the first half of the trials
    (the one maximising the bound there, among at most ``max_thresholds`` score quantiles),
    the bound of "ŝ = 1 iff score ≥ τ" is computed on the second half."""
    s = np.asarray(secrets).astype(np.int64).reshape(-1)
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size != x.size or s.size < 4:
        raise ValueError("need matching secrets and scores, at least 4 trials")
    half = s.size // 2
    sel_s, sel_x, ev_s, ev_x = s[:half], x[:half], s[half:], x[half:]

    def counts(ss: np.ndarray, xs: np.ndarray, tau: float) -> tuple[int, int, int, int]:
        call = xs >= tau
        return (
            int(np.sum(call & (ss == 1))),
            int(np.sum(ss == 1)),
            int(np.sum(call & (ss == 0))),
            int(np.sum(ss == 0)),
        )

    cands = (
        np.unique(np.quantile(sel_x, np.linspace(0, 1, max_thresholds)))
        if sel_x.size
        else np.array([0.0])
    )
    best_tau = 0.0
    if (
        sel_s.min() != sel_s.max()
    ):  # vectorised over thresholds; Clopper–Pearson ends from beta quantiles
        npos, nneg = int(np.sum(sel_s == 1)), int(np.sum(sel_s == 0))
        call = sel_x[None, :] >= cands[:, None]
        tp, fp = (call & (sel_s == 1)).sum(1), (call & (sel_s == 0)).sum(1)
        a2 = alpha / 2
        tpr_lo = np.where(tp == 0, 0.0, stats.beta.ppf(a2, np.maximum(tp, 1), npos - tp + 1))
        fpr_hi = np.where(fp == nneg, 1.0, stats.beta.ppf(1 - a2, fp + 1, np.maximum(nneg - fp, 1)))
        with np.errstate(divide="ignore", invalid="ignore"):
            e1 = np.log(np.clip(tpr_lo - delta, 1e-300, None) / fpr_hi)
            e2 = np.log(
                np.clip(1 - fpr_hi - delta, 1e-300, None) / np.clip(1 - tpr_lo, 1e-300, None)
            )
        best_tau = float(cands[int(np.argmax(np.nan_to_num(np.maximum(e1, e2), nan=-np.inf)))])
    if ev_s.min() == ev_s.max():
        raise ValueError("the evaluation half has one secret only; use more trials")
    out = epsilon_lower_bound(*counts(ev_s, ev_x, best_tau), delta, alpha=alpha)
    out.update(
        threshold=best_tau,
        selection_trials=int(half),
        evaluation_trials=int(s.size - half),
        auc=auc_score(s, x),
        alpha=alpha,
    )
    return out


# ---------------------------------------------------------------------------------------------
# the accountant's ε


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε(δ) of the Gaussian mechanism with sensitivity/σ = μ (Balle & Wang, ICML 2018):
    the ε solving Φ(μ/2 − ε/μ) − e^ε·Φ(−μ/2 − ε/μ) = δ (0 when already ≤ δ at ε = 0)."""

    def d(eps: float) -> float:
        return (
            float(
                stats.norm.cdf(mu / 2 - eps / mu)
                - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu)
            )
            - delta
        )

    if d(0.0) <= 0:
        return 0.0
    hi = 1.0
    while d(hi) > 0:
        hi *= 2
    return float(optimize.brentq(d, 0.0, hi, xtol=1e-10))


def accountant_epsilons(sigma: float, delta: float, steps: int = 1) -> dict[str, float]:
    """ε(δ) of ``steps`` DP-SGD steps with noise multiplier σ and q = 1 (see the module docstring)."""

    def rdp(noise: float) -> float:
        acc = PrivacyAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=noise, sample_rate=1.0)
        return acc.epsilon(delta)

    return {
        "epsilon": rdp(sigma / 2),
        "epsilon_add_remove": rdp(sigma),
        "epsilon_exact": gaussian_epsilon(2.0 * math.sqrt(steps) / sigma, delta),
    }


# ---------------------------------------------------------------------------------------------
# clipped gradients, the adversary's score, canaries


def clip_rows(g: torch.Tensor, c: float) -> torch.Tensor:
    """Flat per-sample clipping to norm ``c`` as Opacus does (factor min(1, C / (‖g‖ + 1e-6)))."""
    clipped: torch.Tensor = g * (c / (g.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    return clipped


class AuditScorer:
    """The white-box adversary's log-likelihood-ratio statistic (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        attr_column: int,
        max_grad_norm: float,
        batch_size: int,
        clients_per_aggregate: int = 1,
        aux: Pool | None = None,
    ) -> None:
        self.model, self.attr, self.c = model, attr_column, float(max_grad_norm)
        self.n = int(batch_size) * int(clients_per_aggregate)
        self.rest: torch.Tensor | None
        if aux is not None and self.n > 1:
            self.rest = clip_rows(flat_per_sample_gradients(model, aux.x, aux.y), self.c).mean(0)
        else:
            self.rest = None

    def score(self, obs: Observations) -> np.ndarray:
        if obs.target_x is None or obs.target_y is None:
            raise ConfigError("the audit needs the attribute game's target")
        x0, x1 = obs.target_x.clone(), obs.target_x.clone()
        x0[:, self.attr], x1[:, self.attr] = 0.0, 1.0
        c0 = clip_rows(flat_per_sample_gradients(self.model, x0, obs.target_y), self.c)
        c1 = clip_rows(flat_per_sample_gradients(self.model, x1, obs.target_y), self.c)
        v = obs.updates * self.n
        if self.rest is not None:
            v = v - (self.n - 1) * self.rest
        d = c1 - c0
        stat = ((v * d).sum(1) - 0.5 * (c1.square().sum(1) - c0.square().sum(1))) / (
            d.norm(dim=1) + 1e-12
        )
        scores: np.ndarray = stat.detach().to(torch.float64).numpy()
        return scores


@dataclass(frozen=True)
class Canary:
    """A crafted record: ``x`` with the attribute column 0, label ``y`` and the achieved
    separation ‖c_1 − c_0‖ / C (at most 2)."""

    x: torch.Tensor
    y: int
    separation: float


def craft_canary(
    model: nn.Module,
    aux: Pool,
    *,
    attr_column: int,
    max_grad_norm: float,
    steps: int = 100,
    restarts: int = 4,
    lr: float = 0.1,
    seed: int = 0,
) -> Canary:
    """Gradient ascent on the non-sensitive features of ``restarts`` × classes starting records
    (random auxiliary records, each tried with every label) to maximise the separation of the
    clipped per-sample gradients of a = 0 and a = 1; features stay in the auxiliary pool's
    per-column range. Returns the best canary."""
    names = [n for n, _, _, _ in param_layout(model)]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    buffers = dict(model.named_buffers())
    c = float(max_grad_norm)
    classes = int(aux.y.max()) + 1
    flat = aux.x.reshape(len(aux), -1)
    lo, hi = flat.min(0).values, flat.max(0).values
    shape = aux.x.shape[1:]

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **buffers}, (x.reshape(1, *shape),))
        ce: torch.Tensor = F.cross_entropy(out, y.reshape(1))
        return ce

    def clipped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = grad(loss)(params, x, y)
        v = torch.cat([g[n].reshape(-1) for n in names])
        scaled: torch.Tensor = v * (c / (v.norm() + 1e-6)).clamp(max=1.0)
        return scaled

    def separation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x0 = x.clone()
        x0[attr_column] = 0.0
        x1 = x.clone()
        x1[attr_column] = 1.0
        sep: torch.Tensor = (clipped(x1, y) - clipped(x0, y)).norm() / c
        return sep

    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(aux), (restarts,), generator=gen)
    mask = torch.ones(flat.shape[1])
    mask[attr_column] = 0.0
    best: Canary | None = None
    for i in starts.tolist():
        for label in range(classes):
            y = torch.tensor(label)
            x = flat[i].clone()
            x[attr_column] = 0.0
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                (-separation(x, y)).backward()
                assert x.grad is not None  # set by backward()
                x.grad.mul_(mask)
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                    x[attr_column] = 0.0
            with torch.no_grad():
                sep = float(separation(x.detach(), y))
            if best is None or sep > best.separation:
                best = Canary(x.detach().reshape(shape).clone(), label, sep)
    assert best is not None
    logger.info("canary: separation %.3f C (label %d)", best.separation, best.y)
    return best


# ---------------------------------------------------------------------------------------------
# the audit


def _dp_sgd(release: Release) -> Any:

    found = [d for d in release.defenses if isinstance(d, DPSGD)]
    if not found:
        raise ConfigError('game.audit needs the dp_sgd defense ([[defenses]] name = "dp_sgd")')
    if release.protocol != "fedsgd":
        raise ConfigError(
            'game.audit accounts one DP-SGD step per trial: use game.protocol = "fedsgd"'
        )
    return found[0]


def _canary_play(
    game: Game,
    pool: Pool,
    release: Release,
    canary: Canary,
    n_trials: int,
    rng: np.random.Generator,
    stream: int,
) -> tuple[Observations, np.ndarray]:
    """The attribute game with the canary as the target of every trial."""
    secrets = sample_secrets(n_trials, rng)
    n, t = len(pool), n_trials
    both = canary.x.unsqueeze(0).repeat(2, *([1] * canary.x.dim()))
    both.reshape(2, -1)[:, game.attr_column] = torch.tensor([0.0, 1.0])
    x = torch.cat([pool.x, both])
    y = torch.cat([pool.y, torch.full((2,), canary.y, dtype=pool.y.dtype)])
    index = torch.from_numpy(rng.integers(0, n, (t, game.clients_per_aggregate, game.batch_size)))
    index[:, 0, 0] = n + torch.from_numpy(secrets)
    updates = release.updates(x, y, index, stream=stream)
    masked = canary.x.unsqueeze(0).repeat(t, *([1] * canary.x.dim()))
    return (
        Observations(
            updates=updates.detach(),
            target_x=masked,
            target_y=torch.full((t,), canary.y, dtype=pool.y.dtype),
        ),
        secrets,
    )


def run_audit(
    model: nn.Module,
    release: Release,
    pool: Pool,
    aux: Pool,
    *,
    attr_column: int,
    trials: int,
    batch_size: int = 1,
    clients_per_aggregate: int = 1,
    seed: int = 0,
    alpha: float = 0.05,
    canary_steps: int = 100,
    canary_restarts: int = 4,
    natural: bool = True,
    canary: Canary | None = None,
) -> dict[str, Any]:
    """Audit DP-SGD with natural records and a crafted canary (``canary``, or crafted here with
    :func:`craft_canary`: it depends on θ and C only, so one can serve several σ); returns the accountant's ε
    (:func:`accountant_epsilons`), ``natural`` and ``canary`` (:func:`audit_bound` of each,
    plus their secrets and scores under ``_secrets``/``_scores``), and the canary's separation."""

    dp = _dp_sgd(release)
    game = Game(
        "attribute",
        batch_size=batch_size,
        clients_per_aggregate=clients_per_aggregate,
        attr_column=attr_column,
    )
    scorer = AuditScorer(
        model,
        attr_column=attr_column,
        max_grad_norm=dp.max_grad_norm,
        batch_size=batch_size,
        clients_per_aggregate=clients_per_aggregate,
        aux=aux,
    )
    out: dict[str, Any] = {}
    if natural:
        obs, secrets = game.play(pool, release, trials, numpy_rng(seed, "attack", 20), stream=10)
        scores = scorer.score(obs)
        out["natural"] = {
            **audit_bound(secrets, scores, dp.delta, alpha=alpha),
            "_secrets": secrets,
            "_scores": scores,
        }
    canary = canary or craft_canary(
        model,
        aux,
        attr_column=attr_column,
        max_grad_norm=dp.max_grad_norm,
        steps=canary_steps,
        restarts=canary_restarts,
        seed=seed,
    )
    obs, secrets = _canary_play(
        game, pool, release, canary, trials, numpy_rng(seed, "attack", 21), stream=11
    )
    scores = scorer.score(obs)
    out["canary"] = {
        **audit_bound(secrets, scores, dp.delta, alpha=alpha),
        "separation": canary.separation,
        "label": canary.y,
        "_secrets": secrets,
        "_scores": scores,
    }
    sigma = float(dp.sigma)
    out.update(
        noise_multiplier=sigma,
        max_grad_norm=float(dp.max_grad_norm),
        delta=float(dp.delta),
        **accountant_epsilons(sigma, dp.delta),
    )
    return out


def write_audit(
    cfg: Any,
    run_dir: Any,
    model: nn.Module,
    release: Release,
    pool: Pool,
    aux: Pool,
    attr_column: int,
    model_accuracy: float,
    t0: float,
) -> dict[str, Any]:
    """``fl-privsim game`` with ``[game] audit = true``: run :func:`run_audit` and write the run
    folder (``summary.json`` with ``epsilon_lower_bound`` (canary), ``epsilon`` and the rest,
    ``natural``/``canary`` details, ``roc.png`` and ``scores.csv`` of the canary trials)."""
    import time

    g = cfg.game
    res = run_audit(
        model,
        release,
        pool,
        aux,
        attr_column=attr_column,
        trials=g.trials,
        batch_size=g.batch_size,
        clients_per_aggregate=g.clients_per_aggregate,
        seed=cfg.seed,
        alpha=g.audit_alpha,
        canary_steps=g.canary_steps,
    )
    secrets, scores = res["canary"].pop("_secrets"), res["canary"].pop("_scores")
    res["natural"].pop("_secrets")
    res["natural"].pop("_scores")
    summary: dict[str, Any] = {
        "game": "attribute",
        "audit": True,
        "dataset": cfg.data.name,
        "attribute": cfg.data.sensitive,
        "adversary": "white-box likelihood-ratio (audit)",
        "attack_model": "clipped-gradient projection",
        "batch_size": g.batch_size,
        "clients_per_aggregate": g.clients_per_aggregate,
        "aggregation_size": g.batch_size * g.clients_per_aggregate,
        "defenses": [dc.name for dc in cfg.defenses],
        "release_path": "vectorised" if release.fast else "exact",
        "model_accuracy": model_accuracy,
        "epsilon_lower_bound": res["canary"]["epsilon_lower_bound"],
        "epsilon_lower_bound_natural": res["natural"]["epsilon_lower_bound"],
        **{
            k: res[k]
            for k in (
                "epsilon",
                "epsilon_add_remove",
                "epsilon_exact",
                "noise_multiplier",
                "max_grad_norm",
                "delta",
            )
        },
        "natural": res["natural"],
        "canary": res["canary"],
        **game_metrics(secrets, scores, threshold=0.0, n_boot=g.bootstrap, seed=cfg.seed),
        "seconds": {"total": time.perf_counter() - t0},
    }
    save_roc_plot(
        run_dir / "roc.png",
        secrets,
        scores,
        title=f"canary audit (dp_sgd, sigma = {res['noise_multiplier']})",
    )
    atomic_write_text(
        run_dir / "scores.csv",
        "trial,secret,score\n"
        + "".join(
            f"{i},{int(s)},{float(x):.6g}\n"
            for i, (s, x) in enumerate(zip(secrets, scores, strict=True))
        ),
    )
    RunFolder(run_dir).write_summary(summary)
    return summary
