"""The scorer: it re-draws the client's batch, matches reconstructions and scores them."""

from __future__ import annotations

import torch

from adversaries.base import AttackResult
from fl_privsim import config as config_mod
from fl_privsim.federated_data import federated_data
from fl_privsim.scoring import Scorer


def _setup(threshold: float = 0.01):
    cfg = config_mod.load(None, ["client.batch_size=4", f"scoring.asr_mse_threshold={threshold}"])
    fed = federated_data(cfg)
    scorer = Scorer(cfg, fed)
    x, y = scorer.ground_truth(1, [0])
    return scorer, fed, x, y


def test_exact_reconstruction_scores_perfectly_in_any_order():
    scorer, fed, x, y = _setup()
    perm = torch.tensor([2, 0, 3, 1])
    res = AttackResult(inputs=fed.data.normalize(x[perm]), labels=y.flip(0))
    v = scorer.score(res, 1, [0]).values
    assert v["psnr"] > 60 and v["ssim"] > 0.999 and v["asr"] == 1.0
    assert v["avd"] < 0.01  # only the 8-bit quantisation of the reconstruction remains
    assert v["label_accuracy"] == 1.0 and v["recovered_fraction"] == 1.0


def test_asr_follows_the_configured_threshold_and_counts_missing_samples():
    scorer, fed, x, y = _setup(threshold=0.01)
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # MSE ~ 0.03 > 0.01
    recon = torch.cat([x[:2], noisy[2:]])
    v = scorer.score(AttackResult(inputs=fed.data.normalize(recon), labels=None), 1, [0]).values
    assert v["asr"] == 0.5 and "label_accuracy" not in v
    v = scorer.score(AttackResult(inputs=fed.data.normalize(x[:1]), labels=None), 1, [0]).values
    assert v["asr"] == 0.25 and v["recovered_fraction"] == 0.25
    loose, fed2, _, _ = _setup(threshold=1.0)
    assert loose.score(AttackResult(inputs=fed2.data.normalize(recon), labels=None), 1, [0]).values["asr"] == 1.0
