"""[[analyses]]: the noise the I²F assumes, read from [[defenses]], and the analysis itself."""

from __future__ import annotations

import math

import pytest
import torch

from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import ConfigError
from fl_privsim.engine.analyses import I2FAnalysis, NoiseModel, build_analyses, noise_from_defenses

torch.set_num_threads(1)


def _cfg(defenses, protocol="fedsgd", **client):
    return config_mod.from_dict(
        {
            "federation": {
                "num_clients": 2,
                "clients_per_round": 2,
                "rounds": 3,
                "protocol": protocol,
            },
            "client": {"batch_size": 4, **client},
            "attacks": [{"name": "idlg", "targets": {"rounds": [1], "clients": [0]}}],
            "defenses": defenses,
        }
    )


def test_no_noise_defense_gives_none() -> None:
    assert noise_from_defenses(_cfg([])) is None
    assert noise_from_defenses(_cfg([{"name": "pruning", "params": {"ratio": 0.5}}])) is None


def test_noise_defense_fedsgd_and_fedavg() -> None:
    n = noise_from_defenses(
        _cfg([{"name": "noise", "params": {"scale": 0.01, "distribution": "laplace"}}])
    )
    assert n == NoiseModel("laplace", 0.01, "defense0.noise")
    # FedAvg: noise on the update, gradient = -delta / (lr K)
    n = noise_from_defenses(
        _cfg([{"name": "noise", "params": {"scale": 0.01}}], "fedavg", local_steps=2, lr=0.5)
    )
    assert n.kind == "gaussian" and n.scale == pytest.approx(0.01 / (0.5 * 2))
    # per-step noise: averaged over K steps
    n = noise_from_defenses(
        _cfg(
            [{"name": "noise", "params": {"scale": 0.01, "apply_to": "step"}}],
            "fedavg",
            local_steps=4,
        )
    )
    assert n.scale == pytest.approx(0.01 / 2)


def test_dp_noise_is_sigma_c_over_b() -> None:
    n = noise_from_defenses(
        _cfg([{"name": "dp_sgd", "params": {"noise_multiplier": 2.0, "max_grad_norm": 0.5}}])
    )
    assert n.kind == "gaussian" and n.scale == pytest.approx(2.0 * 0.5 / 4)
    n = noise_from_defenses(
        _cfg([{"name": "dynamic_dp", "params": {"sigma": 1.5, "clip_norm": 2.0}}])
    )
    assert n.scale == pytest.approx(1.5 * 2.0 / 4)


def test_several_noises_add_their_variances() -> None:
    n = noise_from_defenses(
        _cfg(
            [
                {"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}},
                {"name": "noise", "params": {"scale": 0.25, "distribution": "laplace"}},
            ]
        )
    )
    assert n.kind == "gaussian" and n.scale == pytest.approx(math.sqrt(0.25**2 + 2 * 0.25**2))


def test_config_validates_analyses() -> None:
    base = {
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 1},
        "attacks": [{"name": "idlg"}],
    }
    cfg = config_mod.from_dict(
        {**base, "analyses": [{"name": "i2f", "params": {"noise": "gaussian", "scale": 0.1}}]}
    )
    (plan,) = build_analyses(cfg)
    assert plan.wants(1, 0) and not plan.wants(1, None) and not plan.wants(2, 0)
    assert config_mod.loads(config_mod.to_toml(cfg)) == cfg
    for bad, msg in (
        (({"name": "nope"}), "analyses[0].name"),
        ({"name": "i2f", "params": {"noise": "gaussian"}}, "scale > 0"),
        ({"name": "i2f", "params": {"mc": 3}}, "analyses[0].params"),
        ({"name": "i2f", "targets": {"clients": [5]}}, "does not exist"),
    ):
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            config_mod.from_dict({**base, "analyses": [bad]})


def test_i2f_analysis_is_finite_positive_and_grows_with_noise() -> None:
    cfg = _cfg([])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3)
    )
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 2])
    a = I2FAnalysis(cfg, noise="gaussian", scale=0.01, mc_samples=4)
    out = [
        a(model, x, y, NoiseModel("gaussian", s, "t"), (0.5,), torch.Generator().manual_seed(0))
        for s in (0.01, 0.1)
    ]
    for o in out:
        for k in ("lower_bound_rmse", "exact_rmse", "lambda_max", "lower_bound", "exact"):
            assert math.isfinite(o[k]) and o[k] > 0, (k, o)
        assert o["lower_bound_rmse"] == pytest.approx(o["lower_bound"] * 0.5 / math.sqrt(32))
    # I²F is linear in δ: ten times the noise, ten times the value (same draws)
    assert out[1]["lower_bound"] == pytest.approx(10 * out[0]["lower_bound"], rel=1e-4)
