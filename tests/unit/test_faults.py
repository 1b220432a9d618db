"""Injected client failures: the seeded draw, the garbage check and the config keys."""

from __future__ import annotations

import pytest
import torch

from fl_privsim.app.cli import main
from fl_privsim.app.sweep_manifest import finished
from fl_privsim.core import config as config_mod
from fl_privsim.core import faults as faults_mod
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.faults import (
    failure_kind,
    garbage_update,
    injected_failures,
    update_problem,
)


def test_draw_is_seeded_per_round_and_client():
    draws = [[failure_kind(7, r, c, 0.3, "crash") for c in range(50)] for r in (1, 2)]
    assert draws == [[failure_kind(7, r, c, 0.3, "crash") for c in range(50)] for r in (1, 2)]
    assert draws[0] != draws[1]  # rounds differ
    assert draws[0] != [failure_kind(8, 1, c, 0.3, "crash") for c in range(50)]  # seeds differ
    assert all(failure_kind(7, r, c, 0.0, "mixed") is None for r in (1, 2) for c in range(50))


def test_each_client_fails_with_probability_rate():
    n = 4000
    failed = sum(failure_kind(0, 1 + i // 100, i % 100, 0.2, "crash") is not None for i in range(n))
    assert abs(failed / n - 0.2) < 0.03
    kinds = {failure_kind(0, 1, c, 0.9, "mixed") for c in range(200)}
    assert kinds == {"crash", "garbage", None}
    assert {failure_kind(0, 1, c, 0.9, "garbage") for c in range(50)} == {"garbage", None}


def test_injected_failures_lists_the_sampled_clients_that_fail():
    got = injected_failures(3, 0.5, "mixed", {1: [0, 2, 4], 2: [1, 3]})
    assert set(got) == {1, 2}
    for rnd, chosen in got.items():
        for c, kind in chosen.items():
            assert kind == failure_kind(3, rnd, c, 0.5, "mixed")
    assert set(got[1]) <= {0, 2, 4} and set(got[2]) <= {1, 3}


def test_update_problem_accepts_real_updates_and_names_garbage():
    expected = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    good = {"w": torch.ones(3, 2), "b": torch.ones(2)}
    assert update_problem(good, expected, 4) is None
    assert "non-finite" in update_problem(
        {**good, "b": torch.tensor([1.0, float("nan")])}, expected, 4
    )
    assert "shape" in update_problem({**good, "w": torch.ones(7)}, expected, 4)
    assert "unknown array" in update_problem({**good, "x": torch.ones(1)}, expected, 4)
    assert "num-examples" in update_problem(good, expected, 0)
    assert "num-examples" in update_problem(good, expected, None)
    for seed in range(6):  # both kinds of garbage are refused
        assert update_problem(garbage_update(good, seed, 1, 0), expected, 4) is not None


def test_config_keys_and_their_errors():
    cfg = config_mod.load(None, ["federation.failure_rate=0.2", 'federation.failure_mode="mixed"'])
    assert cfg.federation.failure_rate == 0.2 and cfg.federation.failure_mode == "mixed"
    assert config_mod.load(None).federation.failure_rate == 0.0
    for bad, words in (
        ("federation.failure_rate=1.0", "must be below 1"),
        ("federation.failure_rate=-0.1", "below the minimum"),
        ("federation.failure_rate=1.5", "above the maximum"),
        ('federation.failure_mode="stall"', "not allowed"),
        ("federation.round_timeout=0.5", "below the minimum"),
    ):
        with pytest.raises(ConfigError, match=words):
            config_mod.load(None, [bad])
    with pytest.raises(ConfigError, match="secure_aggregation"):
        config_mod.load(
            None,
            [
                "federation.failure_rate=0.2",
                'federation.secure_aggregation.mode="secagg+"',
                "attacks=[]",
            ],
        )


def test_bad_failure_rate_is_one_line_and_exit_2(capsys):
    assert main(["config", "--set", "federation.failure_rate=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "federation.failure_rate" in err


def test_a_sweep_cell_interrupted_midway_is_not_finished(tmp_path):
    cell = tmp_path / "cell"
    cell.mkdir()
    assert not finished(cell)
    (cell / "summary.json").write_text('{"status": "interrupted"}')
    assert not finished(cell)
    (cell / "summary.json").write_text('{"status": "completed"}')
    assert finished(cell)
    (cell / "summary.json").write_text('{"final_accuracy": 0.5}')  # written before status existed
    assert finished(cell)


def test_a_hanging_client_replies_only_after_the_round_timeout(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(faults_mod.time, "sleep", slept.append)
    with pytest.raises(RuntimeError, match="client 3 hung in round 2"):
        faults_mod.hang(7.0, 2, 3)
    assert slept == [7.0 + faults_mod.HANG_MARGIN]
    cfg = config_mod.load(None, ['federation.failure_mode="hang"', "federation.round_timeout=5"])
    assert cfg.federation.failure_mode == "hang" and cfg.federation.round_timeout == 5.0
    assert config_mod.load(None).federation.round_timeout == 3600.0
