"""Server-side analyses of attacked updates: predicted leakage next to the attacks' measured one.

An analysis is analyst-side, not an attack: it is given the client's true batch (the
:class:`~fl_privsim.engine.scoring.Scorer` reproduces it) and the observation's global model. The
attack runner runs the ``[[analyses]]`` after the attacks, on the same targets (single clients;
aggregates are skipped), logs each result to ``metrics.jsonl`` with source ``analysis/<name>``
and summarises it in ``summary.json`` under ``"analyses"``.

``i2f`` (Zhang et al., NeurIPS 2023; :mod:`adversaries.measures.i2f`): the expected I²F of the
client's defense noise, ``E_δ ‖(JJᵀ + εI)⁻¹Jδ‖`` (``exact``) and ``E_δ ‖Jδ‖/λ_max`` (the lower
bound), with ``J`` taken at the global model over the client's whole batch (the update is the
batch-mean gradient, so one result per update). The noise δ is in the space of the
observation's gradient (:meth:`~adversaries.base.Observation.gradient`): for FedAvg with
``K`` local steps and learning rate ``η``, noise of std ``s`` on the update is ``s/(ηK)`` there,
per-step noise is ``s/√K``. ``noise = "auto"`` reads the configured ``[[defenses]]``
(:func:`noise_from_defenses`); the other defenses (pruning, quantization, ...) are not part of
the prediction.

Logged keys: ``lower_bound``, ``exact`` (input-space L2 norms over the whole batch, in the
model's normalised units), ``lower_bound_rmse``, ``exact_rmse`` (the same as a per-entry RMSE
in [0, 1] pixel units, ``norm/√d_x · rms(std)``, comparable with ``√mse`` of the attacks),
``lambda_max``, ``noise_scale`` (σ or b in gradient space), the Monte Carlo standard errors
and ``seconds``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adversaries.measures.i2f import i2f_expected
from clients.defenses import DEFENSES
from clients.defenses.accounting import sampling_rate
from clients.defenses.dp_sgd import noise_for_target
from clients.defenses.schedules import sigma_at
from fl_privsim.core import plugins
from fl_privsim.core.errors import ConfigError

#: The analyses (``[[analyses]] name``): the registry :data:`fl_privsim.core.plugins.ANALYSES`;
#: each is a class built with ``(cfg, **params)`` that registers itself.
ANALYSIS_NAMES = plugins.ANALYSES
I2F_NOISES = ("auto", "gaussian", "laplace", "none")


@dataclass(frozen=True)
class NoiseModel:
    """i.i.d. noise on every entry of the observation's gradient: ``kind`` (gaussian: σ =
    ``scale``; laplace: b = ``scale``) and where it comes from."""

    kind: str
    scale: float
    source: str


def _combine(parts: Sequence[NoiseModel]) -> NoiseModel | None:
    """Independent noises add: one part stays as it is; several are approximated by a
    Gaussian of the summed variance (Laplace b has variance 2b²)."""
    parts = [p for p in parts if p.scale > 0]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    var = sum(p.scale**2 * (2.0 if p.kind == "laplace" else 1.0) for p in parts)
    return NoiseModel("gaussian", math.sqrt(var), "+".join(p.source for p in parts))


def noise_from_defenses(
    cfg: Any, server_round: int = 1, dataset_size: int = 0
) -> NoiseModel | None:
    """The noise the client's ``[[defenses]]`` add, in the space of the observation's gradient.

    - ``noise``: σ (or b) = ``scale``; on the update of FedAvg it is divided by ``lr·K``, per
      step (``apply_to = "step"``) by ``√K`` (the gradient is the mean over K steps; Laplace
      over K > 1 steps becomes a Gaussian of the same variance).
    - ``dp_sgd``: ``σ·C/B/√K`` (σ = ``noise_multiplier``, or Opacus' σ for ``target_epsilon`` at
      q = ``sample_rate`` or B/``dataset_size``; C = ``max_grad_norm``; B = ``client.batch_size``).
    - ``dynamic_dp``: ``σ_t·C/B/√K`` with σ_t from the schedule at this round (RMS over the
      steps for ``step_unit = "step"``); C = ``clip_norm`` for fixed clipping, else ``clip_max``
      (an upper bound: the data-dependent C_t is at most that).

    Returns ``None`` when no defense adds noise.
    """

    fedavg = cfg.federation.protocol == "fedavg"
    k = cfg.client.local_steps if fedavg else 1
    lr, b = cfg.client.lr, cfg.client.batch_size
    parts: list[NoiseModel] = []
    for i, d in enumerate(cfg.defenses):
        src = f"defense{i}.{d.name}"
        if d.name == "noise":
            dfn = DEFENSES.create(d.name, **d.params)
            if dfn.stage == "update":
                s = dfn.scale / (lr * k) if fedavg else dfn.scale
                if fedavg and lr <= 0:
                    raise ConfigError("analyses: i2f noise of a FedAvg update needs client.lr > 0")
                parts.append(NoiseModel(dfn.distribution, s, src))
            elif k == 1:
                parts.append(NoiseModel(dfn.distribution, dfn.scale, src))
            else:
                sd = dfn.scale * (math.sqrt(2.0) if dfn.distribution == "laplace" else 1.0)
                parts.append(NoiseModel("gaussian", sd / math.sqrt(k), src))
        elif d.name == "dp_sgd":
            dfn = DEFENSES.create(d.name, **d.params)
            sigma = dfn.sigma
            if dfn.target_epsilon:
                q = sampling_rate(dfn.sample_rate, b, dataset_size)
                sigma = noise_for_target(dfn.target_epsilon, dfn.delta, q, dfn.steps, dfn.epochs)
            parts.append(NoiseModel("gaussian", sigma * dfn.max_grad_norm / b / math.sqrt(k), src))
        elif d.name == "dynamic_dp":
            dfn = DEFENSES.create(d.name, **d.params)
            r = max(0, server_round - 1)
            ts = [r] if dfn.step_unit == "round" else [r * k + j for j in range(k)]
            sigma = math.sqrt(
                sum(sigma_at(dfn.schedule, t, dfn.horizon) ** 2 for t in ts) / len(ts)
            )
            c = dfn.clip_norm if dfn.fixed_clipping else dfn.clip_max
            parts.append(NoiseModel("gaussian", sigma * c / b / math.sqrt(k), src))
    return _combine(parts)


@plugins.ANALYSES.register("i2f")
class I2FAnalysis:
    """Expected I²F of the client's defense noise on its true batch (see the module doc).

    Parameters
    ----------
    noise:
        ``auto`` (from ``[[defenses]]``), ``gaussian``/``laplace`` (with ``scale``, σ or b in
        the observation's gradient space) or ``none`` (skipped: I²F of no noise is 0).
    scale:
        σ or b for an explicit ``noise`` (> 0).
    eps:
        ε of the regularised exact value ``‖(JJᵀ + εI)⁻¹Jδ‖`` (>= 0).
    mc_samples:
        Monte Carlo draws of δ (>= 1).
    exact:
        Also compute the exact value by conjugate gradient (else only the lower bound).
    cg_max_iter:
        CG iterations per draw.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        noise: str = "auto",
        scale: float = 0.0,
        eps: float = 1.0,
        mc_samples: int = 8,
        exact: bool = True,
        cg_max_iter: int = 200,
    ) -> None:
        if noise not in I2F_NOISES:
            raise ConfigError(f"noise must be one of {', '.join(I2F_NOISES)}, got {noise!r}")
        num = (int, float)
        if (
            isinstance(scale, bool)
            or not isinstance(scale, num)
            or scale < 0
            or not math.isfinite(scale)
        ):
            raise ConfigError(f"scale must be a finite number >= 0, got {scale!r}")
        if noise in ("gaussian", "laplace") and scale <= 0:
            raise ConfigError(f"noise = {noise!r} needs scale > 0")
        if isinstance(eps, bool) or not isinstance(eps, num) or eps < 0:
            raise ConfigError(f"eps must be a number >= 0, got {eps!r}")
        for key, val in (("mc_samples", mc_samples), ("cg_max_iter", cg_max_iter)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {val!r}")
        if not isinstance(exact, bool):
            raise ConfigError(f"exact must be true or false, got {exact!r}")
        self.cfg, self.noise, self.scale, self.eps = cfg, noise, float(scale), float(eps)
        self.mc_samples, self.exact, self.cg_max_iter = mc_samples, exact, cg_max_iter
        if noise == "auto":
            noise_from_defenses(cfg)  # a bad [[defenses]] entry fails at load time

    def noise_model(self, server_round: int, dataset_size: int) -> NoiseModel | None:
        """The noise this analysis assumes for an update of ``server_round``."""
        if self.noise == "none":
            return None
        if self.noise == "auto":
            return noise_from_defenses(self.cfg, server_round, dataset_size)
        return NoiseModel(self.noise, self.scale, "params")

    def __call__(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        noise: NoiseModel,
        data_std: Sequence[float],
        generator: torch.Generator,
    ) -> dict[str, float]:
        """I²F of ``noise`` at ``model`` for the batch ``(x, y)`` (normalised inputs)."""

        t0 = time.perf_counter()
        (res,) = i2f_expected(
            model,
            x,
            y,
            noise=noise.kind,
            scale=noise.scale,
            n_draws=self.mc_samples,
            per_sample=False,
            eps=self.eps,
            exact=self.exact,
            cg_max_iter=self.cg_max_iter,
            generator=generator,
        )
        to_rmse = math.sqrt(sum(s * s for s in data_std) / len(data_std)) / math.sqrt(x.numel())
        out = {
            "lower_bound": res.lower_bound_mean,
            "lower_bound_rmse": res.lower_bound_mean * to_rmse,
            "lambda_max": res.lambda_max,
            "jdelta_norm": res.jdelta_norm_mean,
            "noise_scale": noise.scale,
            "mc_samples": float(res.n_draws),
        }
        if not math.isnan(res.lower_bound_stderr):
            out["lower_bound_stderr"] = res.lower_bound_stderr
        if res.exact_mean is not None:
            out["exact"] = res.exact_mean
            out["exact_rmse"] = res.exact_mean * to_rmse
            out["cg_converged"] = float(bool(res.all_converged))
            if res.exact_stderr is not None and not math.isnan(res.exact_stderr):
                out["exact_stderr"] = res.exact_stderr
        out["seconds"] = time.perf_counter() - t0
        return out


@dataclass
class AnalysisPlan:
    """One configured analysis and what it targets (single clients only)."""

    name: str
    analysis: I2FAnalysis
    rounds: set[int]
    clients: set[int]

    def wants(self, server_round: int, client_id: int | None) -> bool:
        return client_id is not None and server_round in self.rounds and client_id in self.clients


@plugins.CONFIG_CHECKS.register("analyses")
def check_config(cfg: Any) -> None:
    """Config-load hook: build every ``[[analyses]]`` entry (a bad one is one ConfigError)."""
    build_analyses(cfg)


def build_analyses(cfg: Any) -> list[AnalysisPlan]:
    """Instantiate ``cfg.analyses`` (a bad entry raises :class:`ConfigError` with its path)."""
    plans = []
    for i, a in enumerate(getattr(cfg, "analyses", ())):
        where = f"analyses[{i}]"
        if a.name not in ANALYSIS_NAMES:
            raise ConfigError(
                f"{where}.name: {a.name!r} is not an analysis; allowed: {', '.join(ANALYSIS_NAMES)}"
            )
        for r in a.targets.rounds:
            if r > cfg.federation.rounds:
                raise ConfigError(
                    f"{where}.targets.rounds: round {r} is after the last round ({cfg.federation.rounds})"
                )
        for c in a.targets.clients:
            if c >= cfg.federation.num_clients:
                raise ConfigError(
                    f"{where}.targets.clients: client {c} does not exist "
                    f"(clients are 0..{cfg.federation.num_clients - 1})"
                )
        try:
            analysis = ANALYSIS_NAMES.get(a.name)(cfg, **a.params)
        except ConfigError as exc:
            raise ConfigError(f"{where}.params: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.params: {exc}") from None
        plans.append(AnalysisPlan(a.name, analysis, set(a.targets.rounds), set(a.targets.clients)))
    return plans


def summarize(
    rows: Mapping[str, Sequence[Mapping[str, float]]],
    outcomes: Mapping[str, Mapping[str, int]],
    noise: Mapping[str, str],
) -> dict[str, dict[str, Any]]:
    """Per analysis: the mean of each logged value and the outcome counts."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(rows) | set(outcomes)):
        vals = rows.get(name, [])
        entry: dict[str, Any] = {}
        for k in (
            "lower_bound_rmse",
            "exact_rmse",
            "lower_bound",
            "exact",
            "lambda_max",
            "noise_scale",
            "seconds",
        ):
            xs = [r[k] for r in vals if k in r]
            if xs:
                entry[k] = float(sum(xs) / len(xs))
        entry["analysed"] = float(len(vals))
        for outcome in ("skipped", "failed"):
            entry[outcome] = float(outcomes.get(name, {}).get(outcome, 0))
        if name in noise:
            entry["noise"] = noise[name]
        out[name] = entry
    return out
