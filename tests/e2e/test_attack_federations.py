"""Every reconstruction attack inside real Flower + Ray federations, configured by TOML.

Two example configs from experiments/ run end to end: R-GAP's CNN6 on the real CIFAR-10
subset with FedSGD and one image per update, and softmax regression on digits with FedAvg
(two local steps) and attacks on the round's aggregate. Attacks whose threat model a run
does not meet must refuse, with the reason recorded, and training must go on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_privsim import config as config_mod
from fl_privsim.simulation import run

pytestmark = pytest.mark.e2e

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CPU = ['federation.device="cpu"']


def _values(path: Path, attack: str, key: str) -> list:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r["value"] for r in rows if r["source"] == f"attack/{attack}" and r["key"] == key]


def _refusals(path: Path, attack: str) -> list[str]:
    return _values(path, attack, "refused")


def test_cnn6_cifar_federation_runs_every_attack(tmp_path, shared_data):
    cfg = config_mod.load(EXPERIMENTS / "all_attacks_cnn6_cifar.toml", CPU + [
        f'data.root="{shared_data / "cifar10"}"', "federation.rounds=1", "data.image_size=16"])
    path, summary = run(cfg, out=tmp_path / "cnn6", show_progress=False)
    a = summary["attacks"]
    assert a["rgap"]["attacked"] == 2 and a["rgap"]["psnr"] > 40  # R-GAP's closed form is exact here
    assert a["idlg"]["label_accuracy"] == 1.0
    for name in ("dlg", "inverting_gradients"):
        assert a[name]["attacked"] == 2 and a[name]["failed"] == 0 and a[name]["psnr"] > 0
    for name in ("analytic", "llg"):
        assert a[name]["refused"] == 1 and a[name]["attacked"] == 0, name
        assert all(f"{name}: " in r and "requires" in r for r in _refusals(path, name)), name
    assert summary["final_accuracy"] is not None


def test_linear_fedavg_federation_with_aggregates(tmp_path):
    cfg = config_mod.load(EXPERIMENTS / "all_attacks_linear_fedavg.toml", CPU)
    path, summary = run(cfg, out=tmp_path / "linear", show_progress=False)
    a = summary["attacks"]
    for name in ("analytic", "inverting_gradients", "llg", "dlg", "idlg"):
        assert a[name]["attacked"] == 3 and a[name]["failed"] == 0, name
    assert a["analytic@aggregate"]["attacked"] == 1 and a["llg@aggregate"]["attacked"] == 1
    assert a["rgap"]["refused"] == 3 and a["rgap"]["attacked"] == 0
    assert all("rgap: requires" in r for r in _refusals(path, "rgap"))
    # inverting_gradients picked its FedAvg variant and unrolled both local steps
    assert _values(path, "inverting_gradients", "attack_unrolled_steps") == [2.0] * 3
    # with 2 images per step and a bias, the per-client label counts are exact
    assert a["llg"]["label_accuracy"] == 1.0
    assert summary["final_accuracy"] > summary["initial_accuracy"]
