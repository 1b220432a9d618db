"""Adversaries of the inference games: a meta-classifier trained on shadow updates, and a
loss-based membership baseline.

Meta-classifier (Li et al., arXiv:2408.16913, CCS 2024; Melis et al., "Exploiting Unintended
Feature Leakage in Collaborative Learning", S&P 2019): the adversary plays the game itself on
its auxiliary pool (disjoint from the challenger's) at the same global model θ, with secrets
it draws, and trains a classifier from the shadow updates to the secret:

- features: the flattened update of the last layer (``"last"``) or of all layers
  (``"all"``), plus, when the game gives the adversary a target, the update's alignment with
  the target's gradients at θ (attribute: cosines with ∇ℓ(x_ns, a = 0, y) and
  ∇ℓ(x_ns, a = 1, y) and the projection on their difference; membership: cosine with and
  projection on the target's gradient; user: the same with the user's mean gradient);
- models: ``"mlp"`` (scikit-learn ``MLPClassifier``, one hidden layer of 64) or
  ``"random_forest"`` (Melis et al.'s baseline: 100 trees, ``min_samples_leaf`` 5), after
  standardisation.

The adversary only ever receives :class:`~adversaries.inference.games.Observations` (no
secret field) in :meth:`MetaClassifier.score`; secrets reach it in :meth:`MetaClassifier.fit`
only for its own shadow trials.

Multi-round observation (:class:`MultiRound`; Li et al.'s "one observation vs several
rounds"): the adversary sees the same batch released at R global models and holds one
meta-classifier per round (each trained on shadow updates at that round's model);
``combine = "mean_logit"`` averages the R classifiers' logits (as Li et al. average the
logits across rounds), ``"concat"`` trains one classifier on the R rounds' features side by
side.

Loss baseline for membership (in the spirit of Yeom et al. 2018's loss attack, adapted to
one update): score = ℓ(θ, z) − ℓ(θ − η·u, z), how much the released update lowers the
target's loss.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adversaries.inference.games import Observations
from adversaries.inference.release import flat_per_sample_gradients, param_layout
from fl_privsim.core.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["ATTACK_MODELS", "COMBINE", "FEATURES", "LossBaseline", "MetaClassifier", "MultiRound"]

ATTACK_MODELS: tuple[str, ...] = ("mlp", "random_forest")
FEATURES: tuple[str, ...] = ("last", "all", "alignment")
COMBINE: tuple[str, ...] = ("mean_logit", "concat")


def _cos_proj(u: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dot = (u * g).sum(1)
    cos = dot / (u.norm(dim=1) * g.norm(dim=1) + 1e-12)
    return cos, dot / (g.square().sum(1) + 1e-12)


class MetaClassifier:
    """Meta-classifier adversary (see the module docstring).

    Parameters
    ----------
    model:
        The global model θ (public: the server sent it).
    attack_model:
        ``"mlp"`` or ``"random_forest"``.
    features:
        ``"last"`` or ``"all"`` layers of the update.
    attr_column:
        The flat input column of the sensitive attribute (attribute game; public schema).
    alignment:
        Add the target-alignment features when the observations carry a target or user.
    seed:
        Seed of the classifier.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        attack_model: str = "mlp",
        features: str = "all",
        attr_column: int | None = None,
        alignment: bool = True,
        seed: int = 0,
    ) -> None:
        if attack_model not in ATTACK_MODELS:
            raise ConfigError(
                f"game.attack_model: {attack_model!r} is not allowed; allowed: "
                f"{', '.join(ATTACK_MODELS)}"
            )
        if features not in FEATURES:
            raise ConfigError(
                f"game.features: {features!r} is not allowed; allowed: {', '.join(FEATURES)}"
            )
        self.model, self.attack_model, self.features = model, attack_model, features
        self.attr_column, self.alignment, self.seed = attr_column, alignment, seed
        layout = param_layout(model)
        last_module = layout[-1][0].rsplit(".", 1)[0]
        last = [(s, e) for n, _, s, e in layout if n.rsplit(".", 1)[0] == last_module]
        self._cols = (
            slice(0, layout[-1][3])
            if features != "last"
            else slice(min(s for s, _ in last), max(e for _, e in last))
        )
        self._clf: Any = None  # the fitted scikit-learn pipeline (untyped)

    def _alignment(self, obs: Observations) -> list[torch.Tensor]:
        u = obs.updates
        if obs.user_x is not None and obs.user_y is not None:
            t, m = obs.user_x.shape[:2]
            g = flat_per_sample_gradients(
                self.model, obs.user_x.reshape(t * m, *obs.user_x.shape[2:]), obs.user_y.reshape(-1)
            ).reshape(t, m, -1)
            cos, proj = _cos_proj(u, g.mean(1))
            per = torch.stack([_cos_proj(u, g[:, j])[0] for j in range(m)], 1)
            return [cos, proj, per.max(1).values, per.mean(1)]
        if obs.target_x is None or obs.target_y is None:
            return []
        if self.attr_column is not None:  # attribute game: both hypotheses about a
            x0 = obs.target_x.clone()
            x1 = obs.target_x.clone()
            x0[:, self.attr_column], x1[:, self.attr_column] = 0.0, 1.0
            g0 = flat_per_sample_gradients(self.model, x0, obs.target_y)
            g1 = flat_per_sample_gradients(self.model, x1, obs.target_y)
            c0, _ = _cos_proj(u, g0)
            c1, _ = _cos_proj(u, g1)
            _, pd = _cos_proj(u, g1 - g0)
            return [c0, c1, c1 - c0, pd]
        g = flat_per_sample_gradients(self.model, obs.target_x, obs.target_y)
        cos, proj = _cos_proj(u, g)
        return [cos, proj]

    def featurize(self, obs: Observations) -> np.ndarray:
        """The classifier's input for each trial, ``[T, F]``."""
        parts = [] if self.features == "alignment" else [obs.updates[:, self._cols]]
        if self.alignment or self.features == "alignment":
            parts += [c.reshape(-1, 1) for c in self._alignment(obs)]
        return torch.cat(parts, dim=1).detach().to(torch.float64).numpy()

    def make_classifier(self) -> Any:
        """A fresh, unfitted scikit-learn pipeline (standardisation + the attack model)."""
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.attack_model == "mlp":
            clf = MLPClassifier(
                hidden_layer_sizes=(64,), alpha=1e-3, max_iter=300, random_state=self.seed
            )
        else:
            clf = RandomForestClassifier(
                n_estimators=100, min_samples_leaf=5, random_state=self.seed, n_jobs=1
            )
        return make_pipeline(StandardScaler(), clf)

    def fit(self, shadow: Observations, shadow_secrets: np.ndarray) -> MetaClassifier:
        """Train on the adversary's own shadow trials (their secrets are the adversary's)."""
        x = self.featurize(shadow)
        self._clf = self.make_classifier().fit(x, np.asarray(shadow_secrets))
        logger.info(
            "meta-classifier %s trained on %d shadow updates, %d features",
            self.attack_model,
            x.shape[0],
            x.shape[1],
        )
        return self

    def score(self, obs: Observations) -> np.ndarray:
        """Pr[s = 1 | observation] for each trial."""
        if self._clf is None:
            raise RuntimeError("fit the meta-classifier on shadow updates first")
        proba: np.ndarray = self._clf.predict_proba(self.featurize(obs))[:, 1]
        return proba


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    logit: np.ndarray = np.log(p) - np.log1p(-p)
    return logit


class MultiRound:
    """Multi-round adversary: one :class:`MetaClassifier` per observed round, each built at
    the model the adversary holds for that round (see the module docstring)."""

    def __init__(self, rounds: list[MetaClassifier], *, combine: str = "mean_logit") -> None:
        if combine not in COMBINE:
            raise ConfigError(
                f"game.round_combine: {combine!r} is not allowed; allowed: {', '.join(COMBINE)}"
            )
        if not rounds:
            raise ConfigError("game.rounds must be >= 1")
        self.rounds, self.combine = rounds, combine
        self._clf: Any = None  # the fitted scikit-learn pipeline (untyped)

    def _check(self, obs: list[Observations]) -> None:
        if len(obs) != len(self.rounds):
            raise ValueError(f"expected {len(self.rounds)} rounds of observations, got {len(obs)}")

    def fit(self, shadows: list[Observations], shadow_secrets: np.ndarray) -> MultiRound:
        """Train on the shadow trials of every round (the same trials released R times)."""
        self._check(shadows)
        if self.combine == "mean_logit":
            for adv, obs in zip(self.rounds, shadows, strict=True):
                adv.fit(obs, shadow_secrets)
        else:
            x = np.concatenate(
                [a.featurize(o) for a, o in zip(self.rounds, shadows, strict=True)], axis=1
            )
            self._clf = self.rounds[0].make_classifier().fit(x, np.asarray(shadow_secrets))
        return self

    def score(self, obs: list[Observations]) -> np.ndarray:
        """Pr[s = 1 | the R observations] for each trial."""
        self._check(obs)
        if self.combine == "mean_logit":
            z = np.mean([_logit(a.score(o)) for a, o in zip(self.rounds, obs, strict=True)], axis=0)
            prob: np.ndarray = 1.0 / (1.0 + np.exp(-z))
            return prob
        if self._clf is None:
            raise RuntimeError("fit the multi-round adversary on shadow updates first")
        x = np.concatenate([a.featurize(o) for a, o in zip(self.rounds, obs, strict=True)], axis=1)
        proba: np.ndarray = self._clf.predict_proba(x)[:, 1]
        return proba


class LossBaseline:
    """Membership baseline: ℓ(θ, z) − ℓ(θ − η·u, z) for the target z (no training).

    Scores are centred at 0, so use the ROC-AUC (the threshold-free metric) with it;
    :meth:`score` maps them through a logistic so that 0.5 is "no change"."""

    def __init__(self, model: nn.Module, *, lr: float = 0.1) -> None:
        self.model, self.lr = model, lr
        self.layout = param_layout(model)

    def score(self, obs: Observations) -> np.ndarray:
        if obs.target_x is None or obs.target_y is None:
            raise ConfigError("the loss baseline needs a target record (membership game)")
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        out = []
        with torch.no_grad():
            base = F.cross_entropy(self.model(obs.target_x), obs.target_y, reduction="none")
            for i in range(len(obs)):
                p = {
                    n: params[n] - self.lr * obs.updates[i, s:e].reshape(shape)
                    for n, shape, s, e in self.layout
                }
                logits = functional_call(
                    self.model, {**params, **p, **buffers}, (obs.target_x[i : i + 1],)
                )
                out.append(float(base[i] - F.cross_entropy(logits, obs.target_y[i : i + 1])))
        return 1.0 / (1.0 + np.exp(-np.asarray(out) / max(self.lr, 1e-12)))
