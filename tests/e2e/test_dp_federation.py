"""DP-SGD (Opacus) in a real Flower + Ray federation: ε accumulates per client across rounds
(the accountant's state survives in each node's Context.state), the summary reports the max ε,
and the analytic attack's reconstructions get worse than without DP."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from clients.defenses.accounting import ALPHAS
from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod
from fl_privsim.engine.federated_data import federated_data

pytestmark = pytest.mark.e2e

BASE = {
    "name": "dp_e2e",
    "data": {"name": "digits"},
    "model": {"name": "mlp"},
    "federation": {
        "num_clients": 2,
        "clients_per_round": 2,
        "rounds": 3,
        "device": "cpu",
        "fraction_evaluate": 0.0,
    },
    "client": {"batch_size": 4},
    "attacks": [{"name": "analytic", "targets": {"rounds": [1], "clients": [0, 1]}}],
    "output": {"save_images": False},
}
DP = [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}]
KEY = "defense0.dp_sgd.epsilon"


def _epsilon(steps: int, q: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=1.0, sample_rate=q)
    return acc.get_epsilon(1e-5, alphas=list(ALPHAS))


def test_dp_sgd_epsilon_accumulates_on_ray_and_lowers_the_analytic_psnr(tmp_path) -> None:
    plain_cfg = config_mod.from_dict(BASE)
    dp_cfg = config_mod.from_dict({**BASE, "defenses": DP})
    _, plain = run(plain_cfg, out=tmp_path / "plain", show_progress=False)
    path, defended = run(dp_cfg, out=tmp_path / "dp", show_progress=False)

    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    eps = {
        (r["client"], r["round"]): r["value"]
        for r in rows
        if r["source"] == "client_train" and r["key"] == KEY
    }
    assert sorted(eps) == [(c, r) for c in (0, 1) for r in (1, 2, 3)]
    parts = federated_data(dp_cfg).train_parts
    for c in (0, 1):
        series = [eps[(c, r)] for r in (1, 2, 3)]
        assert series[0] < series[1] < series[2]
        # FedSGD: one noisy step per round; round r's ε composes r steps, so the accountant's
        # history came back from the node's Context.state in every round of the Ray run
        q = 4 / len(parts[c])
        assert series == pytest.approx([_epsilon(r, q) for r in (1, 2, 3)], rel=1e-9)
    assert defended["epsilon"] == pytest.approx(max(eps.values()))
    assert defended["epsilon_formal"] is False  # fixed-size batches, not Poisson samples
    assert json.loads((path / "summary.json").read_text())["epsilon"] == defended["epsilon"]
    assert "epsilon" not in plain

    psnr_plain, psnr_dp = (
        plain["attacks"]["analytic"]["psnr"],
        defended["attacks"]["analytic"]["psnr"],
    )
    assert psnr_plain >= 60  # undefended: exact recovery through the first dense layer
    assert psnr_dp < 20, (psnr_plain, psnr_dp)  # below the scorer's ASR threshold (MSE 0.01)
    assert defended["attacks"]["analytic"]["asr"] < plain["attacks"]["analytic"]["asr"]
