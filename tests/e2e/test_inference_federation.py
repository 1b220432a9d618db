"""Curious-server inference attacks inside a real Flower + Ray federation on UCI Adult.

experiments/inference_attacks_adult.toml, shortened to two rounds: softmax regression on Adult
with FedSGD, batch 2, six clients; every client update of both rounds is attacked by
attribute inference (sex of a target record), property inference (a Female record in the
batch) and gradient-based membership inference, each with a shadow meta-classifier trained
by the server at the round's global model on its own auxiliary records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fl_privsim import config as config_mod
from fl_privsim.simulation import run

pytestmark = pytest.mark.e2e

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
ATTACKS = ("attribute_inference", "property_inference", "membership_inference")


def test_inference_attacks_in_adult_federation(tmp_path, shared_data):
    root = shared_data / "adult"
    if not (root / "adult.data.gz").is_file():
        pytest.skip(f"needs {root} (adult.data.gz, adult.test.gz)")
    rounds = "[1, 2]"
    cfg = config_mod.load(EXPERIMENTS / "inference_attacks_adult.toml", [
        'federation.device="cpu"', f'data.root="{root}"', "federation.rounds=2",
        *[f"attacks.{i}.targets.rounds={rounds}" for i in range(len(ATTACKS))]])
    path, summary = run(cfg, out=tmp_path / "adult", show_progress=False)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for name in ATTACKS:
        a = summary["attacks"][name]
        assert a["attacked"] == 12 and a["failed"] == 0 and a["refused"] == 0, (name, a)
        assert a["trials"] == 12 and 0 <= a["positives"] <= 12  # six clients x two rounds, all scored
        mine = [r for r in rows if r["source"] == f"attack/{name}"]
        secrets = [r["value"] for r in mine if r["key"] == "secret"]
        assert len(secrets) == 12 and set(secrets) <= {0.0, 1.0}
        assert len([r for r in mine if r["key"] == "score"]) == 12
        # the server's meta-classifier learned from its own shadow updates (held-out shadow AUC)
        assert min(r["value"] for r in mine if r["key"] == "attack_shadow_auc") > 0.7, name
        if 0 < a["positives"] < 12:
            assert 0.0 <= a["auc"] <= 1.0 and a["auc_ci"][0] <= a["auc"] <= a["auc_ci"][1]
        else:
            assert math.isnan(a["auc"])
    # the last-layer update shows whether a Female record was in a batch of two
    assert summary["attacks"]["property_inference"]["auc"] > 0.9
    assert summary["final_accuracy"] > summary["initial_accuracy"]
