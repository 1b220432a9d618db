"""Injected failures through the whole server side, in-process (no Ray): the failed replies
are counted per round, left out of the aggregate, and the attacks on them record why."""

from __future__ import annotations

import json
import math

import pytest

from fl_privsim.app.simulation import write_interrupted_summary
from fl_privsim.core import config as config_mod
from fl_privsim.core.faults import injected_failures
from fl_privsim.core.results import RunFolder
from strategies.server_app import InterruptibleGrid, RunInterrupted, run_server
from tests.integration.inprocess import InProcessGrid

SETTINGS = [
    "federation.num_clients=6",
    "federation.clients_per_round=6",
    "federation.rounds=3",
    'federation.device="cpu"',
    "federation.fraction_evaluate=0",
    "federation.failure_rate=0.4",
    'federation.failure_mode="mixed"',
    'model.name="mlp"',
    'attacks=[{name = "analytic", targets = { rounds = [1, 2, 3], clients = [0, 1, 2, 3, 4, 5] }}]',
]


def expected_failures(cfg):
    sampled = {r: range(cfg.federation.num_clients) for r in range(1, cfg.federation.rounds + 1)}
    return injected_failures(cfg.seed, 0.4, "mixed", sampled)


def test_failures_are_counted_skipped_and_reported(tmp_path):
    cfg = config_mod.load(None, SETTINGS)
    expected = expected_failures(cfg)
    assert sum(len(c) for c in expected.values()) > 0
    assert {k for c in expected.values() for k in c.values()} == {"crash", "garbage"}
    folder = RunFolder(tmp_path / "run")
    summary = run_server(InProcessGrid(cfg.federation.num_clients), cfg, folder)
    assert summary["status"] == "completed"
    failures = summary["failures"]
    assert failures["by_round"] == {str(r): len(c) for r, c in expected.items()}
    assert failures["total"] == sum(len(c) for c in expected.values())
    assert failures["injected"]["by_round"] == failures["by_round"]
    assert failures["injected"]["clients"] == {str(r): sorted(c) for r, c in expected.items()}
    assert failures["aggregated_by_round"] == {
        str(r): cfg.federation.clients_per_round - len(c) for r, c in expected.items()
    }
    assert all(math.isfinite(a) for a in summary["accuracy_by_round"].values())
    crashes = sum(k == "crash" for c in expected.values() for k in c.values())
    assert summary["client_errors"]["failed"]["total"] == crashes
    attack = summary["attacks"]["analytic"]
    assert attack["skipped"] == failures["total"]
    assert attack["attacked"] == 6 * 3 - failures["total"]
    assert any(
        r.startswith("client ") and " failed in round " in r for r in attack["skipped_reasons"]
    )
    on_disk = json.loads((folder.path / "summary.json").read_text())
    assert on_disk["failures"]["by_round"] == failures["by_round"]


def test_no_failures_by_default(tmp_path):
    cfg = config_mod.load(None, [*SETTINGS[:5], 'model.name="mlp"', "attacks=[]"])
    summary = run_server(InProcessGrid(6), cfg, RunFolder(tmp_path / "run"))
    assert summary["failures"]["total"] == 0
    assert "injected" not in summary["failures"]
    assert summary["failures"]["aggregated_by_round"] == {"1": 6, "2": 6, "3": 6}


class _SlowGrid:
    """A grid whose clients never answer (push/pull as Flower's InMemoryGrid)."""

    pull_interval = 0.01

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return []

    def get_node_ids(self):
        return [1, 2]


def test_interruptible_grid_stops_waiting_when_told(tmp_path):
    stop = {"now": False}
    grid = InterruptibleGrid(_SlowGrid(), lambda: stop["now"])
    assert grid.get_node_ids() == [1, 2]  # every other attribute is the grid's
    assert grid.send_and_receive(["a", "b"], timeout=0.05) == []  # the timeout still holds
    stop["now"] = True
    with pytest.raises(RunInterrupted):
        grid.send_and_receive(["a"], timeout=3600)


def test_interrupted_summary_has_the_metrics_so_far(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.log_metric(round=1, client=None, source="server_eval", key="accuracy", value=0.5)
    sink = {"partial": lambda status: {"status": status, "accuracy_by_round": {"1": 0.5}}}
    write_interrupted_summary(folder, sink)
    summary = json.loads((folder.path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["accuracy_by_round"] == {"1": 0.5}
    assert sink["interrupted"] is True
    ray = {"address": "local", "client_actor_nodes": ["n1"]}
    write_interrupted_summary(RunFolder(tmp_path / "early"), {}, ray)  # before training started
    early = json.loads((tmp_path / "early" / "summary.json").read_text())
    assert early["status"] == "interrupted" and early["ray"] == ray


def test_a_client_that_hangs_past_the_round_timeout_counts_as_failed(tmp_path):
    settings = [
        *(s for s in SETTINGS if not s.startswith(("federation.failure_", "federation.rounds"))),
        "federation.rounds=2",
        'attacks=[{name = "analytic", targets = { rounds = [1, 2], clients = [0, 1, 2, 3, 4, 5] }}]',
        "federation.failure_rate=0.1",
        'federation.failure_mode="hang"',
        "federation.round_timeout=1",
    ]
    cfg = config_mod.load(None, settings)
    sampled = {r: range(6) for r in (1, 2)}
    expected = injected_failures(cfg.seed, 0.1, "hang", sampled)
    assert 0 < sum(len(c) for c in expected.values()) <= 3  # each hang costs ~3 s here
    summary = run_server(InProcessGrid(6), cfg, RunFolder(tmp_path / "run"))
    assert summary["status"] == "completed"
    failures = summary["failures"]
    assert failures["by_round"] == {str(r): len(c) for r, c in expected.items()}
    assert failures["injected"]["by_kind"] == {"hang": failures["total"]}
    assert failures["reasons"] == ["no reply within 1 s"]
    assert failures["aggregated_by_round"] == {str(r): 6 - len(c) for r, c in expected.items()}
    assert summary["attacks"]["analytic"]["skipped"] == failures["total"]
    assert all(math.isfinite(a) for a in summary["accuracy_by_round"].values())
