"""`fl-privsim reproduce inference_aggregation` at tiny settings (needs ../shared/data/adult)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl_privsim.app.reproduce import run_reproduction
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.paths import shared_data_dir

torch.set_num_threads(1)
ADULT = shared_data_dir() / "adult"  # honours $FL_PRIVSIM_SHARED_DATA
TINY = [
    'datasets=["adult"]',
    'games=["attribute", "user"]',
    "batch_sizes=[1, 4]",
    "clients=[1, 3]",
    "trials=40",
    "shadow_trials=50",
    'defense_datasets=["adult"]',
    'defense_games=["attribute"]',
    'defenses=["none", "signsgd"]',
    "defense_trials=30",
    "defense_shadow_trials=40",
    "pretrain_steps=10",
    "adult_pool=200",
    "bootstrap=20",
]


@pytest.mark.skipif(
    not (ADULT / "adult.data.gz").is_file(), reason="../shared/data/adult is absent"
)
def test_inference_aggregation_tiny(tmp_path: Path) -> None:
    path, result = run_reproduction("inference_aggregation", overrides=TINY, out=tmp_path / "run")
    agg = json.loads((path / "aggregation.json").read_text())
    assert len(agg) == 2 * (2 + 2)  # 2 games x (2 batch sizes + 2 client counts)
    for r in agg:
        assert (
            0 <= r["auc"] <= 1
            and r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
            and r["trials"] == 40
        )
    same = [r for r in agg if r["game"] == "user" and r["batch_size"] == 4 and r["clients"] == 1]
    assert len(same) == 2 and same[0]["auc"] == same[1]["auc"]  # K = 1 reuses the batch-4 point
    dfn = json.loads((path / "defenses.json").read_text())
    assert {(r["defense"], r["adversary"]) for r in dfn} == {
        ("none", "-"),
        ("signsgd", "static"),
        ("signsgd", "adaptive"),
    }
    for f in (
        "auc_vs_batch.png",
        "auc_vs_clients.png",
        "defenses.png",
        "aggregation.csv",
        "table.md",
    ):
        assert (path / f).is_file()
    assert "| adult | attribute |" in result.table


def test_inference_aggregation_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowed: attribute, property, distributional, user"):
        run_reproduction(
            "inference_aggregation", overrides=['games=["membership"]'], out=tmp_path / "a"
        )
    with pytest.raises(ConfigError, match="allowed: none, pruning, signsgd"):
        run_reproduction(
            "inference_aggregation", overrides=['defenses=["magic"]'], out=tmp_path / "b"
        )
