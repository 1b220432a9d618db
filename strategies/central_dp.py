"""Flower's central DP wrappers on our update encoding, with an RDP accountant.

``[federation.central_dp]`` picks one of Flower 1.41's four Message-API wrappers
(``flwr.serverapp.strategy``), used unmodified:

=================  ===============================================  ==========================
mode               Flower wrapper                                   who clips
=================  ===============================================  ==========================
server_fixed       ``DifferentialPrivacyServerSideFixedClipping``   the server
client_fixed       ``DifferentialPrivacyClientSideFixedClipping``   the client (``fixedclipping_mod``)
server_adaptive    ``DifferentialPrivacyServerSideAdaptiveClipping``  the server
client_adaptive    ``DifferentialPrivacyClientSideAdaptiveClipping``  the client (``adaptiveclipping_mod``)
=================  ===============================================  ==========================

**Update encoding.** Flower's wrappers and mods clip ``reply − current``: they expect a
reply to carry *weights* and the wrapper (or mod) to know the *weights it sent*. Our
clients reply with an *update* (a FedSGD gradient or a FedAvg delta), so fed as is,
Flower would clip ``g − θ``, which is meaningless. Instead of rewriting the wrappers we
present them the federation in *update space*: the reference they are given is the
origin (an all-zero ArrayRecord with the update's keys and shapes), so ``reply − current``
is exactly the update ``u_i`` and Flower's code clips ``u_i`` to ``C``, averages and adds
``N(0, (σC/m)²)`` to the mean update. :class:`CentralDP` then applies the noisy mean to the
real global model through :meth:`FedUpdates.apply_update` (sign for FedSGD, server
learning rate η_s, buffers), which is post-processing: the released model is as private
as the noisy mean, whatever η_s. Working at the origin is also exact in float32
(``(θ + u) − θ`` would round away small updates).

The aggregation inside the wrapper is Flower's own ``FedAvg.aggregate_train`` with a
*uniform* weight (``central-dp-weight`` = 1 stamped on every reply): the σC/m calibration
assumes each client moves the mean by at most C/m, which weighting by ``num-examples``
would break.

**Threat model.** The honest-but-curious wrapper sits outside :class:`CentralDP`: in
the ``server_*`` modes the curious server sees every raw, unclipped update (it is the
party that clips and adds the noise; central DP protects only the *released model*
against everyone else). In the ``client_*`` modes the clients clip with Flower's mods
before sending, so the server sees clipped but noise-free updates. Neither mode hides
an individual update from the server; client-level DP against the server needs local
noise (``[[defenses]]`` ``dp_sgd``/``noise``).

**Accounting.** Each released round is one (sub)sampled Gaussian mechanism on the mean
update, composed with Flower's RDP accountant
(``flwr.serverapp.RdpAccountant``, backed by Google's ``dp-accounting``; the ``flwr[dp]``
extra) at integer RDP orders (:data:`RDP_ORDERS`), with Poisson sampling rate
``q = clients_per_round / num_clients`` (our sampling is fixed-size without replacement,
drawn from the run seed; Poisson accounting is the usual approximation, and with
``amplification = false`` every round counts as a full Gaussian release, the honest choice
when the sampling seed is public). The noise multiplier composed each round is the
*effective* one: ``σ_eff = z · (C_noise / C_clip) · (n / m)`` for the update noise (z is the
wrapper's update noise multiplier, n the replies averaged), combined with the clipped-count
noise ``σ_b`` of the adaptive modes as in Andrew et al. (2021), Thm. 1:
``σ = (σ_eff⁻² + (2σ_b)⁻²)^(−1/2)``. ``C_noise ≠ C_clip`` happens in Flower's adaptive
wrappers, which update C *before* adding the noise. Training/evaluation metrics are
not covered (as in Flower).

Flower draws the noise from NumPy's global generator; :class:`CentralDP` seeds it per
round from ``(seed, round, "central_dp")`` (and restores it) so a run is reproducible. A
real deployment needs a secret noise source: anyone who knows the seed can remove the noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fl_privsim.core.seeding import seed_int
from strategies.fedupdates import FedUpdates
from strategies.wrapping import DelegatesEvaluation

if TYPE_CHECKING:
    from fl_privsim.core.config import CentralDPConfig

log = logging.getLogger(__name__)

#: Metric stamped (value 1) on every reply so that Flower's FedAvg averages uniformly.
WEIGHT_KEY = "central-dp-weight"
#: Integer RDP orders. At integer α, dp-accounting (Flower's backend) and Opacus compute the
#: same RDP of the sampled Gaussian (to ~1e-15); at fractional α they disagree (dp-accounting
#: 0.6 is up to a few % higher and gives up on α < 2 with q < 1), so fractional orders are not
#: used. ε is then ≤ a few % above Opacus' with its fractional default alphas (conservative).
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in [*range(2, 64), 128, 256, 512, 1024])
MODES = ("server_fixed", "client_fixed", "server_adaptive", "client_adaptive")


# --------------------------------------------------------------------------- accounting


def combined_noise_multiplier(update_multiplier: float, count_stddev: float) -> float:
    """σ of the adaptive-clipping mechanism (Andrew et al. 2021, Thm. 1): update noise
    ``update_multiplier`` and clipped-count noise ``count_stddev``; 0 stddev = no count noise."""
    if update_multiplier <= 0:
        return 0.0
    if count_stddev <= 0:
        return update_multiplier
    return (update_multiplier**-2 + (2 * count_stddev) ** -2) ** -0.5


class CentralAccountant:
    """ε(δ) of the rounds released so far, via Flower's RDP accountant.

    Parameters
    ----------
    num_clients, clients_per_round:
        Population and per-round sample size (q = clients_per_round / num_clients).
    delta:
        The δ at which ε is reported.
    amplification:
        Count amplification by sampling (Poisson, rate q); False = no amplification.
    """

    def __init__(
        self, *, num_clients: int, clients_per_round: int, delta: float, amplification: bool = True
    ) -> None:
        from flwr.serverapp import RdpAccountant  # lazy: needs the flwr[dp] extra

        self.num_clients = int(num_clients)
        self.clients_per_round = int(clients_per_round)
        method = SamplingMethod.POISSON if amplification else SamplingMethod.NO_AMPLIFICATION
        self.config = PrivacyConfig(
            target_delta=float(delta),
            population_size=self.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=method,
        )
        self._acc = RdpAccountant(self.config, orders=RDP_ORDERS)
        self.infinite = False  # a release without noise was composed

    @property
    def sample_rate(self) -> float:
        """q used for amplification (1.0 without it)."""
        if self.config.sampling_method is SamplingMethod.NO_AMPLIFICATION:
            return 1.0
        return self.clients_per_round / self.num_clients

    def step(self, noise_multiplier: float) -> None:
        """Compose one release with (effective) noise multiplier ``noise_multiplier``."""
        if noise_multiplier <= 0 or not math.isfinite(noise_multiplier):
            self.infinite = True
            return
        self._acc.compose(
            GaussianPrivacyEvent(
                noise_multiplier=float(noise_multiplier),
                sample_size=self.clients_per_round,
                population_size=self.num_clients,
            )
        )

    @property
    def releases(self) -> int:
        """Releases composed so far (noise-free ones excluded)."""
        return self._acc.num_releases

    def epsilon(self) -> float:
        """ε at the configured δ (``inf`` once a noise-free round was released, 0 before any)."""
        if self.infinite:
            return math.inf
        if self._acc.num_releases == 0:
            return 0.0
        return float(self._acc.get_privacy_spent().epsilon)


# --------------------------------------------------------------------------- strategies


class _UniformMean(FedAvg):
    """What Flower's DP wrapper wraps: Flower's unmodified ``FedAvg.aggregate_train``
    (uniform weights through :data:`WEIGHT_KEY`), with sampling and messaging delegated
    to our :class:`FedUpdates` (deterministic sampling, config in every message)."""

    def __init__(self, inner: FedUpdates) -> None:
        super().__init__(
            fraction_train=inner.fraction_train,
            fraction_evaluate=inner.fraction_evaluate,
            min_train_nodes=inner.min_train_nodes,
            min_evaluate_nodes=inner.min_evaluate_nodes,
            min_available_nodes=inner.min_available_nodes,
            weighted_by_key=WEIGHT_KEY,
            arrayrecord_key=inner.arrayrecord_key,
            configrecord_key=inner.configrecord_key,
        )
        self.inner = inner
        self.global_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the *real* global model (the wrapper only knows the update-space origin)."""
        if self.global_arrays is None:
            raise RuntimeError("CentralDP did not set the global model before configure_train")
        return self.inner.configure_train(server_round, self.global_arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to :class:`FedUpdates`."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to :class:`FedUpdates`."""
        return self.inner.aggregate_evaluate(server_round, replies)


def flower_wrapper(
    mode: str, strategy: Strategy, settings: CentralDPConfig, num_sampled_clients: int
) -> Strategy:
    """Flower's DP wrapper for ``mode`` around ``strategy``, configured from ``settings``."""
    if mode == "server_fixed":
        return DifferentialPrivacyServerSideFixedClipping(
            strategy, settings.noise_multiplier, settings.clipping_norm, num_sampled_clients
        )
    if mode == "client_fixed":
        return DifferentialPrivacyClientSideFixedClipping(
            strategy, settings.noise_multiplier, settings.clipping_norm, num_sampled_clients
        )
    adaptive = {
        "initial_clipping_norm": settings.initial_clipping_norm,
        "target_clipped_quantile": settings.target_clipped_quantile,
        "clip_norm_lr": settings.clip_norm_lr,
        "clipped_count_stddev": settings.clipped_count_stddev or None,
    }
    if mode == "server_adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, settings.noise_multiplier, num_sampled_clients, **adaptive
        )
    if mode == "client_adaptive":
        return DifferentialPrivacyClientSideAdaptiveClipping(
            strategy, settings.noise_multiplier, num_sampled_clients, **adaptive
        )
    raise ValueError(f"central DP mode must be one of {', '.join(MODES)}, got {mode!r}")


@contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """Seed NumPy's global generator (Flower's noise source) for a block, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        np.random.set_state(state)


class CentralDP(DelegatesEvaluation, Strategy):
    """Wrap :class:`FedUpdates` with one of Flower's central DP wrappers (see the module doc).

    Parameters
    ----------
    inner:
        The FedSGD/FedAvg strategy; its sampling, messages, metric sink and
        :meth:`~FedUpdates.apply_update` are used.
    settings:
        ``[federation.central_dp]``.
    num_clients:
        Population size (for the sampling rate of the accountant).
    seed:
        Run seed; the noise of round r is drawn from ``(seed, r, "central_dp")``.
    """

    def __init__(
        self, inner: FedUpdates, *, settings: CentralDPConfig, num_clients: int, seed: int
    ) -> None:
        if settings.mode not in MODES:
            raise ValueError(
                f"central DP mode must be one of {', '.join(MODES)}, got {settings.mode!r}"
            )
        self.inner = inner
        self.settings = settings
        self.mode = settings.mode
        self.seed = seed
        self.num_sampled_clients = settings.num_sampled_clients or inner.clients_per_round
        self.mean = _UniformMean(inner)
        self.dp = flower_wrapper(self.mode, self.mean, settings, self.num_sampled_clients)
        self.accountant = CentralAccountant(
            num_clients=num_clients,
            clients_per_round=inner.clients_per_round,
            delta=settings.delta,
            amplification=settings.amplification,
        )
        self._global: dict[int, ArrayRecord] = {}
        self._keys: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.epsilon_by_round: dict[int, float] = {}
        if settings.noise_multiplier == 0:
            log.warning(
                "central DP %s with noise_multiplier 0: updates are clipped, but there is no DP guarantee",
                self.mode,
            )

    # ------------------------------------------------------------------ helpers
    def _origin(self, arrays: ArrayRecord) -> ArrayRecord:
        """All-zero ArrayRecord over the floating-point entries of ``arrays`` (update space)."""
        state = arrays.to_numpy_ndarrays()
        keys = list(arrays.keys())
        self._keys = [
            k for k, v in zip(keys, state, strict=True) if np.issubdtype(v.dtype, np.floating)
        ]
        self._shapes = {k: v.shape for k, v in zip(keys, state, strict=True) if k in self._keys}
        return ArrayRecord(
            {k: Array(np.zeros(self._shapes[k], dtype=np.float32)) for k in self._keys}
        )

    def _to_update_space(self, reply: Message) -> None:
        """Rewrite ``reply`` in place: its update over exactly the origin's keys (missing
        entries are zero) and a uniform aggregation weight."""
        name, record = next(iter(reply.content.array_records.items()))
        update = dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))
        extra = sorted(set(update) - set(self._keys))
        if extra:
            raise ValueError(
                f"update entries {extra} are not floating-point entries of the global model"
            )
        reply.content[name] = ArrayRecord(
            {
                k: Array(
                    np.asarray(update[k], dtype=np.float32).reshape(self._shapes[k])
                    if k in update
                    else np.zeros(self._shapes[k], dtype=np.float32)
                )
                for k in self._keys
            }
        )
        metrics = next(iter(reply.content.metric_records.values()))
        metrics[WEIGHT_KEY] = 1

    def _update_noise_multiplier(self) -> float:
        """The wrapper's noise multiplier on the update (adaptive wrappers lower it to
        make room for the clipped-count noise)."""
        return float(self.dp.noise_multiplier)  # type: ignore[attr-defined]

    def _count_stddev(self) -> float:
        return float(getattr(self.dp, "clipped_count_stddev", 0.0) or 0.0)

    # ------------------------------------------------------------------ Strategy
    def summary(self) -> None:
        """Log the DP settings and the inner strategy's summary."""
        log.info(
            "central DP (%s, %r): sigma=%g, m=%d, delta=%g",
            self.mode,
            self.dp,
            self.settings.noise_multiplier,
            self.num_sampled_clients,
            self.settings.delta,
        )
        self.dp.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the real global model; give Flower's wrapper the update-space origin."""
        self._global = {server_round: arrays}
        self.mean.global_arrays = arrays
        return self.dp.configure_train(server_round, self._origin(arrays), config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, average and noise the updates with Flower's wrapper; apply the noisy mean."""
        replies = self.inner.order_replies(replies)
        self.inner.record_client_metrics(server_round, replies)
        current = self._global.get(server_round)
        ok = [r for r in replies if not r.has_error()]
        for reply in ok:
            self._to_update_space(reply)
        clip_norm = float(self.dp.clipping_norm)  # type: ignore[attr-defined]
        with _seeded_numpy(seed_int(self.seed, server_round, "central_dp")):
            noisy_mean, metrics = self.dp.aggregate_train(server_round, replies)
        if noisy_mean is None or current is None:
            log.warning(
                "round %d: central DP released nothing (errors or no replies)", server_round
            )
            return None, metrics
        if metrics is not None and WEIGHT_KEY in metrics:
            del metrics[WEIGHT_KEY]
        noise_norm = float(self.dp.clipping_norm)  # type: ignore[attr-defined]  (adaptive: already updated)
        z = self._update_noise_multiplier()
        noise_std = z * noise_norm / self.num_sampled_clients
        z_eff = z * (noise_norm / clip_norm) * (len(ok) / self.num_sampled_clients)
        sigma = (
            combined_noise_multiplier(z_eff, self._count_stddev())
            if self.mode.endswith("adaptive")
            else z_eff
        )
        self.accountant.step(sigma)
        eps = self.accountant.epsilon()
        self.epsilon_by_round[server_round] = eps
        values: dict[str, float] = {
            "clipping_norm": clip_norm,
            "noise_std": noise_std,
            "noise_multiplier_effective": sigma,
        }
        if math.isfinite(eps):
            values["epsilon"] = eps
        if self.inner.metric_sink is not None:
            self.inner.metric_sink(server_round, None, "central_dp", values)
        log.info(
            "round %d: central DP (%s) C=%.4g noise std=%.4g sigma_eff=%.4g epsilon=%.4g (delta=%g)",
            server_round,
            self.mode,
            clip_norm,
            noise_std,
            sigma,
            eps,
            self.settings.delta,
        )
        return self.inner.apply_update(current, noisy_mean), metrics

    def evaluation_strategy(self) -> Any:
        """Federated evaluation goes through Flower's DP wrapper to :class:`FedUpdates`."""
        return self.dp

    # ------------------------------------------------------------------ reporting
    def report(self) -> dict[str, Any]:
        """What the run summary records about central DP; ``formal`` is true when ε is a proven
        bound (each round a Gaussian release with sensitivity C/m of the mean, composed by RDP),
        ``not_formal_because`` says why not otherwise."""
        eps, acc = self.accountant.epsilon(), self.accountant
        reasons = []
        if self.settings.noise_multiplier <= 0 or acc.infinite:
            reasons.append("no noise (noise_multiplier = 0): the updates are only clipped, ε = ∞")
        if self.settings.amplification and acc.sample_rate < 1:
            reasons.append(
                f"the accountant assumes Poisson sampling of clients at q = {acc.clients_per_round}/"
                f"{acc.num_clients}, but the simulator draws exactly {acc.clients_per_round} clients "
                "without replacement from the run seed (no secret sampling to amplify); set "
                "amplification = false in [federation.central_dp] for a proven bound"
            )
        return {
            "mode": self.mode,
            "noise_multiplier": self.settings.noise_multiplier,
            "delta": self.settings.delta,
            "sample_rate": self.accountant.sample_rate,
            "amplification": self.settings.amplification,
            "releases": self.accountant.releases,
            "epsilon": eps if math.isfinite(eps) else None,
            "epsilon_infinite": not math.isfinite(eps),
            "formal": not reasons,
            "not_formal_because": reasons,
        }
