"""A real Ray federation on CUDA: clients train and attacks run on the GPU (marked ``gpu``;
skips without a CUDA GPU, e.g. in CI; run with ``pytest -m gpu`` where one is lent)."""

from __future__ import annotations

import math

import pytest
import torch

from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_clients_and_attacks_run_on_cuda(tmp_path):
    cfg = config_mod.load(
        None,
        [
            'model.name="lenet"',
            "federation.num_clients=4",
            "federation.clients_per_round=4",
            "federation.rounds=2",
            'federation.device="cuda"',
            "federation.fraction_evaluate=0",
            "output.save_images=false",
            (
                'attacks=[{name = "idlg", targets = { rounds = [1], clients = [0, 1] }},'
                ' {name = "inverting_gradients", targets = { rounds = [1], clients = [0] }}]'
            ),
        ],
    )
    _, summary = run(cfg, out=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed"
    assert summary["devices"] == {"server": "cuda", "clients": ["cuda"]}
    for name in ("idlg", "inverting_gradients"):
        attack = summary["attacks"][name]
        assert attack["attacked"] > 0 and attack["failed"] == 0 and attack["refused"] == 0
        assert math.isfinite(attack["psnr"])
    assert summary["final_accuracy"] is not None
