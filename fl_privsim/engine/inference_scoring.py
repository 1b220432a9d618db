"""Ground truth and run-level scores of the federated inference attacks.

The scorer side of :mod:`adversaries.inference.federated`: the only place that looks at a
client's batch. For an attacked update it reproduces the batch(es) of the round with the
client's own seeded sampler (:func:`fl_privsim.engine.federated_data.client_batch_indices`) and

- hands the attack the server's public knowledge (:meth:`InferenceScorer.knowledge`): the
  auxiliary pool (records of the test split, which no client trains on: a seeded subset,
  fixed for the run) and, for attribute and membership inference, the target record as
  the threat model lets the server know it (attribute: features with the sensitive column
  set to 0, and the label);
- computes the secret of the observation (:meth:`InferenceScorer.secret`): property: does
  any batch of the round (of any member, for an aggregate) hold a record with P; attribute:
  the target's sensitive value; membership: whether the offered target was in the batch.

Targets (the simulator's choice, stated in the attacks' threat model): attribute: the first
record of the first member's first batch of the round; membership: with a fair coin seeded
from (seed, round, client), that record (member) or a record of the same client's partition
that it did not use in the round (non-member).

:func:`summarize` turns the per-observation (secret, score) pairs of one attack into ROC-AUC,
accuracy (score ≥ 0.5) and advantage with percentile bootstrap intervals, and the number of
scored observations (``trials``): with clients × rounds observations per run, few trials
give wide intervals. The metrics are :func:`adversaries.inference.metrics.game_metrics`
(imported lazily: pure numpy/scipy).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from adversaries.inference.metrics import game_metrics
from fl_privsim.core.config import Config
from fl_privsim.core.seeding import numpy_rng
from fl_privsim.core.tabular import adult_attribute_column
from fl_privsim.engine.federated_data import FederatedData, client_batch_indices

log = logging.getLogger(__name__)

__all__ = ["InferenceScorer", "SecretSpec", "summarize"]


class SecretSpec(Protocol):
    """The public definition of an attack's secret (``FederatedInference.spec`` fits): ``kind``
    (attribute, property, membership), the Adult ``attribute`` it concerns (attribute
    inference, or property = an attribute), or ``property_class`` (property = label K)."""

    kind: str
    attribute: str | None
    property_class: int | None


class InferenceScorer:
    """Server knowledge and ground truth of the inference attacks for one run."""

    def __init__(self, cfg: Config, fed: FederatedData, *, aux_max: int = 4000) -> None:
        self.cfg, self.fed, self.aux_max = cfg, fed, aux_max

    # ------------------------------------------------------------------ helpers
    def _inputs(self, split: str, idx: np.ndarray) -> torch.Tensor:
        x = self.fed.data.normalize(self.fed.data.images(split, idx))
        return x.reshape(x.shape[0], -1) if self.cfg.data.name == "adult" else x

    @functools.cached_property
    def _aux(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.fed.data.test_y)
        idx = numpy_rng(self.cfg.seed, "split", 61).permutation(n)[: self.aux_max]
        return self._inputs("test", idx), self.fed.data.labels("test", idx)

    def _batches(self, server_round: int, client: int) -> list[np.ndarray]:
        return client_batch_indices(self.cfg, self.fed, server_round, int(client))

    def _target(
        self, spec: SecretSpec, server_round: int, members: Sequence[int]
    ) -> tuple[int, bool]:
        """Train index of the target, and whether it is in the batch (always, but for membership)."""
        first = int(members[0])
        batches = self._batches(server_round, first)
        member = int(batches[0][0])
        if spec.kind != "membership":
            return member, True
        rng = numpy_rng(self.cfg.seed, server_round, first, "attack", 61)
        coin = bool(rng.random() < 0.5)
        outside = np.setdiff1d(self.fed.train_parts[first], np.concatenate(batches))
        if coin or outside.size == 0:
            return member, True
        return int(rng.choice(outside)), False

    def _has_property(self, spec: SecretSpec, idx: np.ndarray) -> np.ndarray:
        if spec.property_class is not None:
            return self.fed.data.labels("train", idx).numpy() == spec.property_class
        x = self._inputs("train", idx)
        assert spec.attribute is not None
        return x[:, adult_attribute_column(int(x.shape[1]), spec.attribute)].numpy() > 0.5

    # ------------------------------------------------------------------ public
    def knowledge(
        self, spec: SecretSpec, server_round: int, members: Sequence[int]
    ) -> dict[str, Any]:
        """The server's knowledge for one observation (keyword arguments of
        :class:`adversaries.inference.federated.ServerKnowledge`): never the secret."""
        aux_x, aux_y = self._aux
        out: dict[str, Any] = {"dataset": self.cfg.data.name, "aux_x": aux_x, "aux_y": aux_y}
        if spec.kind in ("attribute", "membership"):
            index, _ = self._target(spec, server_round, members)
            x = self._inputs("train", np.array([index])).clone()
            if spec.kind == "attribute":
                assert spec.attribute is not None
                x[:, adult_attribute_column(int(x.shape[1]), spec.attribute)] = 0.0  # hidden
            out["target_x"], out["target_y"] = x, self.fed.data.labels("train", np.array([index]))
        return out

    def secret(self, spec: SecretSpec, server_round: int, members: Sequence[int]) -> int:
        """The true secret (0/1) of the observation of ``members`` in ``server_round``."""
        if spec.kind == "property":
            idx = np.concatenate([np.concatenate(self._batches(server_round, c)) for c in members])
            return int(self._has_property(spec, idx).any())
        index, is_member = self._target(spec, server_round, members)
        if spec.kind == "membership":
            return int(is_member)
        return int(self._has_property(spec, np.array([index]))[0])

    def score(
        self, spec: SecretSpec, score: float, server_round: int, members: Sequence[int]
    ) -> dict[str, float]:
        """Per-observation values written to ``metrics.jsonl``: the attack's ``score``, the true
        ``secret`` and whether the decision score ≥ 0.5 was ``correct``."""
        s = self.secret(spec, server_round, members)
        return {
            "score": float(score),
            "secret": float(s),
            "correct": float((score >= 0.5) == bool(s)),
        }


def summarize(
    rows: Sequence[dict[str, float]], *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """ROC-AUC, accuracy and advantage with bootstrap CIs over the scored observations
    (``trials``; ``positives`` of them had secret 1). AUC is NaN when only one secret value
    occurred."""
    pairs = [(int(r["secret"]), float(r["score"])) for r in rows if "secret" in r and "score" in r]
    out: dict[str, Any] = {"trials": len(pairs), "positives": sum(s for s, _ in pairs)}
    if not pairs:
        return out

    s, x = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    m = game_metrics(s, x, n_boot=n_boot, seed=seed)
    for key in (
        "auc",
        "auc_ci",
        "accuracy",
        "accuracy_ci",
        "advantage",
        "advantage_ci",
        "tpr_at_1pct_fpr",
    ):
        out[key] = m[key]
    return out
