"""Settings and pre-launch checks of Flower's SecAgg+ (no Flower import).

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020) as implemented by flwr 1.41
(``flwr.server.workflow.SecAggPlusWorkflow`` + ``flwr.client.mod.secaggplus_mod``): each
client scales its model by ``r_i = round(n_i / W · Q) / Q``, clips it to ``[-C, C]``,
stochastically rounds it to ``Q`` levels (step ``2C/Q``) and adds pairwise and private masks
modulo ``2^32``; the server unmasks ``Σ r_i w_i`` and ``Σ r_i`` and divides. The error of the
revealed mean against the exact weighted mean is at most about ``k · (2C/Q) · W / Σ n_i``
per entry for ``k`` surviving clients (:func:`quantization_error_bound`).

Everything here is pure arithmetic on the config, so a bad combination is one
:class:`~fl_privsim.core.errors.ConfigError` line before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fl_privsim.core import plugins
from fl_privsim.core.errors import ConfigError

if TYPE_CHECKING:
    from fl_privsim.core.config import Config

#: Flower's SecAgg+ modulus (``SecAggPlusWorkflow(modulus_range=...)`` default).
MODULUS_RANGE = 2**32
WHERE = "federation.secure_aggregation"


@dataclass(frozen=True)
class SecAggSettings:
    """The resolved SecAgg+ parameters of a run (what ``SecAggPlusWorkflow`` is built with)."""

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout: float

    @property
    def quantization_step(self) -> float:
        """Width of one quantisation level, ``2C/Q``."""
        return 2.0 * self.clipping_range / self.quantization_range

    def as_dict(self) -> dict[str, float | int]:
        """The parameters and the step, for the summary."""
        return {
            "num_shares": self.num_shares,
            "reconstruction_threshold": self.reconstruction_threshold,
            "max_weight": self.max_weight,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "quantization_step": self.quantization_step,
        }


def max_examples_per_client(cfg: Config) -> int:
    """The most examples a client's update can count: one batch per local step (FedSGD: one)."""
    steps = cfg.client.local_steps if cfg.federation.protocol == "fedavg" else 1
    return cfg.client.batch_size * steps


def resolve(cfg: Config) -> SecAggSettings:
    """The SecAgg+ parameters with the config's zeros replaced by their defaults:
    ``num_shares`` = clients per round, threshold = ``ceil(2/3 · num_shares)`` (≥ 2, < shares),
    ``max_weight`` = :func:`max_examples_per_client`."""
    sa = cfg.federation.secure_aggregation
    shares = sa.num_shares or cfg.federation.clients_per_round
    threshold = sa.reconstruction_threshold or min(
        max(2, math.ceil(2 * shares / 3)), max(shares - 1, 1)
    )
    return SecAggSettings(
        num_shares=shares,
        reconstruction_threshold=threshold,
        clipping_range=float(sa.clipping_range),
        quantization_range=int(sa.quantization_range),
        max_weight=float(sa.max_weight or max_examples_per_client(cfg)),
        timeout=float(sa.timeout),
    )


def quantization_error_bound(
    settings: SecAggSettings, num_clients: int, total_examples: int
) -> float:
    """Bound on one entry's error of the revealed mean: ``k · (2C/Q) · W / Σ n`` (each client's
    stochastic rounding moves its scaled entry by less than one step; the sum is divided by
    ``Σ r_i ≈ Σ n / W``)."""
    return num_clients * settings.quantization_step * settings.max_weight / max(total_examples, 1)


def _check_modifications(cfg: Config) -> None:
    """SecAgg+ sums vectors of one shape: a modification that changes the architecture must
    reach every client of its rounds."""
    if cfg.server.role != "malicious":
        return

    everyone = set(range(cfg.federation.num_clients))
    for i, mod in enumerate(cfg.server.modifications):
        if (
            plugins.MODIFICATIONS.get(mod.name).changes_architecture
            and mod.targets.clients
            and not everyone <= set(mod.targets.clients)
        ):
            raise ConfigError(
                f"server.modifications[{i}].targets.clients: {mod.name!r} changes the architecture "
                "and secure aggregation sums vectors of one shape, so every client of its rounds "
                "must get it; set targets.clients = []"
            )


@plugins.CONFIG_CHECKS.register("secure_aggregation")
def check_config(cfg: Config) -> None:
    """Refuse what SecAgg+ cannot run, or what this phase has not built, with one line."""
    fed = cfg.federation
    unsupported = "is not supported with secure aggregation yet"
    _check_modifications(cfg)
    if fed.central_dp.mode != "off":
        raise ConfigError(
            f"federation.central_dp.mode: {fed.central_dp.mode!r} {unsupported}; "
            f'set {WHERE}.mode = "off" or federation.central_dp.mode = "off"'
        )
    for i, atk in enumerate(cfg.attacks):
        if atk.targets.clients:
            raise ConfigError(
                f"attacks[{i}].targets.clients: the server sees only the aggregate; "
                "set targets = { clients = [], aggregate = true }"
            )
    for i, an in enumerate(cfg.analyses):
        if an.targets.clients:
            raise ConfigError(
                f"analyses[{i}].targets.clients: the server sees only the aggregate and analyses "
                "run on single clients; remove the [[analyses]] entry or set "
                f'{WHERE}.mode = "off"'
            )
    k = fed.clients_per_round
    if k < 3:  # flwr 1.41: an integer num_shares must be > 2 and cannot exceed the sampled clients
        raise ConfigError(
            f"federation.clients_per_round: {k} with secure aggregation; Flower's SecAgg+ needs at "
            "least 3 sampled clients (num_shares > 2)"
        )
    s = resolve(cfg)
    if s.num_shares <= 2:
        raise ConfigError(
            f"{WHERE}.num_shares: {s.num_shares} must be greater than 2 "
            f"(0 = every sampled client, here {k})"
        )
    if s.num_shares > k:
        raise ConfigError(
            f"{WHERE}.num_shares: {s.num_shares} exceeds federation.clients_per_round ({k})"
        )
    if s.num_shares % 2 == 0 and s.num_shares != k:
        raise ConfigError(
            f"{WHERE}.num_shares: {s.num_shares} is even and not the number of sampled clients "
            f"({k}); flwr 1.41 then gives clients too few shares; use an odd number or 0"
        )
    if s.reconstruction_threshold >= s.num_shares:
        raise ConfigError(
            f"{WHERE}.reconstruction_threshold: {s.reconstruction_threshold} must be below "
            f"num_shares ({s.num_shares})"
        )
    if s.reconstruction_threshold < 2:
        raise ConfigError(
            f"{WHERE}.reconstruction_threshold: {s.reconstruction_threshold} must be at least 2"
        )
    if k * s.quantization_range >= MODULUS_RANGE:
        raise ConfigError(
            f"{WHERE}.quantization_range: {k} clients x {s.quantization_range} levels reach the "
            f"modulus 2^32 and the masked sum wraps; lower it below {MODULUS_RANGE // k}"
        )
    total_ratio = k * max_examples_per_client(cfg) / s.max_weight
    if total_ratio >= MODULUS_RANGE / s.quantization_range:
        raise ConfigError(
            f"{WHERE}.max_weight: {s.max_weight:g} is too small: the summed weights "
            f"({k} x {max_examples_per_client(cfg)} examples / max_weight = {total_ratio:g}) reach "
            f"2^32 / quantization_range = {MODULUS_RANGE / s.quantization_range:g} and wrap; "
            f"raise it (0 = {max_examples_per_client(cfg)})"
        )
