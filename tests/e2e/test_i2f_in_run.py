"""[[analyses]] i2f in a real Flower + Ray run: the predicted reconstruction error of the
client's noise defense is logged next to the attack's measured error, for each attacked client."""

from __future__ import annotations

import json
import math

import pytest

from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod

pytestmark = pytest.mark.e2e

TARGETS = {"rounds": [1], "clients": [0, 1]}
CFG = {
    "name": "i2f_e2e",
    "model": {"name": "mlp"},
    "federation": {
        "num_clients": 2,
        "clients_per_round": 2,
        "rounds": 1,
        "device": "cpu",
        "fraction_evaluate": 0.0,
    },
    "client": {"batch_size": 2},
    "defenses": [{"name": "noise", "params": {"scale": 0.01}}],
    "attacks": [{"name": "idlg", "params": {"iterations": 5}, "targets": TARGETS}],
    "analyses": [
        {
            "name": "i2f",
            "params": {"noise": "auto", "mc_samples": 2, "cg_max_iter": 50},
            "targets": TARGETS,
        }
    ],
    "output": {"save_images": False},
}


def test_i2f_is_logged_next_to_the_attack_for_each_client(tmp_path) -> None:
    path, summary = run(config_mod.from_dict(CFG), out=tmp_path / "run", show_progress=False)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    def values(source: str, client: int) -> dict:
        return {
            r["key"]: r["value"] for r in rows if r["source"] == source and r["client"] == client
        }

    for client in (0, 1):
        attack, i2f = values("attack/idlg", client), values("analysis/i2f", client)
        assert "mse" in attack, attack
        for key in ("lower_bound_rmse", "exact_rmse", "lambda_max"):
            assert math.isfinite(i2f[key]) and i2f[key] > 0, (client, key, i2f)
        assert i2f["noise_scale"] == pytest.approx(0.01)  # auto: the noise defense's σ (FedSGD)
    entry = summary["analyses"]["i2f"]
    assert entry["analysed"] == 2 and entry["failed"] == 0 and entry["skipped"] == 0
    assert entry["exact_rmse"] > 0 and "defense0.noise" in entry["noise"]
    assert json.loads((path / "summary.json").read_text())["analyses"]["i2f"]["analysed"] == 2
