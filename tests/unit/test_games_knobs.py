"""Adversary uncertainty knobs of the inference games: multi-round observation (the same batch
released at R models; Li et al. arXiv:2408.16913 average the logits across rounds), round /
model mismatch (shadow updates at an older model), and the image attribute game."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from adversaries.inference import Game, MetaClassifier, Pool, Release
from adversaries.inference.adversary import MultiRound
from adversaries.inference.metrics import game_metrics
from clients.defenses import build_defenses
from fl_privsim.core.errors import ConfigError

torch.set_num_threads(1)
D, ATTR = 6, 5


def toy_pool(n: int, seed: int) -> Pool:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    a = (torch.rand(n, generator=g) < 0.4).long()
    x[:, ATTR] = 2.0 * a.float()
    return Pool(x, (x[:, 0] > 0).long(), a)


def toy_model(seed: int, hidden: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if hidden:
        return nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 2))
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 2))


def noisy(model: nn.Module, scale: float, seed: int) -> Release:
    return Release(
        model, defenses=build_defenses([{"name": "noise", "params": {"scale": scale}}]), seed=seed
    )


def test_play_rounds_releases_the_same_batches_at_each_model() -> None:
    pool, models = toy_pool(200, 0), [toy_model(1, True), toy_model(1, True), toy_model(2, True)]
    g = Game("property", batch_size=4, clients_per_aggregate=2)
    obs, secrets = g.play_rounds(pool, [Release(m) for m in models], 50, np.random.default_rng(3))
    assert len(obs) == 3 and secrets.shape == (50,)
    assert torch.allclose(
        obs[0].updates, obs[1].updates
    )  # same model → the same batches give the same update
    assert not torch.allclose(obs[0].updates, obs[2].updates)
    single, s1 = g.play(pool, Release(models[0]), 50, np.random.default_rng(3))
    assert np.array_equal(s1, secrets) and torch.allclose(single.updates, obs[0].updates)


def test_multi_round_observation_beats_one_round() -> None:
    """A noisy release (fresh defense noise in each round) observed in 6 rounds leaks more than
    in 1 (the batch is the same in every round, so only the defense noise averages out)."""
    models = [toy_model(0) for _ in range(6)]
    g = Game("property", batch_size=4)
    shadow, ssec = g.play_rounds(
        toy_pool(400, 1),
        [noisy(m, 0.4, 1) for m in models],
        300,
        np.random.default_rng(1),
        stream=1,
    )
    obs, sec = g.play_rounds(
        toy_pool(400, 2), [noisy(m, 0.4, 0) for m in models], 300, np.random.default_rng(2)
    )

    def adv(m: nn.Module) -> MetaClassifier:
        return MetaClassifier(m, features="all", alignment=False, seed=0)

    one = game_metrics(sec, adv(models[0]).fit(shadow[0], ssec).score(obs[0]), n_boot=100)
    multi = game_metrics(
        sec, MultiRound([adv(m) for m in models]).fit(shadow, ssec).score(obs), n_boot=100
    )
    assert 0.5 < one["auc_ci"][0] and one["auc_ci"][1] < 0.9  # leaky, but not already perfect
    assert multi["auc"] > one["auc"] and multi["auc_ci"][0] > one["auc_ci"][0]
    concat = (
        MultiRound([adv(m) for m in models[:2]], combine="concat")
        .fit(shadow[:2], ssec)
        .score(obs[:2])
    )
    assert concat.shape == (300,) and np.all((concat >= 0) & (concat <= 1))


def test_model_mismatch_lowers_auc() -> None:
    """Shadow updates at another model (an older / different θ) make a weaker attack."""
    model, stale = toy_model(0, True), toy_model(7, True)
    g = Game("attribute", batch_size=4, attr_column=ATTR)
    aux, pool = toy_pool(400, 1), toy_pool(400, 2)
    obs, sec = g.play(pool, Release(model), 400, np.random.default_rng(2))
    aucs = {}
    for name, adv_model in (("matched", model), ("mismatched", stale)):
        shadow, ssec = g.play(aux, Release(adv_model), 400, np.random.default_rng(1), stream=1)
        clf = MetaClassifier(adv_model, features="last", attr_column=ATTR, seed=0).fit(shadow, ssec)
        aucs[name] = game_metrics(sec, clf.score(obs), n_boot=100)
    assert aucs["mismatched"]["auc"] < aucs["matched"]["auc_ci"][0]


def test_multi_round_rejects_bad_input() -> None:
    adv = MetaClassifier(toy_model(0))
    with pytest.raises(ConfigError, match="round_combine"):
        MultiRound([adv], combine="max")
    with pytest.raises(ConfigError, match="rounds"):
        MultiRound([])
    with pytest.raises(ValueError, match="expected 1 rounds"):
        MultiRound([adv]).score([])


def test_image_attribute_game_hides_the_record() -> None:
    """Without an attribute column (images) the target is a pool record with a = s, and the
    adversary learns only its label."""
    pool = toy_pool(300, 4)
    g = Game("attribute", batch_size=3, clients_per_aggregate=2)
    rng = np.random.default_rng(0)
    secrets = rng.integers(0, 2, 400)
    x, _y, index, public = g.build(pool, secrets, rng)
    assert x.shape[0] == len(pool)  # no edited records: the target is a real pool record
    assert torch.equal(pool.a[index[:, 0, 0]], torch.from_numpy(secrets))
    assert set(public) == {"target_y"} and torch.equal(public["target_y"], pool.y[index[:, 0, 0]])
