"""Central DP (``[federation.central_dp]``): the accountant against Opacus' RDP analysis
called directly, the adaptive-noise bookkeeping against Flower's, and the config errors."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
from flwr.supercore.differential_privacy import compute_adaptive_noise_params
from opacus.accountants.analysis import rdp as opacus_rdp

from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import ConfigError
from strategies.central_dp import RDP_ORDERS, CentralAccountant, combined_noise_multiplier

ORDERS = list(RDP_ORDERS)


def _opacus_epsilon(q: float, sigmas: list[float], delta: float) -> float:
    """ε from Opacus: the RDP of each round summed (composition), then converted."""
    total = [0.0] * len(ORDERS)
    for s in sigmas:
        step = opacus_rdp.compute_rdp(q=q, noise_multiplier=s, steps=1, orders=ORDERS)
        total = [a + b for a, b in zip(total, step, strict=True)]
    eps, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)
    return float(eps)


@pytest.mark.parametrize(
    ("num_clients", "per_round", "sigma", "rounds", "delta"),
    [(10, 3, 1.0, 5, 1e-5), (100, 10, 0.8, 20, 1e-5), (4, 3, 2.0, 2, 1e-3), (10, 10, 1.5, 7, 1e-5)],
)
def test_epsilon_matches_opacus(num_clients, per_round, sigma, rounds, delta) -> None:
    acc = CentralAccountant(num_clients=num_clients, clients_per_round=per_round, delta=delta)
    by_round = []
    for _ in range(rounds):
        acc.step(sigma)
        by_round.append(acc.epsilon())
    q = per_round / num_clients
    # Same mechanism, same orders, same RDP-to-(ε, δ) conversion: agreement to float precision.
    assert by_round[-1] == pytest.approx(_opacus_epsilon(q, [sigma] * rounds, delta), rel=1e-9)
    assert by_round[0] == pytest.approx(_opacus_epsilon(q, [sigma], delta), rel=1e-9)
    assert all(a < b for a, b in itertools.pairwise(by_round))  # ε grows with every release
    assert acc.releases == rounds and acc.sample_rate == pytest.approx(q)


def test_heterogeneous_sigmas_compose_like_opacus() -> None:
    """Adaptive clipping composes a different effective σ each round."""
    sigmas = [1.2, 0.9, 1.05, 1.4]
    acc = CentralAccountant(num_clients=20, clients_per_round=5, delta=1e-5)
    for s in sigmas:
        acc.step(s)
    assert acc.epsilon() == pytest.approx(_opacus_epsilon(0.25, sigmas, 1e-5), rel=1e-9)


def test_no_amplification_is_the_full_gaussian() -> None:
    acc = CentralAccountant(num_clients=10, clients_per_round=3, delta=1e-5, amplification=False)
    for _ in range(3):
        acc.step(1.0)
    assert acc.sample_rate == 1.0
    assert acc.epsilon() == pytest.approx(_opacus_epsilon(1.0, [1.0] * 3, 1e-5), rel=1e-9)
    amplified = CentralAccountant(num_clients=10, clients_per_round=3, delta=1e-5)
    for _ in range(3):
        amplified.step(1.0)
    assert amplified.epsilon() < acc.epsilon()


def test_epsilon_falls_with_sigma_and_is_infinite_without_noise() -> None:
    eps = []
    for s in (0.7, 1.0, 2.0, 4.0):
        acc = CentralAccountant(num_clients=10, clients_per_round=5, delta=1e-5)
        acc.step(s)
        eps.append(acc.epsilon())
    assert eps == sorted(eps, reverse=True)
    acc = CentralAccountant(num_clients=10, clients_per_round=5, delta=1e-5)
    assert acc.epsilon() == 0.0
    acc.step(0.0)
    assert math.isinf(acc.epsilon())


@pytest.mark.parametrize(("sigma", "count_std"), [(1.0, 2.0), (0.5, 0.3), (2.0, 10.0)])
def test_combined_multiplier_inverts_flowers_adaptive_split(sigma, count_std) -> None:
    """Flower lowers the update noise to z so that (z, σ_b) together are worth σ
    (Andrew et al., Thm. 1); our accounting must recover σ from Flower's z."""
    std, z = compute_adaptive_noise_params(sigma, 10, count_std)
    assert std == count_std and z > sigma
    assert combined_noise_multiplier(z, std) == pytest.approx(sigma, rel=1e-12)
    assert combined_noise_multiplier(z, 0.0) == z
    assert combined_noise_multiplier(0.0, std) == 0.0


# --------------------------------------------------------------------------- config

BASE = ["federation.num_clients=10", "federation.clients_per_round=4"]


def _load(*sets: str):
    return config_mod.load(None, [*BASE, *sets])


def test_central_dp_is_off_by_default_and_round_trips() -> None:
    cfg = config_mod.load(None)
    assert cfg.federation.central_dp.mode == "off"
    cfg = _load(
        'federation.central_dp.mode="server_fixed"', "federation.central_dp.noise_multiplier=1.3"
    )
    again = config_mod.loads(config_mod.to_toml(cfg))
    assert again.federation.central_dp == cfg.federation.central_dp
    assert "[federation.central_dp]" in config_mod.to_toml(cfg)
    assert "federation.central_dp.clipping_norm" in config_mod.describe()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ['federation.central_dp.mode="local"'],
            "federation.central_dp.mode: 'local' is not allowed",
        ),
        (
            [
                'federation.central_dp.mode="server_fixed"',
                "federation.central_dp.noise_multiplier=-1",
            ],
            "federation.central_dp.noise_multiplier: -1.0 is below the minimum 0.0",
        ),
        (
            ['federation.central_dp.mode="server_fixed"', "federation.central_dp.clipping_norm=0"],
            "federation.central_dp.clipping_norm: 0.0 must be positive",
        ),
        (
            [
                'federation.central_dp.mode="client_adaptive"',
                "federation.central_dp.initial_clipping_norm=0",
            ],
            "federation.central_dp.initial_clipping_norm: 0.0 must be positive",
        ),
        (
            [
                'federation.central_dp.mode="server_adaptive"',
                "federation.central_dp.clip_norm_lr=0",
            ],
            "federation.central_dp.clip_norm_lr: 0.0 must be positive",
        ),
        (
            [
                'federation.central_dp.mode="server_adaptive"',
                "federation.central_dp.target_clipped_quantile=1.5",
            ],
            "federation.central_dp.target_clipped_quantile: 1.5 is above the maximum 1.0",
        ),
        (
            ['federation.central_dp.mode="server_fixed"', "federation.central_dp.delta=0"],
            "federation.central_dp.delta: 0.0 must be strictly between 0 and 1",
        ),
        (
            [
                'federation.central_dp.mode="server_fixed"',
                "federation.central_dp.num_sampled_clients=5",
            ],
            "federation.central_dp.num_sampled_clients: 5 exceeds federation.clients_per_round (4)",
        ),
        # default count noise 4/20 = 0.2: σ = 1 needs clipped_count_stddev > 0.5
        (
            ['federation.central_dp.mode="server_adaptive"'],
            "federation.central_dp.noise_multiplier: 1.0 must be below 2 * clipped_count_stddev (= 0.4, default 4/20)",
        ),
        (
            ['federation.central_dp.mode="server_fixed"', "federation.central_dp.sigma=1"],
            "unknown key 'sigma' in [federation.central_dp]",
        ),
    ],
)
def test_config_errors(sets, message) -> None:
    with pytest.raises(ConfigError) as err:
        _load(*sets)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_valid_adaptive_and_off_configs_load() -> None:
    cfg = _load(
        'federation.central_dp.mode="client_adaptive"',
        "federation.central_dp.clipped_count_stddev=1.0",
    )
    assert cfg.federation.central_dp.clipped_count_stddev == 1.0
    # values that would be wrong for an active mode are ignored while central DP is off
    assert _load("federation.central_dp.clipping_norm=0").federation.central_dp.mode == "off"


def test_accountant_hits_no_fractional_order_fallback(caplog) -> None:
    """Integer orders only: dp-accounting's fractional-order fallback (which logs a
    warning per order and per round) is never hit."""
    caplog.set_level(logging.WARNING)
    acc = CentralAccountant(num_clients=100, clients_per_round=10, delta=1e-5)
    acc.step(0.8)
    acc.epsilon()
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
