"""Federated evaluation asks the round's sampled clients by default, not every client."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from fl_privsim.core.config import load
from fl_privsim.core.errors import ConfigError
from strategies.fedupdates import FedUpdates


def _strategy(n: int = 1000, k: int = 100, **kw) -> FedUpdates:
    return FedUpdates(
        protocol="fedavg",
        server_lr=1.0,
        param_names=[],
        clients_per_round=k,
        seed=0,
        node_to_client={10_000 + c: c for c in range(n)},
        **kw,
    )


def test_default_config_evaluates_the_sampled_clients() -> None:
    fed = load(None).federation
    assert fed.evaluation_clients == "sampled"
    assert fed.fraction_evaluate == 1.0


def test_unknown_evaluation_pool_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="evaluation_clients"):
        load(None, overrides=['federation.evaluation_clients="everyone"'])


def test_sampled_pool_is_the_training_sample() -> None:
    s = _strategy()
    sent: list[tuple[list[int], str]] = []

    def record(r, a, c, clients, kind):
        sent.append((clients, kind))
        return []

    s._messages = record  # type: ignore[method-assign]
    for rnd in (1, 2, 3):
        trained = s.sample_clients(rnd, 100)
        assert s.evaluate_sample(rnd) == trained
        sent.clear()
        s.configure_evaluate(rnd, ArrayRecord(), ConfigRecord(), grid=None)
        assert sent == [(trained, MessageType.EVALUATE)]


def test_fraction_of_the_sample_is_a_seeded_subset() -> None:
    s = _strategy(fraction_evaluate=0.25)
    chosen = s.evaluate_sample(2)
    assert len(chosen) == 25 and set(chosen) <= set(s.sample_clients(2, 100))
    assert chosen == _strategy(fraction_evaluate=0.25).evaluate_sample(2)


def test_all_pool_keeps_flowers_meaning() -> None:
    s = _strategy(fraction_evaluate=1.0, evaluation_clients="all")
    assert s.evaluate_sample(1) == list(range(1000))
    half = _strategy(fraction_evaluate=0.5, evaluation_clients="all").evaluate_sample(1)
    assert len(half) == 500


def test_zero_fraction_turns_evaluation_off() -> None:
    s = _strategy(fraction_evaluate=0.0)
    assert s.evaluate_sample(1) == []
    assert list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid=None)) == []
