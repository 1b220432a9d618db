"""Client defenses inside a real Flower + Ray federation: the analytic attack against a
defended and an undefended run of the same config and seed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod

pytestmark = pytest.mark.e2e

BASE = {
    "name": "defense_e2e",
    "federation": {
        "num_clients": 2,
        "clients_per_round": 2,
        "rounds": 1,
        "device": "cpu",
        "fraction_evaluate": 0.0,
    },
    "client": {"batch_size": 4},
    "attacks": [{"name": "analytic", "targets": {"rounds": [1], "clients": [0, 1]}}],
    "output": {"save_images": False},
}
DEFENSES = [
    {"name": "pruning", "params": {"ratio": 0.9}},
    {"name": "noise", "params": {"scale": 0.01}},
]


def _client_rows(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["source"] == "client_train"]


def test_pruning_and_noise_lower_the_analytic_attacks_psnr(tmp_path) -> None:
    plain_path, plain = run(config_mod.from_dict(BASE), out=tmp_path / "plain", show_progress=False)
    defended_path, defended = run(
        config_mod.from_dict({**BASE, "defenses": DEFENSES}),
        out=tmp_path / "defended",
        show_progress=False,
    )
    psnr_plain, psnr_def = (
        plain["attacks"]["analytic"]["psnr"],
        defended["attacks"]["analytic"]["psnr"],
    )
    # Undefended, the first dense layer gives the inputs back exactly (the foundation's e2e test);
    # with 90% of each layer's entries zeroed and noise on the rest, the ratio ∇W_k/∇b_k is
    # mostly 0 or noise, far from any image.
    assert psnr_plain >= 60
    assert psnr_def <= psnr_plain - 30, (psnr_plain, psnr_def)
    assert psnr_def < 20  # below the scorer's ASR threshold (MSE 0.01): no image recovered
    assert defended["attacks"]["analytic"]["asr"] < plain["attacks"]["analytic"]["asr"]

    kept = [
        r["value"]
        for r in _client_rows(defended_path)
        if r["key"] == "defense0.pruning.kept_fraction"
    ]
    assert len(kept) == 2 and all(abs(k - 0.1) < 0.01 for k in kept)
    assert not any(r["key"].startswith("defense") for r in _client_rows(plain_path))


def test_entry_point_plugin_runs_inside_ray_workers(tmp_path, monkeypatch) -> None:
    """experiments/plugin_example's ``clip_update``, found only through its entry point, is
    validated by the driver and applied by the clients in Ray's worker processes."""
    from clients.defenses import DEFENSES
    from tests.unit.defense_helpers import write_plugin_dist_info

    site = tmp_path / "site"
    src = write_plugin_dist_info(site)
    root = Path(__file__).resolve().parents[2]
    # Ray's workers start with the driver's environment; the driver's own lookup uses sys.path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(map(str, [root, site, src])))
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(DEFENSES, "_entry_points_loaded", False)
    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))
    cfg = config_mod.from_dict(
        {**BASE, "defenses": [{"name": "clip_update", "params": {"max_norm": 1e-3}}]}
    )
    path, summary = run(cfg, out=tmp_path / "plugin", show_progress=False)
    factors = [
        r["value"] for r in _client_rows(path) if r["key"] == "defense0.clip_update.clip_factor"
    ]
    assert len(factors) == 2 and all(0 < f < 1 for f in factors)
    assert summary["attacks"]["analytic"]["attacked"] == 2
