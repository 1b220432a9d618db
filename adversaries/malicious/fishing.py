"""Fishing: a malicious classifier that silences every record but the target's.

Wen, Geiping, Fowl, Goldblum and Goldstein, "Fishing for User Data in Large-Batch Federated
Learning via Gradient Magnification", ICML 2022 (arXiv:2202.00580).

**Class fishing.** The server zeroes the weights of every non-target row of the classifier (the
last ``nn.Linear``) and gives those rows a large bias ``c``. For any record the non-target
logits are the constant ``c`` and the target logit ``z_t`` is ordinary, so the softmax puts
``p_t ≈ exp(z_t - c) ≈ 0`` on the target class. A record of another class then sends
``∂L/∂h = Σ_k p_k W_k - W_y = p_t W_t ≈ 0`` into the network: it touches only the non-target
rows of the classifier. A record of the target class sends ``(p_t - 1) W_t ≈ -W_t``: the
gradient of ``-z_t``. The update (of one client or an aggregate of many) restricted to the
untouched parameters is therefore the sum of the target-class records' gradients, and the
target row's bias gradient counts them: ``∂L/∂b_t ≈ -(count) / N``.

**Feature fishing.** To single out one record among several of the target class, the paper
puts a threshold on one feature ``h_j`` of the classifier's input into the target row
(``W_t = α e_j``, ``b_t = -α τ``: records above ``τ`` are classified confidently) and moves
``τ`` by a binary search over rounds in which the client computes on the *same* data, so that
two updates differ by one record. In one round the classifier alone cannot window the target
class: its softmax depends on ``h`` but not on the label, so whatever makes out-of-window
target records silent (``p_t ≈ 1``) makes other records with the same features send
``+W_t`` (``p_t - 0``). Here the window therefore sits one layer lower, in the unit ``j`` of
the Linear that feeds the classifier (``h = ReLU(s)``): its bias is lowered by ``τ`` so that
the unit is active only when ``s_j > τ`` (the window ``(τ, ∞)``), and the target row keeps
only entry ``j``. A target-class record outside the window then sends no gradient below the
classifier (its only path is the dead unit ``j``), one inside sends the gradient of
``-α h_j``, and other classes stay silent as in class fishing. The record count inside the
window is read from the gradient of unit ``j``'s bias (``-α · count / N``); the target row's
own bias still counts every target-class record, inside the window or not.

This module imports neither Flower nor Ray.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, ClassVar

import torch
from torch import nn

from adversaries.base import (
    ATTACKS,
    Attack,
    AttackResult,
    Observation,
    Setup,
    require_cross_entropy,
)
from adversaries.malicious._fishing_utils import (
    CLASS_MODELS,
    FEATURE_MODELS,
    class_count,
    classifier,
    feature_layer,
    penultimate_outputs,
    singled_out_observation,
    window_count,
)
from adversaries.malicious.base import Crafted, Modification, ServerView, register_modification
from adversaries.reconstruction._common import target_gradient
from adversaries.reconstruction.inverting_gradients import InvertingGradientsAttack
from fl_privsim.core.errors import ConfigError, ThreatModelError

log = logging.getLogger(__name__)

#: Values of the ``mode`` parameter.
FISHING_MODES = ("class", "feature")


def _positive(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


@register_modification("fishing")
class Fishing(Modification):
    """Class (and feature) fishing on the classifier (Wen et al., ICML 2022).

    Threat model: a malicious server that may send any weights for the agreed architecture
    and never sees the clients' data; it uses its own public data
    (:attr:`ServerView.public_inputs`, ``public_labels``) to place the feature window. The
    last ``nn.Linear`` must be the classifier with a bias (one row per class); feature fishing
    also needs the classifier's input to be ``ReLU`` of a Linear with bias (``mlp``,
    ``convnet``). Exact for FedSGD (and the first local step of FedAvg): after a local step the
    non-target rows are no longer zero, so later steps leak other records too.

    **Class mode** (``mode="class"``): non-target rows get zero weights and bias
    ``bias_multiplier``; the target row and its bias are kept (the module docstring explains
    why the other records then send ~0 gradient into every other parameter; breaching's class
    attack sets the target row to a constant 0.5 instead; the honest row is kept here).
    Assumes the target logit stays far below ``bias_multiplier`` (honest logits are O(1)).
    Models with BatchNorm (``resnet18``) train on batch statistics, through which silenced
    records still shape the target record's gradient: approximate there.

    **Feature mode** (``mode="feature"``): class fishing, plus a window on the pre-activation
    ``s_j`` of one unit ``j`` of the Linear before the classifier: the unit's bias is lowered
    by ``τ`` (active iff ``s_j > τ``) and the target row becomes ``feature_multiplier · e_j``
    (its bias is kept). The feature is the unit whose pre-activation spreads most (largest
    standard deviation) over the public inputs of the target class, chosen at the first craft
    and kept. ``τ`` is the ``1 - q`` quantile of ``s_j`` over those public inputs, with ``q``
    chosen so that ``expected_records`` records are expected in the window:
    ``q = expected_records / (records_per_update · len(targets) · share_t)`` (``share_t``:
    the target class's share of the public labels). After each round :meth:`observe` reads
    the window's record count from the aggregate (``-N · ∂L/∂b_j / feature_multiplier``) and
    bisects ``log q`` over rounds, as the paper's binary search on the threshold: a count of 0
    raises the lower end of the bracket, 2 or more lowers the upper end, 1 keeps ``q``. The
    paper queries the *same* batch again; clients here draw new batches every round, so the
    search steers the *expected* count towards ``expected_records`` rather than converging on
    one fixed record (a collapsed bracket is widened again, ×2 each side).

    Secrets (under ``"fishing"``): ``mode``, ``target_class``, ``classifier`` (module name),
    ``bias_multiplier``; feature mode adds ``feature_layer`` (module name), ``feature``
    (unit index), ``threshold`` (``τ``), ``quantile`` (``q``), ``feature_multiplier``,
    ``expected_records`` (the expected count in the window) and ``feature_scale`` (largest
    ``|s_j|`` over the public inputs plus ``|τ|``; the attack uses it to linearise the unit).

    Parameters
    ----------
    target_class:
        The class to fish (``0 .. num_classes - 1``); ``-1`` (default): drawn from
        ``view.generator`` at the first craft and kept for every later round.
    mode:
        ``"class"`` (default) or ``"feature"``.
    bias_multiplier:
        Bias of the non-target rows (> 0; default 1000, as breaching): the margin by which
        they outvote the target logit.
    feature_multiplier:
        Weight ``α`` of the fished feature in the target row (feature mode; > 0; default 1).
    expected_records:
        Records the feature window should hold on average (feature mode; > 0; default 1).
    """

    def __init__(
        self,
        *,
        target_class: int = -1,
        mode: str = "class",
        bias_multiplier: float = 1000.0,
        feature_multiplier: float = 1.0,
        expected_records: float = 1.0,
    ) -> None:
        if isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < -1:
            raise ValueError(
                f"target_class must be -1 (server picks) or a class index >= 0, "
                f"got {target_class!r}"
            )
        if mode not in FISHING_MODES:
            raise ValueError(f"mode must be one of {', '.join(FISHING_MODES)}, got {mode!r}")
        if not _positive(bias_multiplier):
            raise ValueError(
                f"bias_multiplier must be a finite number > 0, got {bias_multiplier!r}"
            )
        if not _positive(feature_multiplier):
            raise ValueError(
                f"feature_multiplier must be a finite number > 0, got {feature_multiplier!r}"
            )
        if not _positive(expected_records):
            raise ValueError(
                f"expected_records must be a finite number > 0, got {expected_records!r}"
            )
        self.target_class = target_class
        self.mode = mode
        self.bias_multiplier = float(bias_multiplier)
        self.feature_multiplier = float(feature_multiplier)
        self.expected_records = float(expected_records)
        # state across rounds
        self._target: int | None = None if target_class < 0 else target_class
        self._feature: int | None = None
        self._q: float | None = None
        self._bracket: list[float | None] = [None, None]  # [lower, upper] of q
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ model checks

    def check_model(
        self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        """Refuse a model without a classifier with bias (feature mode: or a ReLU feature layer)."""
        found = classifier(model, num_classes)
        if isinstance(found, str):
            raise ConfigError(
                f"fishing needs the last Linear layer to be the classifier with bias ({found}); "
                f"models that have one: {', '.join(CLASS_MODELS)}"
            )
        if self.target_class >= num_classes:
            raise ConfigError(
                f"fishing: target_class {self.target_class} must be below the {num_classes} classes"
            )
        if self.mode == "feature":
            feat = feature_layer(model, input_shape, found[0])
            if isinstance(feat, str):
                raise ConfigError(
                    "fishing mode 'feature' needs the classifier to read ReLU of a Linear "
                    "with bias "
                    f"({feat}); models that do: {', '.join(FEATURE_MODELS)}"
                )

    # ------------------------------------------------------------------ crafting

    def _pick_target(self, view: ServerView) -> int:
        if self._target is None:
            self._target = int(torch.randint(view.num_classes, (1,), generator=view.generator))
            log.info("fishing: the server picked target class %d", self._target)
        return self._target

    def craft(self, model: nn.Module, view: ServerView) -> Crafted:
        """A copy of ``model`` with the fishing classifier (and feature window), and the secrets."""
        self.check_model(model, view.input_shape, view.num_classes)
        t = self._pick_target(view)
        crafted = copy.deepcopy(model)
        found = classifier(crafted, view.num_classes)
        assert not isinstance(found, str)  # check_model raised otherwise
        cls_name, cls = found
        secrets: dict[str, Any] = {
            "mode": self.mode,
            "target_class": t,
            "classifier": cls_name,
            "bias_multiplier": self.bias_multiplier,
        }
        if self.mode == "feature":
            secrets.update(self._plant_feature(model, crafted, cls_name, t, view))
        with torch.no_grad():
            keep_w, keep_b = cls.weight[t].clone(), cls.bias[t].clone()
            cls.weight.zero_()
            cls.bias.fill_(self.bias_multiplier)
            if self.mode == "class":
                cls.weight[t] = keep_w
            else:
                cls.weight[t, secrets["feature"]] = self.feature_multiplier
            cls.bias[t] = keep_b
        return Crafted(model=crafted, secrets=secrets)

    def _plant_feature(
        self, honest: nn.Module, crafted: nn.Module, cls_name: str, t: int, view: ServerView
    ) -> dict[str, Any]:
        """Choose the feature (first round) and the window; lower the unit's bias by ``τ``."""
        found = feature_layer(crafted, view.input_shape, cls_name)
        assert not isinstance(found, str)  # check_model raised otherwise
        pen_name, pen = found
        public, labels = view.public_inputs, view.public_labels
        if public is None or public.shape[0] == 0:
            raise ConfigError(
                "fishing mode 'feature' needs the server's public inputs to place its window"
            )
        s = penultimate_outputs(honest, pen_name, public.detach().to("cpu", torch.float32)).double()
        mine = s
        share = 1.0 / view.num_classes
        if labels is not None and labels.numel() == public.shape[0]:
            is_t = labels.detach().cpu() == t
            share = max(float(is_t.double().mean()), 1.0 / public.shape[0])
            if int(is_t.sum()) >= 2:
                mine = s[is_t]
        if self._feature is None:
            self._feature = int(mine.std(dim=0).argmax())
        j = self._feature
        present = view.records_per_update * max(1, len(view.targets)) * share
        if self._q is None:
            self._q = min(1.0, self.expected_records / max(present, 1e-12))
        q = self._q
        col = mine[:, j]
        tau = float(torch.quantile(col, 1.0 - q)) if q < 1.0 else float(col.min()) - 1.0
        with torch.no_grad():
            pen.bias[j] -= tau
        log.debug(
            "fishing: feature %d of %r, window s > %.4g (q=%.4g, expected %.3g)",
            j,
            pen_name,
            tau,
            q,
            present * q,
        )
        return {
            "feature_layer": pen_name,
            "feature": j,
            "threshold": tau,
            "quantile": q,
            "feature_multiplier": self.feature_multiplier,
            "expected_records": present * q,
            "feature_scale": float(s[:, j].abs().max()) + abs(tau),
        }

    # ------------------------------------------------------------------ search over rounds

    def observe(self, obs: Observation) -> None:
        """Feature mode: read the window's record count and bisect the window's share ``q``."""
        if self.mode != "feature" or "fishing" not in obs.server_secrets or self._q is None:
            return
        secrets = obs.server_secrets["fishing"]
        count = window_count(obs, secrets, target_gradient(obs, torch.device("cpu")))
        q = self._q
        lower, upper = self._bracket
        n = round(count)
        if n < 1:
            lower = q
        elif n > 1:
            upper = q
        if n != 1:
            if lower is not None and upper is not None:
                if upper / lower < 1.05:  # collapsed (batches differ every round): widen again
                    lower, upper = q / 2.0, min(1.0, q * 2.0)
                q = math.sqrt(lower * upper)
            elif lower is not None:
                q = min(1.0, q * 4.0)
            else:
                q = q / 4.0
        self._q, self._bracket = q, [lower, upper]
        self.history.append({"round": float(obs.round), "count": count, "next_quantile": q})
        log.debug("fishing: round %d window held %.3g records; next q=%.4g", obs.round, count, q)


@ATTACKS.register("fishing")
class FishingAttack(Attack):
    """Inverting Gradients on the fished gradient of one record (Wen et al., ICML 2022).

    Threat model: the malicious server that applied :class:`Fishing` this round (its secrets
    must be in :attr:`Observation.server_secrets`) sees one client's update or an aggregate of
    that model (FedSGD; FedAvg updates are converted by :meth:`Observation.gradient` and are
    exact for one local step only); it knows the architecture, the weights it sent and the
    loss (mean softmax cross-entropy). Never sees labels or data.

    1. **Count.** ``estimated_records``: the records that reached the singled-out gradient,
       ``-N · ∂L/∂b_t`` for class fishing and the feature window's count
       (:func:`window_count`) for feature fishing (``N = num_targets(obs)``);
       ``target_class_records`` is ``-N · ∂L/∂b_t`` in both modes. With a count near 1 the
       gradient is one record's; with more it is their sum (the result is then a blend, and
       a warning is logged); with about 0 there is nothing to reconstruct.
    2. **Reconstruction.** Inverting Gradients (Geiping et al., NeurIPS 2020: cosine distance
       plus total variation, signed Adam, box projection;
       :class:`~adversaries.reconstruction.inverting_gradients.InvertingGradientsAttack`) for
       ONE record with the target label, matched only on the parameters the silenced records
       do not touch: every trainable parameter except the classifier's non-target rows (and,
       in feature mode, except the target row's entries other than the fished feature and its
       bias). Technically the gradient is re-expressed as a one-record FedSGD observation of
       a derived model whose classifier keeps only those entries
       (:func:`~adversaries.malicious._fishing_utils.singled_out_observation`).

    Returns inputs (1, C, H, W) in the normalised space and labels ``tensor([target_class])``.
    ``metrics``: ``estimated_records``, ``target_class_records``, ``target_class`` and the
    Inverting Gradients metrics (``final_loss``, ``iterations``, ``restarts``, ``seconds``).

    Parameters
    ----------
    iterations, lr, tv_weight, restarts, batch_restarts:
        Passed to :class:`~adversaries.reconstruction.inverting_gradients.\
InvertingGradientsAttack` (defaults 300, 0.1, 1e-6, 1, True: see there).
    """

    requires: ClassVar[tuple[str, ...]] = (
        "the server applied the modification 'fishing' to the model of this round",
        "last nn.Linear is the classifier (one output per class) with bias",
        "update covers every trainable parameter",
        "loss is mean softmax cross-entropy",
    )
    modification: ClassVar[str | None] = "fishing"

    def __init__(
        self,
        *,
        iterations: int = 300,
        lr: float = 0.1,
        tv_weight: float = 1e-6,
        restarts: int = 1,
        batch_restarts: bool = True,
    ) -> None:
        self.inverter = InvertingGradientsAttack(
            iterations=iterations,
            lr=lr,
            tv_weight=tv_weight,
            restarts=restarts,
            variant="fedsgd",
            batch_restarts=batch_restarts,
        )

    def check_setup(self, setup: Setup) -> None:
        """Refuse a model whose last Linear is not the classifier with bias (the layer fishing
        rewrites), or clients trained with another loss than cross-entropy. The feature mode's
        own needs are the modification's (:meth:`Fishing.check_model`)."""
        found = classifier(setup.model, setup.num_classes)
        if isinstance(found, str):
            raise ThreatModelError(
                f"fishing: requires the last nn.Linear to be the classifier with bias, but {found}"
            )
        require_cross_entropy(setup, "fishing")

    def check(self, obs: Observation) -> None:
        """Refuse unless the secrets are present, :meth:`check_setup` passes on the observed
        model, and the secrets name its classifier (and feature layer)."""
        secrets = self.secrets(obs)
        self.check_setup(Setup.of(obs))
        if not isinstance(secrets, dict) or secrets.get("mode") not in FISHING_MODES:
            raise ThreatModelError("fishing: the secrets of this round are incomplete (no mode)")
        modules = dict(obs.model.named_modules())
        cls = modules.get(secrets.get("classifier", ""))
        t = secrets.get("target_class", -1)
        if not isinstance(cls, nn.Linear) or cls.bias is None or not 0 <= int(t) < cls.out_features:
            raise ThreatModelError(
                f"fishing: the secrets name classifier {secrets.get('classifier')!r} with target "
                f"class {t!r}, which the observed model does not have"
            )
        if secrets["mode"] == "feature":
            pen = modules.get(secrets.get("feature_layer", ""))
            if not isinstance(pen, nn.Linear) or pen.bias is None:
                raise ThreatModelError(
                    f"fishing: the secrets name feature layer {secrets.get('feature_layer')!r}, "
                    "which is not a Linear with bias of the observed model"
                )
        missing = [name for name in obs.param_names() if name not in obs.update]
        if missing:
            raise ThreatModelError(f"fishing: the update lacks parameter(s) {missing[:3]}")

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Count the fished records, then reconstruct one record with the target label."""
        start = time.perf_counter()
        secrets = self.secrets(obs)
        grads = target_gradient(obs, device)
        t = int(secrets["target_class"])
        in_class = class_count(obs, secrets, grads)
        count = window_count(obs, secrets, grads) if secrets["mode"] == "feature" else in_class
        if count < 0.5:
            log.warning(
                "fishing: about %.2f records reached the fished gradient; nothing to single out",
                count,
            )
        elif count > 1.5:
            log.warning(
                "fishing: about %.2f records share the fished gradient; the result blends them",
                count,
            )
        derived = singled_out_observation(obs, secrets, grads)
        res = self.inverter.run(derived, device=device, generator=generator)
        metrics = dict(res.metrics)
        metrics.update(
            estimated_records=count,
            target_class_records=in_class,
            target_class=float(t),
            seconds=time.perf_counter() - start,
        )
        log.debug("fishing attack: %s", metrics)
        labels = torch.tensor([t], dtype=torch.int64, device=device)
        return AttackResult(inputs=res.inputs, labels=labels, metrics=metrics)
