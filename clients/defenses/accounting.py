"""Privacy accounting for the DP defenses: RDP composition with Opacus' machinery.

Each noisy step of DP-SGD (Abadi et al., CCS 2016) is a subsampled Gaussian mechanism with
noise multiplier σ_t and sampling rate q. Its Rényi-DP curve (Mironov, CSF 2017; Mironov,
Talwar & Zhang 2019 for the subsampled Gaussian) is
``opacus.accountants.analysis.rdp.compute_rdp(q, σ_t, 1, orders)``; RDP composes by
addition, so a sequence of heterogeneous σ_t (the dynamic schedules of Wei & Liu, TIFS 2022)
costs ``Σ_t compute_rdp(q, σ_t, 1, orders)`` and ``get_privacy_spent`` converts it into
ε(δ). The history is Opacus' ``RDPAccountant.history`` (a list of (σ, q, steps)), which is
what a client keeps across rounds.

Caveat: ``compute_rdp`` assumes Poisson subsampling with rate q (add/remove-one adjacency).
The simulator's default batches are drawn uniformly without replacement with a fixed size B
(q = B / n); reporting the Poisson bound for them is common practice (Opacus does the same when
its data loader does not use Poisson sampling) but it is not a proof, so such ε is flagged
``epsilon_formal = 0``. With ``poisson = true`` the defenses draw Poisson batches
(:class:`PoissonSampler`), for which the bound holds.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from clients.defenses.base import BatchSamplerDefense, PerSampleDefense, TrainingInfo

#: Orders added to Opacus' defaults (1.1 … 63): larger ones up to 512 (the orders of the
#: TF-privacy accountant Wei & Liu used), which matter for large σ and small q.
_LARGE_ORDERS: tuple[float, ...] = (80.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0)


@functools.cache
def rdp_orders() -> tuple[float, ...]:
    """The RDP orders :data:`ALPHAS`: Opacus' defaults and larger ones up to 512. Opacus is
    imported on first use, not with this module (it costs every client process ~50 MB)."""
    from opacus.accountants import RDPAccountant

    return (*RDPAccountant.DEFAULT_ALPHAS, *_LARGE_ORDERS)


def __getattr__(name: str) -> Any:
    """``ALPHAS`` (:func:`rdp_orders`), computed when first read."""
    if name == "ALPHAS":
        return rdp_orders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(q: float, sigma: float) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(
        np.atleast_1d(
            compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(rdp_orders()))
        ).tolist()
    )


def rdp_of_history(history: list[tuple[float, float, int]]) -> np.ndarray:
    """Σ over the history of the RDP curve of ``steps`` subsampled-Gaussian steps, at :data:`ALPHAS`."""
    total = np.zeros(len(rdp_orders()))
    for sigma, q, steps in history:
        total += int(steps) * np.asarray(_rdp_one_step(float(q), float(sigma)))
    return total


class PrivacyAccountant:
    """An Opacus :class:`~opacus.accountants.RDPAccountant` whose state survives rounds.

    :meth:`step` records one noisy step; :meth:`epsilon` is ε(δ) of everything recorded so
    far (composition over all rounds once :meth:`load_state_dict` restored the earlier ones).
    """

    def __init__(self) -> None:
        from opacus.accountants import RDPAccountant

        self.accountant = RDPAccountant()

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step with noise multiplier σ and sampling rate q."""
        if not noise_multiplier > 0:
            raise ValueError(
                f"noise_multiplier must be > 0 for accounting, got {noise_multiplier!r}"
            )
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.accountant.step(
            noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate)
        )

    @property
    def steps(self) -> int:
        """Steps recorded so far (all rounds)."""
        return int(sum(n for _, _, n in self.accountant.history))

    def epsilon(self, delta: float) -> float:
        """ε(δ) of the composition of every recorded step (0 before the first)."""
        if not self.accountant.history:
            return 0.0
        from opacus.accountants.analysis.rdp import get_privacy_spent

        with (
            warnings.catch_warnings()
        ):  # "optimal order is the largest alpha": ε is then an upper bound
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            eps, _ = get_privacy_spent(
                orders=list(rdp_orders()), rdp=rdp_of_history(self.accountant.history), delta=delta
            )
        return float(eps)

    def state_dict(self) -> dict[str, Any]:
        """The history as JSON-able lists ``[[σ, q, steps], ...]``."""
        return {"history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (replaces the current history)."""
        history = state.get("history", [])
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]


def check_delta(delta: object) -> float:
    """``delta`` as a float in (0, 1); ``ValueError`` otherwise."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def check_rate(sample_rate: object) -> float:
    """``sample_rate`` as a float in [0, 1] (0 = derive it from batch and dataset size)."""
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, (int, float))
        or not 0 <= sample_rate <= 1
    ):
        raise ValueError(
            f"sample_rate must be a number in [0, 1] (0 = batch_size / dataset size), got {sample_rate!r}"
        )
    return float(sample_rate)


def sampling_rate(sample_rate: float, batch_size: int, dataset_size: int) -> float:
    """q: ``sample_rate`` when set (> 0), else B / n when the client's dataset size n is known,
    else 1 (no amplification by sampling: a valid, pessimistic bound)."""
    if sample_rate > 0:
        return sample_rate
    if dataset_size > 0 and batch_size > 0:
        return min(1.0, batch_size / dataset_size)
    return 1.0


def empty_gradients(
    model: nn.Module, names: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss 0 and per-sample gradients of shape ``[0, ...]``: an empty Poisson batch (the step
    then sends noise only)."""
    named = dict(model.named_parameters())
    return torch.zeros(()), {n: named[n].new_zeros((0, *named[n].shape)) for n in names}


class PoissonSampler(BatchSamplerDefense):
    """Poisson sampling: each example of the partition joins each batch independently with
    probability q = batch_size / n (batches vary in size and may be empty). Draws come from
    the client's seeded batch generator, so the scorer reproduces the batches."""

    name = "poisson"
    allows_empty = True

    def sample_batches(
        self,
        partition: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        num_batches: int,
        generator: torch.Generator,
    ) -> list[np.ndarray]:
        partition = np.asarray(partition, dtype=np.int64)
        q = min(1.0, batch_size / max(1, len(partition)))
        return [
            partition[(torch.rand(len(partition), generator=generator) < q).numpy()]
            for _ in range(num_batches)
        ]


class AccountedDefense(PerSampleDefense):
    """A per-sample DP defense with a :class:`PrivacyAccountant` that persists across rounds.

    Subclasses call :meth:`account` once per noisy step. Metrics of each update:
    ``epsilon`` (ε(δ) of all steps so far, all rounds), ``delta`` (its δ), ``steps`` (their
    number), ``sample_rate`` (q) and ``epsilon_formal`` (1 when ε is a proven bound for the
    mechanism as run: Poisson sampling at the accounted rate and a clipping bound fixed in
    advance; 0 otherwise, and :attr:`not_formal_because` says why).

    ``poisson = true`` makes the client draw Poisson batches (:meth:`batch_sampler`); the
    clipped sum is then divided by the expected batch size, as Opacus does.
    """

    accounted: ClassVar[bool] = True
    #: Whether the clipping bound is fixed in advance (subclasses set it).
    fixed_clipping: bool = True

    def __init__(self, *, delta: float, sample_rate: float, poisson: bool = False) -> None:
        self.delta = check_delta(delta)
        self.sample_rate = check_rate(sample_rate)
        if not isinstance(poisson, bool):
            raise ValueError(f"poisson must be true or false, got {poisson!r}")
        self.poisson = poisson
        self.accountant = PrivacyAccountant()
        self.q = 1.0

    @property
    def not_formal_because(self) -> list[str]:
        """Why the reported ε is not a proven (ε, δ) bound for the mechanism as configured
        (empty when it is). Known from the parameters alone, so the server can state it."""
        name = self.name or type(self).__name__
        reasons = []
        if not self.poisson:
            reasons.append(
                f"batches are fixed-size draws, not Poisson-sampled; set poisson = true in {name} "
                "for a proven bound"
            )
        elif self.sample_rate > 0:
            reasons.append(
                f"sample_rate = {self.sample_rate:g} is set by hand; the Poisson batches are drawn at "
                "batch_size / n, and the bound holds only if sample_rate is at least that (leave it 0)"
            )
        if not self.fixed_clipping:
            rule = getattr(self, "clipping", None)
            reasons.append(
                f"the clipping bound is not fixed in advance ({name} clipping = {rule!r} computes it "
                "from the batch's gradients); use clipping = 'fixed'"
                if rule
                else "the clipping bound is not fixed in advance"
            )
        return reasons

    @property
    def epsilon_formal(self) -> bool:
        """ε is a proven (ε, δ) bound: Poisson sampling at the accounted rate and fixed clipping."""
        return not self.not_formal_because

    def batch_sampler(self) -> BatchSamplerDefense | None:
        """The Poisson sampler when ``poisson`` is on (the client's batch drawing uses it)."""
        return PoissonSampler() if self.poisson else None

    def per_sample_gradients(
        self, model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x.shape[0] == 0:
            return empty_gradients(model, names)
        return super().per_sample_gradients(model, names, x, y)

    def divisor(self, batch: int) -> int:
        """What the clipped, noised sum is divided by: the expected batch size under Poisson
        sampling, the drawn one otherwise."""
        if self.poisson:
            return max(1, self.info.expected_batch_size or self.info.batch_size)
        return max(1, batch)

    def begin(self, model: nn.Module, info: TrainingInfo) -> None:
        super().begin(model, info)
        self.info = info
        self.q = sampling_rate(
            self.sample_rate, info.expected_batch_size or info.batch_size, info.dataset_size
        )

    def account(self, noise_multiplier: float) -> None:
        """Record one step of this update with noise multiplier σ (and the update's q)."""
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=self.q)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out.update(
            epsilon=self.accountant.epsilon(self.delta),
            delta=self.delta,
            steps=float(self.accountant.steps),
            sample_rate=self.q,
            epsilon_formal=float(self.epsilon_formal),
        )
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.accountant.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(state)
