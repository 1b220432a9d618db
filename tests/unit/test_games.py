"""Inference games: balanced hidden secrets, batch construction, release = local_update,
a leaky toy (AUC ≈ 1), a constant release (AUC ≈ 0.5), membership and Adult."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adversaries.inference import (
    GAMES,
    Game,
    LossBaseline,
    MetaClassifier,
    Observations,
    Pool,
    Release,
)
from adversaries.inference.games import OBSERVATION_FIELDS
from adversaries.inference.metrics import clopper_pearson, game_metrics
from clients.defenses import build_defenses
from fl_privsim.core.paths import shared_data_dir

torch.set_num_threads(1)
ADULT = shared_data_dir() / "adult"  # honours $FL_PRIVSIM_SHARED_DATA
D, ATTR = 6, 5  # toy tabular records: 6 features, the last one is the binary attribute


def toy_pool(n: int, seed: int, classes: int = 2) -> Pool:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    a = (torch.rand(n, generator=g) < 0.4).long()
    x[:, ATTR] = a.float()
    y = (
        (x[:, 0] > 0).long()
        if classes == 2
        else torch.bucketize(x[:, 0], torch.tensor([-0.5, 0.5]))
    )
    return Pool(x, y, a)


def toy_model(kind: str = "linear", classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(D, classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, classes))


def game(kind: str, **kw: object) -> Game:
    return Game(kind, attr_column=ATTR, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", GAMES)
def test_secret_balanced_and_batches_follow_it(kind: str) -> None:
    pool, g = toy_pool(300, 1), game(kind, batch_size=4, clients_per_aggregate=2, user_records=6)
    rng = np.random.default_rng(0)
    from adversaries.inference.games import sample_secrets

    secrets = sample_secrets(2000, rng)
    lo, hi = clopper_pearson(int(secrets.sum()), secrets.size, alpha=0.001)
    assert lo < 0.5 < hi
    x, _y, index, public = g.build(pool, secrets, rng)
    a = (x[:, ATTR] == 1).long()
    has_p = a[index].reshape(len(secrets), -1)
    s = torch.from_numpy(secrets)
    if kind == "attribute":
        assert torch.equal(a[index[:, 0, 0]], s)  # the target's attribute is the secret
        assert torch.all(public["target_x"][:, ATTR] == 0)  # ... and not in the public knowledge
        assert torch.equal(public["target_x"][:, :ATTR], x[index[:, 0, 0]][:, :ATTR])
    elif kind == "property":
        assert torch.all(has_p[s == 1].sum(1) >= 1) and torch.all(has_p[s == 0].sum(1) == 0)
    elif kind == "distributional":
        share1, share0 = has_p[s == 1].float().mean(), has_p[s == 0].float().mean()
        assert abs(float(share1) - 0.5) < 0.03 and abs(float(share0) - 0.25) < 0.03
    elif kind == "membership":
        tx = public["target_x"]
        inside = (x[index[:, 0, 0]] == tx).all(1)
        assert torch.all(inside[s == 1])
    else:
        ux = public["user_x"]
        own = torch.stack(
            [
                (x[index[i, 0]][:, None, :] == ux[i][None]).all(-1).any(-1).all()
                for i in range(len(s))
            ]
        )
        assert torch.all(own[s == 1]) and own[s == 0].float().mean() < 0.2


def test_secret_cannot_reach_the_adversary() -> None:
    assert not any("secret" in f or f in ("s", "label", "truth") for f in OBSERVATION_FIELDS)
    with pytest.raises(TypeError):
        Observations(updates=torch.zeros(1, 1), secret=torch.zeros(1))  # type: ignore[call-arg]
    assert list(inspect.signature(MetaClassifier.score).parameters) == ["self", "obs"]
    assert list(inspect.signature(LossBaseline.score).parameters) == ["self", "obs"]
    # play() returns the secrets beside, never inside, the observations
    model = toy_model()
    obs, secrets = game("attribute", batch_size=2).play(
        toy_pool(200, 2), Release(model), 50, np.random.default_rng(1)
    )
    for f in dataclasses.fields(obs):
        v = getattr(obs, f.name)
        assert v is None or isinstance(v, torch.Tensor)
    assert isinstance(secrets, np.ndarray) and secrets.shape == (50,)


@pytest.mark.parametrize(
    "defenses",
    [
        [],
        [{"name": "noise", "params": {"scale": 0.01}}],
        [{"name": "pruning", "params": {"ratio": 0.2}}, {"name": "signsgd"}],
    ],
)
def test_vectorised_release_equals_local_update(defenses: list[dict]) -> None:
    # 3 classes: with 2, the output layer's gradient rows are exact negatives, so pruning
    # meets magnitude ties that float rounding (different in the two paths) would break
    model, pool = toy_model("mlp", classes=3), toy_pool(100, 3, classes=3)
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 100, (5, 2, 3)))
    fast = Release(model, defenses=build_defenses(defenses), seed=4)
    exact = Release(model, defenses=build_defenses(defenses), seed=4, force_exact=True)
    assert fast.fast and not exact.fast
    u_fast = fast.updates(pool.x, pool.y, idx)
    u_exact = exact.updates(pool.x, pool.y, idx)
    assert u_fast.shape == (5, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(u_fast, u_exact, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_release_on_a_device_equals_the_cpu_release(device: str) -> None:
    model, pool = toy_model("mlp", classes=3), toy_pool(100, 3, classes=3)
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 100, (5, 2, 3)))
    noise = build_defenses([{"name": "noise", "params": {"scale": 0.01}}])
    on_device = Release(model, defenses=noise, seed=4, device=device)
    u_device = on_device.updates(pool.x, pool.y, idx)
    u_cpu = Release(model, defenses=noise, seed=4, force_exact=True).updates(pool.x, pool.y, idx)
    assert u_device.device.type == "cpu"  # the released updates come back to the CPU
    assert next(model.parameters()).device.type == "cpu"  # the game's model is not moved
    torch.testing.assert_close(u_device, u_cpu, atol=1e-6, rtol=1e-5)


def test_exact_release_runs_dp_sgd_and_fedavg() -> None:
    model, pool = toy_model("mlp"), toy_pool(100, 3)
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 100, (3, 1, 4)))
    dp = Release(
        model,
        defenses=build_defenses(
            [{"name": "dp_sgd", "params": {"noise_multiplier": 1e-6, "max_grad_norm": 1e-3}}]
        ),
    )
    assert not dp.fast
    u = dp.updates(pool.x, pool.y, idx)
    assert torch.all(u.norm(dim=1) <= 1e-3 * (1 + 1e-3))  # clipped at C, negligible noise
    fa = Release(model, protocol="fedavg", lr=0.1, local_steps=2)
    assert fa.updates(pool.x, pool.y, idx).shape == u.shape


def _play(
    kind: str,
    model: nn.Module,
    *,
    batch: int,
    features: str = "last",
    defenses: list | None = None,
    adaptive: bool = True,
    trials: int = 400,
) -> dict:
    g = game(kind, batch_size=batch)
    release = Release(model, defenses=build_defenses(defenses or []), seed=0)
    shadow = Release(model, defenses=build_defenses(defenses or []) if adaptive else [], seed=1)
    sh_obs, sh_s = g.play(toy_pool(500, 10), shadow, trials, np.random.default_rng(1), stream=1)
    obs, s = g.play(toy_pool(500, 20), release, trials, np.random.default_rng(2))
    adv = MetaClassifier(
        model, features=features, attr_column=ATTR if kind == "attribute" else None, alignment=False
    ).fit(sh_obs, sh_s)
    return game_metrics(s, adv.score(obs), n_boot=200)


def test_leaky_toy_gives_auc_one() -> None:
    # softmax regression: the weight gradient is δ ⊗ x, so its attribute column is zero iff a = 0
    m = _play("attribute", toy_model("linear"), batch=1)
    assert m["auc"] > 0.99 and m["auc_ci"][0] > 0.97


@pytest.mark.parametrize("adaptive", [True, False])
def test_constant_release_gives_chance(adaptive: bool) -> None:
    # pruning every entry releases the zero update whatever the secret
    m = _play(
        "attribute",
        toy_model("linear"),
        batch=1,
        defenses=[{"name": "pruning", "params": {"ratio": 1.0}}],
        adaptive=adaptive,
    )
    assert m["auc_ci"][0] <= 0.5 <= m["auc_ci"][1]
    assert abs(m["auc"] - 0.5) < 0.08


def test_membership_gradient_attack_and_loss_baseline() -> None:
    model = toy_model("mlp")
    g = game("membership", batch_size=1)
    sh_obs, sh_s = g.play(
        toy_pool(500, 10), Release(model, seed=1), 300, np.random.default_rng(1), stream=1
    )
    obs, s = g.play(toy_pool(500, 20), Release(model), 300, np.random.default_rng(2))
    adv = MetaClassifier(model, features="alignment").fit(sh_obs, sh_s)
    grad_auc = game_metrics(s, adv.score(obs), n_boot=100)["auc"]
    assert grad_auc > 0.95  # |B| = 1: the update is the target's gradient or another record's
    base = game_metrics(s, LossBaseline(model, lr=0.1).score(obs), n_boot=100)
    assert base["auc_ci"][0] > 0.5  # the member's loss drops under its own step: better than chance
    assert grad_auc >= base["auc"]  # the gradient attack sees at least what the loss change shows


@pytest.mark.skipif(
    not (ADULT / "adult.data.gz").is_file(), reason=f"Adult files not found in {ADULT}"
)
def test_small_adult_attribute_game(tmp_path: Path) -> None:
    from fl_privsim.app.game import load_game_config, run_game

    cfg = load_game_config(
        None,
        [
            f'data.root="{ADULT}"',
            'data.name="adult"',
            'game.kind="attribute"',
            "game.trials=200",
            "game.shadow_trials=200",
            "game.batch_size=1",
            'game.features="alignment"',
            "game.bootstrap=100",
            "data.pool_size=1000",
            "data.aux_size=1000",
            "model.pretrain_steps=50",
        ],
    )
    run_dir, s = run_game(cfg, out=tmp_path / "run")
    assert s["attribute"] == "sex" and s["release_path"] == "vectorised"
    assert s["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # game.device auto
    assert (
        s["auc"] > 0.95 and s["auc_ci"][0] > 0.9
    )  # batch of one: the gradient gives the attribute away
    assert (run_dir / "roc.png").is_file()
