"""The malicious server in real Flower + Ray federations.

- imprint on digits: the crafted model reaches the clients, they build its architecture and
  train on it, the server recovers records exactly from one client's update and from the
  aggregate, training carries on on the agreed model;
- trap weights and class fishing run in one federation, each attack reading its own secrets;
- a client with ``model_inspection`` refuses the crafted round, the server counts the refusals,
  and the honest rounds train;
- with ``role = "malicious"`` and no modification the run gives the honest run's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod

pytestmark = pytest.mark.e2e

BASE = [
    'federation.device="cpu"',
    "federation.num_clients=4",
    "federation.clients_per_round=4",
    "federation.rounds=2",
    "federation.fraction_evaluate=0.0",
    "client.batch_size=8",
]
MALICIOUS = ['server.role="malicious"']


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_imprint_recovers_records_from_a_client_and_the_aggregate(tmp_path):
    cfg = config_mod.load(
        None,
        [
            *BASE,
            *MALICIOUS,
            'model.name="convnet"',
            'server.modifications=[{name="imprint", params={bins=128}, targets={rounds=[1]}}]',
            'attacks=[{name="imprint", targets={rounds=[1], clients=[0], aggregate=true}}]',
            "scoring.asr_mse_threshold=0.001",
        ],
    )
    path, summary = run(cfg, out=tmp_path / "imprint", show_progress=False)
    one, agg = summary["attacks"]["imprint"], summary["attacks"]["imprint@aggregate"]
    assert one["attacked"] == 1 and one["failed"] == 0 and one["refused"] == 0
    assert one["asr"] >= 0.75  # 8 records in 128 bins: (1 - 1/128)^7 = 95 % expected alone
    assert agg["attacked"] == 1 and agg["asr"] >= 0.6  # 32 records in 128 bins: 78 % expected alone
    assert agg["leakage_rate"] == 1.0
    assert summary["server"]["role"] == "malicious" and summary["server"]["crafted"] == {
        "1": {"imprint": [0, 1, 2, 3]}
    }
    assert (
        summary["client_errors"]["refused"]["total"] == 0
        and summary["client_errors"]["failed"]["total"] == 0
    )
    assert summary["final_accuracy"] is not None
    losses = [
        r["value"] for r in _rows(path) if r["source"] == "client_train" and r["key"] == "loss"
    ]
    assert len(losses) == 8  # every client trained in both rounds (round 1 on the crafted model)


def test_trap_weights_and_fishing_read_their_own_secrets(tmp_path):
    cfg = config_mod.load(
        None,
        [
            *BASE,
            *MALICIOUS,
            "federation.rounds=3",
            "client.batch_size=4",
            (
                'server.modifications=[{name="trap_weights", targets={rounds=[1]}}, '
                '{name="fishing", params={target_class=3}, targets={rounds=[2]}}]'
            ),
            (
                'attacks=[{name="trap_weights", targets={rounds=[1], clients=[0, 1]}}, '
                '{name="fishing", params={iterations=50}, targets={rounds=[2], clients=[], aggregate=true}}]'
            ),
            "scoring.asr_mse_threshold=0.001",
        ],
    )
    path, summary = run(cfg, out=tmp_path / "trap_fish", show_progress=False)
    trap, fish = summary["attacks"]["trap_weights"], summary["attacks"]["fishing@aggregate"]
    assert trap["attacked"] == 2 and trap["failed"] == 0 and trap["asr"] > 0
    assert fish["attacked"] == 1 and fish["failed"] == 0
    est = [
        r["value"]
        for r in _rows(path)
        if r["source"] == "attack/fishing@aggregate" and r["key"] == "attack_estimated_records"
    ]
    assert len(est) == 1 and est[0] >= 0
    assert summary["server"]["crafted"] == {
        "1": {"trap_weights": [0, 1, 2, 3]},
        "2": {"fishing": [0, 1, 2, 3]},
    }


def test_model_inspection_refuses_the_crafted_round_only(tmp_path):
    cfg = config_mod.load(
        None,
        [
            *BASE,
            *MALICIOUS,
            "federation.rounds=3",
            'server.modifications=[{name="imprint", params={bins=64}, targets={rounds=[2]}}]',
            'attacks=[{name="imprint", targets={rounds=[2], clients=[0]}}]',
            'defenses=[{name="model_inspection"}]',
        ],
    )
    _, summary = run(cfg, out=tmp_path / "inspect", show_progress=False)
    refused = summary["client_errors"]["refused"]
    assert refused["total"] == 4 and refused["by_round"] == {
        "2": 4
    }  # no false alarm in rounds 1 and 3
    assert all("model_inspection" in r for r in refused["reasons"])
    assert summary["attacks"]["imprint"]["attacked"] == 0  # nothing came back to attack
    assert summary["final_accuracy"] is not None


def test_malicious_role_without_modifications_matches_the_honest_run(tmp_path):
    common = [*BASE, 'attacks=[{name="analytic", targets={rounds=[1], clients=[0]}}]']
    _, honest = run(config_mod.load(None, common), out=tmp_path / "honest", show_progress=False)
    _, malicious = run(
        config_mod.load(None, [*common, *MALICIOUS]),
        out=tmp_path / "malicious",
        show_progress=False,
    )
    assert honest["accuracy_by_round"] == malicious["accuracy_by_round"]
    assert honest["attacks"]["analytic"]["psnr"] == malicious["attacks"]["analytic"]["psnr"]
