"""Soteria (Sun et al., CVPR 2021): which columns it zeroes, that nothing else changes, and
that it lowers the analytic attack's PSNR when the defended layer is the first dense layer."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from attack_helpers import make_model, matched_psnr, observe, sample
from torch import nn

from adversaries import ATTACKS
from clients.defenses import build_defenses
from clients.defenses.soteria import (
    Soteria,
    input_sensitivity_exact,
    input_sensitivity_hutchinson,
    representation,
)
from clients.local_update import local_update
from fl_privsim.core.errors import ConfigError

torch.set_num_threads(1)


def _update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: dict | None,
    *,
    protocol: str = "fedsgd",
) -> dict[str, torch.Tensor]:
    defenses = build_defenses([{"name": "soteria", "params": params}]) if params is not None else []
    return local_update(
        model,
        [(x, y)],
        protocol=protocol,
        lr=0.1,
        defenses=defenses,
        generator=torch.Generator().manual_seed(0),
    ).update


def _linear_model(seed: int = 0) -> nn.Sequential:
    """r = W1 x + b1 (a linear feature extractor), so ∂r_j/∂x_b = W1[j] for every sample."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Linear(5, 3))
    with torch.no_grad():  # rows of clearly different norms
        model[1].weight.mul_(torch.tensor([0.2, 3.0, 1.0, 0.5, 7.0]).unsqueeze(1))
    return model


def _expected_mask(model: nn.Sequential, x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Closed form: ρ_j = mean_b |r_{b,j}| / ‖W1[j]‖; zero the round(ratio·m) smallest."""
    with torch.no_grad():
        r = model[1](x.flatten(1))
        rho = r.abs().mean(0) / model[1].weight.norm(dim=1)
    n = int(np.floor(ratio * rho.numel() + 0.5))
    mask = torch.zeros(rho.numel(), dtype=torch.bool)
    mask[torch.argsort(rho)[:n]] = True
    return mask


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_known_answer_ranking_and_only_that_layer_changes(method: str, ratio: float) -> None:
    model = _linear_model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, generator=gen), torch.tensor([0, 1, 2, 0])
    want = _expected_mask(model, x, ratio)
    plain = _update(model, x, y, None)
    got = _update(
        model, x, y, {"pruning_ratio": ratio, "layer": "2", "method": method, "probes": 4000}
    )
    cols_zero = (got["2.weight"] == 0).all(dim=0)
    assert torch.equal(cols_zero, want) and int(want.sum()) == round(ratio * 5)
    # the kept columns and every other parameter are bit-identical to the undefended gradient
    assert torch.equal(got["2.weight"][:, ~want], plain["2.weight"][:, ~want])
    for name in ("1.weight", "1.bias", "2.bias"):
        assert torch.equal(got[name], plain[name])


def test_sensitivities_match_closed_form() -> None:
    model = _linear_model(3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    xg, r = representation(model, model[2], x)
    truth = model[1].weight.detach().norm(dim=1).expand(4, 5)
    torch.testing.assert_close(input_sensitivity_exact(r, xg, chunk=2), truth)
    est = input_sensitivity_hutchinson(
        r, xg, probes=4000, generator=torch.Generator().manual_seed(0)
    )
    assert float(((est - truth).abs() / truth).max()) < 0.12  # relative std of the estimate ≈ 1.1%


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8, 1.0])
def test_default_layer_is_first_linear_and_fraction_exact(ratio: float) -> None:
    model = make_model("mlp", 1)
    _, x, y = sample([3, 40, 77, 120])
    plain = _update(model, x, y, None)
    got = _update(model, x, y, {"pruning_ratio": ratio})
    # the input features of mlp's first Linear never all vanish on digits, so a zero column of
    # the defended gradient is exactly a pruned one
    zero = (got["1.weight"] == 0).all(dim=0)
    assert not (plain["1.weight"] == 0).all(dim=0).any()
    assert int(zero.sum()) == int(np.floor(ratio * 64 + 0.5))
    assert torch.equal(got["1.weight"][:, ~zero], plain["1.weight"][:, ~zero])
    assert all(torch.equal(got[n], plain[n]) for n in plain if n != "1.weight")


def test_first_layer_ranking_is_by_input_magnitude() -> None:
    """r = x for mlp's first Linear: ∂r_j/∂x = e_j, so ρ_j = mean_b |x_{b,j}|."""
    model = make_model("mlp", 2)
    _, x, y = sample([5, 6])
    got = _update(model, x, y, {"pruning_ratio": 0.5})
    rho = x.flatten(1).abs().mean(0)
    zero = (got["1.weight"] == 0).all(dim=0)
    assert float(rho[zero].max()) <= float(rho[~zero].min())


def test_batchnorm_buffers_and_fedavg_step_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)
    )
    _, x, y = sample([1, 2, 3, 4])
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    plain = _update(a, x, y, None, protocol="fedavg")
    got = _update(b, x, y, {"pruning_ratio": 0.5, "layer": "4"}, protocol="fedavg")
    for n in ("2.running_mean", "2.running_var", "1.weight", "2.weight", "4.bias"):
        assert torch.equal(got[n], plain[n]), n
    assert int((got["4.weight"] == 0).all(dim=0).sum()) >= 8


def test_lowers_analytic_psnr_on_first_dense_layer() -> None:
    attack = ATTACKS.create("analytic")
    for batch in ([11], [20, 300, 555, 901]):
        raw, x, y = sample(batch)
        model = make_model("mlp", 0)
        obs = observe(model, x, y)
        plain = matched_psnr(raw, attack(obs).inputs)
        defended = dataclasses.replace(obs, update=_update(model, x, y, {"pruning_ratio": 0.8}))
        psnr = matched_psnr(raw, attack(defended).inputs)
        assert plain.mean() >= 40.0  # the undefended attack works here
        assert psnr.mean() < plain.mean() - 20.0, (batch, plain, psnr)


@pytest.mark.parametrize(
    "params",
    [
        {"pruning_ratio": 1.5},
        {"pruning_ratio": True},
        {"method": "svd"},
        {"probes": 0},
        {"max_exact_width": 2.5},
        {"layer": 3},
    ],
)
def test_bad_params(params: dict) -> None:
    with pytest.raises(ConfigError, match="soteria"):
        build_defenses([{"name": "soteria", "params": params}])


def test_unknown_layer_and_stacking() -> None:
    d = Soteria(layer="9")
    with pytest.raises(ConfigError, match="layer '9'.*allowed: '1', '3', '5'"):
        d.begin(make_model("mlp", 0), None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at most one"):
        build_defenses([{"name": "soteria"}, {"name": "soteria"}])
    with pytest.raises(ConfigError, match="execution order"):
        build_defenses([{"name": "pruning", "params": {"ratio": 0.5}}, {"name": "soteria"}])
    build_defenses([{"name": "soteria"}, {"name": "pruning", "params": {"ratio": 0.5}}])


def test_unknown_layer_fails_before_launch() -> None:
    """An architecture mismatch is one ConfigError before Ray starts, not a worker traceback."""
    from fl_privsim.app.simulation import validate_before_launch
    from fl_privsim.core import config as config_mod

    def cfg(layer: str) -> config_mod.Config:
        return config_mod.from_dict(
            {
                "data": {"name": "digits"},
                "model": {"name": "mlp"},
                "defenses": [{"name": "soteria", "params": {"layer": layer}}],
            }
        )

    validate_before_launch(cfg("3"))  # mlp's second Linear
    with pytest.raises(ConfigError, match=r"defenses\[0\].*'nope'.*nn.Linear"):
        validate_before_launch(cfg("nope"))
