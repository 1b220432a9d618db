"""The clients' training loss (Eloul et al.'s loss choice, clients.defenses.losses): the
squared-error loss in local_update, the de-mixing coefficients and counts of the analytic
attack for it, and the config's cross-checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attack_helpers import CLASSES, make_model, matched_psnr, sample
from test_analytic_demixing import pick

from adversaries import ATTACKS, Observation
from adversaries.reconstruction._dense_demix import coefficients, demix_dense, loss_counts
from clients.defenses import build_defenses
from clients.defenses.losses import LOSSES, loss_function, softmax_mse
from clients.local_update import local_update
from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.metrics import label_accuracy

torch.set_num_threads(1)


def _observe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> Observation:
    """The FedSGD observation of ``local_update`` with ``loss`` (what a client would send)."""
    from attack_helpers import SHAPE, digits

    _, _, mean, std = digits()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = local_update(model, [(x, y)], protocol="fedsgd", lr=0.1, loss=loss)
    return Observation(
        round=1,
        client_id=0,
        protocol="fedsgd",
        model=model,
        global_params=params,
        update=res.update,
        batch_size=int(y.numel()),
        local_steps=1,
        lr=0.1,
        num_examples=int(y.numel()),
        input_shape=SHAPE,
        num_classes=CLASSES,
        data_mean=(mean,),
        data_std=(std,),
    )


def test_softmax_mse_is_the_brier_score() -> None:
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    p = F.softmax(z, 1)
    want = ((p[0] - torch.tensor([1.0, 0, 0])) ** 2).sum() + (
        (p[1] - torch.tensor([0, 0, 1.0])) ** 2
    ).sum()
    torch.testing.assert_close(softmax_mse(z, y), want / 2)
    assert loss_function("cross_entropy") is F.cross_entropy
    with pytest.raises(ValueError, match="loss must be one of cross_entropy, mse"):
        loss_function("hinge")


@pytest.mark.parametrize("loss", LOSSES)
def test_local_update_uses_the_loss(loss: str) -> None:
    model = make_model("mlp", 0)
    _, x, y = sample(list(range(6)))
    want = torch.autograd.grad(loss_function(loss)(model(x), y), list(model.parameters()))
    res = local_update(model, [(x, y)], protocol="fedsgd", lr=0.1, loss=loss)
    for (name, _), g in zip(model.named_parameters(), want, strict=True):
        torch.testing.assert_close(res.update[name], g)
    if loss == "mse":  # really another gradient than cross-entropy's
        ce = local_update(model, [(x, y)], protocol="fedsgd", lr=0.1).update
        first = next(iter(ce))
        assert not torch.allclose(ce[first], res.update[first])


def test_local_update_refuses_mse_with_per_sample_defense() -> None:
    model = make_model("mlp", 0)
    _, x, y = sample(list(range(4)))
    stack = build_defenses(
        [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}]
    )
    with pytest.raises(ValueError, match="per-sample defenses compute cross-entropy"):
        local_update(
            model,
            [(x, y)],
            protocol="fedsgd",
            lr=0.1,
            loss="mse",
            defenses=stack,
            generator=torch.Generator(),
        )


@pytest.mark.parametrize("loss", LOSSES)
def test_coefficients_are_the_logit_gradient(loss: str) -> None:
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3, 7):
        z = (torch.randn(n, CLASSES, generator=gen, dtype=torch.float64) * 2).requires_grad_()
        y = torch.randint(CLASSES, (n,), generator=gen)
        a = torch.autograd.grad(loss_function(loss)(z, y), z)[0]
        torch.testing.assert_close(
            coefficients(F.softmax(z.detach(), 1), y, n, loss), a, rtol=0, atol=1e-15
        )


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_counts_exact_when_softmax_is_shared(loss: str) -> None:
    """Equal logits for every sample (e.g. p = 1/K, or a zero input): the counts are exact."""
    gen = torch.Generator().manual_seed(2)
    for n in (2, 5, 9):
        y = torch.randint(CLASSES, (n,), generator=gen)
        row = torch.randn(1, CLASSES, generator=gen, dtype=torch.float64)
        for z0 in (torch.zeros(1, CLASSES, dtype=torch.float64), row):
            p = F.softmax(z0, 1).expand(n, -1)
            a = coefficients(p, y, n, loss)
            torch.testing.assert_close(
                loss_counts(a.sum(0), p[0], n, loss), torch.bincount(y, minlength=CLASSES)
            )


def test_demix_dense_mse_exact_in_float64() -> None:
    """Hand-made float64 squared-error gradients of z = Wx + b with distinct labels: exact X.

    (Weights of scale 0.1; at 0.3, where the softmax is confident, the mse fixed point did not
    converge in 200 iterations while the CE one did in 27: see the _dense_demix docstring.)"""
    gen = torch.Generator().manual_seed(3)
    k, d, n = 7, 30, 5
    w = torch.randn(k, d, generator=gen, dtype=torch.float64) * 0.1
    b = torch.randn(k, generator=gen, dtype=torch.float64) * 0.1
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randperm(k, generator=gen)[:n]
    a = coefficients(F.softmax(x @ w.T + b, dim=1), y, n, "mse")
    res = demix_dense(a.T @ x, a.sum(0), w, b, n, iterations=200, tol=1e-13, loss="mse")
    order = torch.argsort(res.labels)
    torch.testing.assert_close(res.x[order], x[torch.argsort(y)], rtol=0, atol=1e-8)
    # The CE model of the same gradient does not give X back: the attacker must know the loss.
    wrong = demix_dense(a.T @ x, a.sum(0), w, b, n, iterations=200, tol=1e-13)
    assert (wrong.x[torch.argsort(wrong.labels)] - x[torch.argsort(y)]).abs().max() > 1e-3


def test_analytic_attack_with_mse_clients() -> None:
    """Distinct labels through the linear model trained with mse: de-mixed when the attack
    knows the loss; identical labels stay mixed."""
    rng = np.random.default_rng(5)
    attack = ATTACKS.create("analytic", loss="mse")
    distinct, identical = [], []
    for seed in range(2):
        model = make_model("linear", seed)
        raw, x, y = sample(pick(rng.choice(CLASSES, 4, replace=False).tolist(), rng))
        res = attack(_observe(model, x, y, "mse"))
        assert res.metrics["demixed"] == 1.0 and label_accuracy(y, res.labels) == 1.0
        distinct.append(matched_psnr(raw, res.inputs))
        raw, x, y = sample(pick([int(rng.integers(CLASSES))] * 4, rng))
        identical.append(matched_psnr(raw, attack(_observe(model, x, y, "mse")).inputs))
    assert np.concatenate(distinct).min() > 40.0
    assert np.concatenate(identical).max() < np.concatenate(distinct).min() - 10.0


def test_analytic_attack_mse_on_mlp_skips_ce_refinement() -> None:
    rng = np.random.default_rng(6)
    _raw, x, y = sample(pick(rng.choice(CLASSES, 4, replace=False).tolist(), rng))
    res = ATTACKS.create("analytic", loss="mse")(_observe(make_model("mlp", 0), x, y, "mse"))
    assert (
        res.inputs.shape[0] == 4 and "refined" not in res.metrics and res.metrics["demixed"] == 0.0
    )
    with pytest.raises(ConfigError, match="loss must be one of cross_entropy, mse, got 'hinge'"):
        ATTACKS.create("analytic", loss="hinge")


def test_config_loss_cross_checks() -> None:
    base = {"client": {"loss": "mse"}, "attacks": [{"name": "analytic", "params": {"loss": "mse"}}]}
    assert config_mod.from_dict(base).client.loss == "mse"
    assert config_mod.from_dict({}).client.loss == "cross_entropy"
    with pytest.raises(
        ConfigError, match=r"attacks\[0\]\.params\.loss: the clients train with client.loss = 'mse'"
    ):
        config_mod.from_dict({"client": {"loss": "mse"}, "attacks": [{"name": "analytic"}]})
    with pytest.raises(
        ConfigError, match=r"defenses\[0\]\.name: 'dynamic_dp' computes a cross-entropy"
    ):
        config_mod.from_dict(
            {**base, "defenses": [{"name": "dynamic_dp", "params": {"schedule": "linear"}}]}
        )
    with pytest.raises(
        ConfigError, match=r"client.loss: 'hinge' is not allowed; allowed: cross_entropy, mse"
    ):
        config_mod.from_dict({"client": {"loss": "hinge"}})
    cfg = config_mod.from_dict({**base, "defenses": [{"name": "signsgd", "params": {}}]})
    assert dataclasses.asdict(cfg)["client"]["loss"] == "mse"
