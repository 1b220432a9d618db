"""Curious-server inference attacks on real client updates inside a federation.

``attribute_inference``, ``property_inference`` and ``membership_inference`` run from
``[[attacks]]`` in a Flower + Ray run. At every attacked round the server plays the inference
game of Li et al. ("Analyzing Inference Privacy Risks Through Gradients in Machine Learning",
arXiv:2408.16913, CCS 2024) against itself on its own auxiliary data, at the very global model
θ it has just sent, with the protocol, batch size, local steps and learning rate the clients
declare (:class:`~adversaries.base.Observation`): shadow updates come from
:class:`~adversaries.inference.games.Game` and :class:`~adversaries.inference.release.Release`
(vectorised per-sample gradients for FedSGD), and a meta-classifier
(:class:`~adversaries.inference.adversary.MetaClassifier`: an MLP, or Melis et al.'s random
forest, "Exploiting Unintended Feature Leakage in Collaborative Learning", S&P 2019) learns
the secret from them. It then scores each observed client update (or the round's aggregate):
the returned :class:`InferenceResult` holds Pr[s = 1 | update]. The shadow classifier is
trained once per round and reused for every update of that round.

Threat model (honest-but-curious server; static adversary: its shadows pass through no defense):

- **knows** θ, the architecture, the declared protocol metadata, the data format (dataset
  name, the public column schema of Adult), the number of clients in an aggregate, and an
  auxiliary pool of records it owns: records of the dataset's *test* split
  (:class:`ServerKnowledge`; no client trains on them), never a client's training data;
- ``property_inference``: does the client's round batch (every local batch of the round;
  for an aggregate, any member's) contain at least one record with property P? P is
  ``class=K`` (label K; on digits the offline default) or an Adult attribute (``sex``:
  Female, ``race``: not White);
- ``attribute_inference`` (Adult): the server knows that one target record is in the client's
  batch, its non-sensitive features and its label, and infers its sensitive attribute
  (``sex`` or ``race``). The simulator picks the target as the first record of the client's
  first batch of the round (the first member's for an aggregate) and hands the attack only
  its features with the attribute column set to 0, and its label;
- ``membership_inference``: the server is handed a target record (features and label) and
  infers whether it was in the client's batch of the round. The simulator draws, with a fair
  seeded coin, either the first record of the batch (member) or a record of the same
  client's partition not used in that round (non-member). Gradient-based: the features are
  the update's alignment (cosine, projection) with the target's gradient at θ.

The attack never sees the truth: its input, :class:`InferenceObservation`, adds to the
observation only :class:`ServerKnowledge`, which has no field for a secret; the scorer
(:mod:`fl_privsim.engine.inference_scoring`) computes it from the reproduced batch. Computations run
on the CPU (scikit-learn classifiers; per-sample gradients with ``torch.func``).
FedAvg shadows repeat one batch for ``local_steps`` steps (:class:`Release`'s exact path),
while a real client draws a fresh batch per step: an approximation the adversary makes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from threadpoolctl import threadpool_limits

from adversaries.base import ATTACKS, Attack, AttackResult, Observation, Setup
from adversaries.inference.adversary import ATTACK_MODELS, FEATURES, MetaClassifier
from adversaries.inference.games import Game, Observations, Pool
from adversaries.inference.metrics import auc_score
from adversaries.inference.release import Release, param_layout
from fl_privsim.core import plugins
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.seeding import numpy_rng
from fl_privsim.core.tabular import ADULT_SENSITIVE, adult_attribute_column

if TYPE_CHECKING:
    from fl_privsim.core.config import Config

logger = logging.getLogger(__name__)

__all__ = [
    "AttributeInference",
    "FederatedInference",
    "InferenceObservation",
    "InferenceResult",
    "MembershipInference",
    "PropertyInference",
    "SecretSpec",
    "ServerKnowledge",
    "check_run_config",
]

KINDS: dict[str, str] = {
    "attribute_inference": "attribute",
    "property_inference": "property",
    "membership_inference": "membership",
}
#: Datasets the inference attacks support, with their number of classes (0 = known at load).
CLASS_COUNTS: dict[str, int] = {
    "adult": 2,
    "digits": 10,
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "cifar10_npz": 10,
    "mnist_idx": 10,
    "folder": 0,
}


@dataclass(frozen=True)
class SecretSpec:
    """The public definition of an attack's secret (the scorer reads it): ``kind``, the Adult
    ``attribute`` it concerns (attribute inference, or property = an attribute), or
    ``property_class`` (property = label K)."""

    kind: str
    attribute: str | None = None
    property_class: int | None = None


@dataclass(frozen=True, eq=False)
class ServerKnowledge:
    """What the curious server knows besides the observation. There is no secret field.

    dataset:
        The federation's dataset name (public data format).
    aux_x, aux_y:
        The server's auxiliary records (model inputs; tabular rows flat ``[n, D]``) and labels.
    target_x, target_y:
        attribute: the target's features with the sensitive column set to 0, and its label;
        membership: the target record; ``None`` for property inference. Shapes ``[1, ...]``, ``[1]``.
    """

    dataset: str
    aux_x: torch.Tensor
    aux_y: torch.Tensor
    target_x: torch.Tensor | None = None
    target_y: torch.Tensor | None = None


@dataclass(frozen=True)
class InferenceObservation(Observation):
    """An :class:`Observation` plus the server's :class:`ServerKnowledge`."""

    knowledge: ServerKnowledge | None = None

    @classmethod
    def of(cls, obs: Observation, knowledge: ServerKnowledge) -> InferenceObservation:
        """``obs`` with ``knowledge`` attached."""
        base = {f.name: getattr(obs, f.name) for f in dataclasses.fields(Observation)}
        return cls(**base, knowledge=knowledge)


@dataclass
class InferenceResult(AttackResult):
    """An inference attack's output: ``score`` = Pr[secret = 1 | update] (no reconstruction)."""

    score: float = 0.5


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"params.{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


class FederatedInference(Attack):
    """Base of the three federated inference attacks (see the module docstring).

    Parameters (keyword-only, from ``[[attacks]] params``)
    ------------------------------------------------------
    dataset:
        The federation's dataset (``""`` = whatever it is; checked against ``data.name``).
    attribute:
        attribute_inference: ``sex`` or ``race`` (Adult).
    property:
        property_inference: ``class=K`` or, on Adult, ``sex``/``race``.
    shadow_trials:
        Shadow updates per attacked round (the meta-classifier's training set); a further
        quarter is kept aside to report the classifier's own validation AUC (``attack_shadow_auc``).
    aux_size:
        Auxiliary records the server owns (test-split records; fewer if the split is smaller).
    attack_model:
        ``mlp`` or ``random_forest``.
    features:
        ``auto`` (alignment with the target's gradients for attribute/membership, the last
        layer's update for property), ``last``, ``all`` or ``alignment``.
    seed:
        Seed of the shadow games and the classifier.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    produces: ClassVar[str] = "inference"
    requires = (
        "the server's auxiliary data (ServerKnowledge), attached by the attack runner",
        "data.name (and for Adult the model: mlp or linear) fits the params (checked before launch)",
    )

    def __init__(
        self,
        *,
        dataset: str = "",
        attribute: str = "sex",
        property: str = "class=0",
        shadow_trials: int = 400,
        aux_size: int = 1000,
        attack_model: str = "mlp",
        features: str = "auto",
        seed: int = 0,
    ) -> None:
        if dataset:
            _check_choice("dataset", dataset, tuple(CLASS_COUNTS))
        _check_choice("attribute", attribute, ADULT_SENSITIVE)
        _check_choice("attack_model", attack_model, ATTACK_MODELS)
        _check_choice("features", features, ("auto", *FEATURES))
        for key, value, low in (("shadow_trials", shadow_trials, 20), ("aux_size", aux_size, 10)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"params.{key}: expected an integer >= {low}, got {value!r}")
        property_class = None
        if self.kind == "property":
            property_class = _parse_property(property)
        self.dataset, self.attribute, self.property = dataset, attribute, property
        self.shadow_trials, self.aux_size, self.attack_model, self.seed = (
            shadow_trials,
            aux_size,
            attack_model,
            seed,
        )
        self.features = (
            features if features != "auto" else ("last" if self.kind == "property" else "alignment")
        )
        uses_attribute = self.kind == "attribute" or (
            self.kind == "property" and property_class is None
        )
        self.spec = SecretSpec(
            kind=self.kind,
            attribute=(property if self.kind == "property" else attribute)
            if uses_attribute
            else None,
            property_class=property_class,
        )
        self._cache: tuple[tuple[object, ...], MetaClassifier, float] | None = None

    # ------------------------------------------------------------------ validation
    def check_run(self, data_name: str, model_name: str) -> None:
        """Raise :class:`ConfigError` if the run's data or model does not fit these params
        (``model_name = ""``: the model is unknown and not checked)."""
        if self.dataset and self.dataset != data_name:
            raise ConfigError(
                f"params.dataset: {self.dataset!r} does not match data.name = {data_name!r}"
            )
        if data_name not in CLASS_COUNTS:
            raise ConfigError(
                f"data.name = {data_name!r} is not supported by the inference attacks; "
                f"allowed: {', '.join(CLASS_COUNTS)}"
            )
        if self.spec.attribute is not None and data_name != "adult":
            what = "attribute" if self.kind == "attribute" else "property"
            raise ConfigError(
                f"params.{what}: {self.spec.attribute!r} needs tabular data with a sensitive "
                f"attribute (data.name = 'adult'); with {data_name!r} use property = 'class=K'"
            )
        k = CLASS_COUNTS[data_name]
        if self.spec.property_class is not None and k and self.spec.property_class >= k:
            raise ConfigError(
                f"params.property: class {self.spec.property_class} does not exist in {data_name} "
                f"(classes 0..{k - 1})"
            )
        if data_name == "adult" and model_name and model_name not in ("mlp", "linear"):
            raise ConfigError(
                f"model.name: {model_name!r} cannot take tabular rows; allowed: mlp, linear"
            )

    def check_setup(self, setup: Setup) -> None:
        """:meth:`check_run` on the setup's data and model names (skipped while the data is
        unknown), as a :class:`ThreatModelError` naming the attack."""
        if not setup.data_name:
            return
        try:
            self.check_run(setup.data_name, setup.model_name)
        except ConfigError as exc:
            raise ThreatModelError(f"{self.name}: {exc}") from None

    def check(self, obs: Observation) -> None:
        """Refuse an observation without server knowledge, or without the target the kind needs;
        then :meth:`check_setup` with the knowledge's dataset."""
        k = getattr(obs, "knowledge", None)
        if not isinstance(k, ServerKnowledge):
            raise ThreatModelError(
                f"{self.name}: requires {self.requires[0]}; got a bare Observation"
            )
        if self.kind in ("attribute", "membership") and (k.target_x is None or k.target_y is None):
            raise ThreatModelError(f"{self.name}: requires a target record in the server knowledge")
        if self.spec.attribute is not None and k.dataset != "adult":
            raise ThreatModelError(
                f"{self.name}: requires adult data for attribute {self.spec.attribute!r}, "
                f"got {k.dataset!r}"
            )
        if len(k.aux_y) < 2:
            raise ThreatModelError(f"{self.name}: requires at least 2 auxiliary records")
        self.check_setup(dataclasses.replace(Setup.of(obs), data_name=k.dataset))

    # ------------------------------------------------------------------ attack
    def _attr_column(self, aux_x: torch.Tensor) -> int | None:
        return (
            None
            if self.spec.attribute is None
            else adult_attribute_column(int(aux_x.shape[1]), self.spec.attribute)
        )

    def _pool(self, k: ServerKnowledge, col: int | None) -> Pool:
        x, y = k.aux_x[: self.aux_size], k.aux_y[: self.aux_size]
        if self.kind == "property":
            a = (
                (x[:, col] > 0.5).long()
                if col is not None
                # property_class is set when col is None; (Tensor == int | None) is typed bool
                else cast(torch.Tensor, y == self.spec.property_class).long()
            )
        elif self.kind == "attribute":
            a = (x[:, col] > 0.5).long()
        else:
            a = torch.zeros_like(y)
        return Pool(x=x, y=y, a=a)

    def _meta(
        self, obs: InferenceObservation, model: torch.nn.Module
    ) -> tuple[MetaClassifier, float]:
        # one classifier per round and declared protocol; the parameter sum guards against a
        # different global model under the same round number (attacks used outside a run)
        fingerprint = float(
            sum(
                float(v.double().sum()) for v in obs.global_params.values() if v.is_floating_point()
            )
        )
        key = (
            obs.round,
            obs.protocol,
            obs.batch_size,
            obs.local_steps,
            obs.lr,
            obs.num_clients,
            fingerprint,
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        k = obs.knowledge
        assert k is not None
        col = self._attr_column(k.aux_x)
        pool = self._pool(k, col)
        release = Release(
            model,
            protocol=obs.protocol,
            lr=obs.lr,
            local_steps=max(obs.local_steps, 1),
            seed=self.seed,
        )
        game = Game(
            self.kind,
            batch_size=max(obs.batch_size, 1),
            clients_per_aggregate=max(obs.num_clients, 1),
            attr_column=col if self.kind == "attribute" else None,
        )
        rng = numpy_rng(self.seed, obs.round, "attack", 5)
        n_val = max(20, self.shadow_trials // 4)
        shadow, secrets = game.play(pool, release, self.shadow_trials + n_val, rng)
        train, val = _split(shadow, self.shadow_trials)
        meta = MetaClassifier(
            model,
            attack_model=self.attack_model,
            features=self.features,
            attr_column=col if self.kind == "attribute" else None,
            seed=self.seed,
        )
        meta.fit(train, secrets[: self.shadow_trials])
        val_auc = auc_score(secrets[self.shadow_trials :], meta.score(val))
        self._cache = (key, meta, val_auc)
        return meta, val_auc

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> InferenceResult:
        """Train (or reuse) this round's shadow meta-classifier and score the observed update."""
        assert isinstance(obs, InferenceObservation) and obs.knowledge is not None
        t0 = time.perf_counter()
        model = obs.fresh_model("cpu")
        for p in model.parameters():
            p.requires_grad_(True)
        names = [n for n, _, _, _ in param_layout(model)]
        update = torch.cat([obs.update[n].detach().float().cpu().reshape(-1) for n in names])[None]
        k = obs.knowledge
        targeted = self.kind in ("attribute", "membership")  # the shadow games' public knowledge
        seen = Observations(
            updates=update,
            target_x=k.target_x if targeted else None,
            target_y=k.target_y if targeted else None,
        )
        # BLAS threads as many as torch's (the server's threads): oversubscribed cores slow
        # scikit-learn's small matrix products down by an order of magnitude
        with threadpool_limits(limits=torch.get_num_threads()):
            meta, val_auc = self._meta(obs, model)
            score = float(meta.score(seen)[0])
        return InferenceResult(
            inputs=None,
            labels=None,
            score=score,
            metrics={
                "shadow_auc": val_auc,
                "shadow_trials": float(self.shadow_trials),
                "aux_records": float(min(self.aux_size, len(k.aux_y))),
                "attack_seconds": time.perf_counter() - t0,
            },
        )


def _parse_property(prop: str) -> int | None:
    """``class=K`` → K; an Adult attribute → None (the attribute column is P)."""
    if prop in ADULT_SENSITIVE:
        return None
    if isinstance(prop, str) and prop.startswith("class="):
        try:
            value = int(prop.split("=", 1)[1])
        except ValueError:
            value = -1
        if value >= 0:
            return value
    raise ConfigError(
        f"params.property: {prop!r} is not allowed; allowed: class=K (K a class index), "
        f"{', '.join(ADULT_SENSITIVE)} (adult)"
    )


def _split(obs: Observations, n: int) -> tuple[Observations, Observations]:
    def part(sl: slice) -> Observations:
        values: dict[str, Any] = {
            f.name: (None if getattr(obs, f.name) is None else getattr(obs, f.name)[sl])
            for f in dataclasses.fields(Observations)
        }
        return Observations(**values)

    return part(slice(0, n)), part(slice(n, None))


@ATTACKS.register("attribute_inference")
class AttributeInference(FederatedInference):
    """The sensitive attribute of a target record known to be in the client's batch (Adult)."""

    kind = "attribute"
    name = "attribute_inference"


@ATTACKS.register("property_inference")
class PropertyInference(FederatedInference):
    """Whether the client's round batch holds a record with property P (Melis et al. 2019)."""

    kind = "property"
    name = "property_inference"


@ATTACKS.register("membership_inference")
class MembershipInference(FederatedInference):
    """Whether a given target record was in the client's batch (gradient alignment)."""

    kind = "membership"
    name = "membership_inference"


@plugins.CONFIG_CHECKS.register("inference_attacks")
def check_run_config(cfg: Config) -> None:
    """Build every configured inference attack and check it against the run's data and model
    (called at config load: a bad param is a :class:`ConfigError` naming the attack)."""
    for i, a in enumerate(cfg.attacks):
        if a.name not in KINDS:
            continue
        try:
            attack = ATTACKS.create(a.name, **a.params)
            assert isinstance(attack, FederatedInference)
            attack.check_run(cfg.data.name, cfg.model.name)
        except ConfigError as exc:
            raise ConfigError(f"attacks[{i}] ({a.name}): {exc}") from None
