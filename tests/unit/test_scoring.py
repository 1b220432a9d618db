"""The scorer: it re-draws the client's batch, matches reconstructions and scores them; the
image grid of a large batch is capped."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from adversaries.base import AttackResult
from fl_privsim.core import config as config_mod
from fl_privsim.engine.federated_data import federated_data
from fl_privsim.engine.scoring import Scorer


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
    assert v["label_accuracy"] == 1.0 and v["coverage"] == 1.0
    assert v["leakage_rate"] == 1.0


def test_asr_follows_the_configured_threshold_and_counts_missing_samples():
    scorer, fed, x, _y = _setup(threshold=0.01)
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # MSE ~ 0.03 > 0.01
    recon = torch.cat([x[:2], noisy[2:]])
    v = scorer.score(AttackResult(inputs=fed.data.normalize(recon), labels=None), 1, [0]).values
    assert v["asr"] == 0.5 and "label_accuracy" not in v and v["coverage"] == 1.0
    v = scorer.score(AttackResult(inputs=fed.data.normalize(x[:1]), labels=None), 1, [0]).values
    assert v["asr"] == 0.25 and v["coverage"] == 0.25 and v["leakage_rate"] == 1.0
    loose, fed2, _, _ = _setup(threshold=1.0)
    assert (
        loose.score(AttackResult(inputs=fed2.data.normalize(recon), labels=None), 1, [0]).values[
            "asr"
        ]
        == 1.0
    )


def test_noise_covers_every_original_but_leaks_nothing():
    scorer, fed, x, _ = _setup(threshold=0.01)
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(x.shape, generator=g)
    v = scorer.score(AttackResult(inputs=fed.data.normalize(noise), labels=None), 1, [0]).values
    assert v["coverage"] == 1.0 and v["asr"] == 0.0 and v["leakage_rate"] == 0.0


def test_leakage_rate_is_the_share_of_clients_with_a_leaked_record():
    # fedavg with 3 local steps: a client's records repeat across steps and are counted once
    cfg = config_mod.load(
        None,
        [
            "client.batch_size=4",
            "client.local_steps=3",
            'federation.protocol="fedavg"',
            "scoring.asr_mse_threshold=0.01",
        ],
    )
    fed = federated_data(cfg)
    scorer = Scorer(cfg, fed)
    clients = [0, 1, 2]
    parts = scorer.ground_truth_parts(1, clients)
    sizes = [len(p) for p in parts]
    assert all(len(np.unique(p)) == len(p) for p in parts)
    owners = scorer.ground_truth_owners(1, clients)
    assert list(owners) == [0] * sizes[0] + [1] * sizes[1] + [2] * sizes[2]
    x, _ = scorer.ground_truth(1, clients)
    g = torch.Generator().manual_seed(0)
    recon = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # every MSE > 0.01
    first_of_2 = sizes[0] + sizes[1]
    recon[: sizes[0]] = x[: sizes[0]]  # all of client 0
    recon[first_of_2] = x[first_of_2]  # one record of client 2; client 1 none
    perm = torch.randperm(x.shape[0], generator=g)
    result = AttackResult(inputs=fed.data.normalize(recon[perm]), labels=None)
    v = scorer.score(result, 1, clients).values
    assert v["num_originals"] == sum(sizes)
    assert v["asr"] == (sizes[0] + 1) / sum(sizes)
    assert v["leakage_rate"] == 2 / 3 and v["coverage"] == 1.0
    # only client 1's records, exact: one client of three
    only1 = x[sizes[0] : first_of_2]
    v = scorer.score(AttackResult(inputs=fed.data.normalize(only1), labels=None), 1, clients).values
    assert v["coverage"] == sizes[1] / sum(sizes) and v["leakage_rate"] == 1 / 3


def test_image_grid_of_a_large_batch_is_capped(tmp_path):
    from fl_privsim.core.plots import PER_ROW, grid_layout, image_grid

    small = grid_layout(4, 2)
    assert (small.shown, small.columns, small.blocks, small.caption) == (4, 4, 1, None)
    x = torch.rand(1000, 3, 8, 8)
    layout = image_grid(tmp_path / "g.png", x, [("imprint", x.flip(0)), ("refused", None)])
    assert (layout.shown, layout.columns, layout.blocks) == (32, PER_ROW, 2)
    assert layout.rows_per_block == 3
    assert layout.caption is not None and "first 32 of 1000" in layout.caption
    width, height = Image.open(tmp_path / "g.png").size
    assert width <= 100 * (1.3 * PER_ROW + 1.2) + 1 and height < 1000
    wrapped = grid_layout(20, 1)
    assert (wrapped.shown, wrapped.columns, wrapped.blocks, wrapped.caption) == (20, 16, 2, None)
