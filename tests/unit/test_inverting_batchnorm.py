"""Inverting Gradients on BatchNorm models: batch-statistics BN, batched restarts, convnet_bn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_helpers import CLASSES, SHAPE, observe, sample

from adversaries import ATTACKS
from adversaries.reconstruction._common import total_variation
from adversaries.reconstruction.inverting_gradients import (
    BatchStatNorm,
    _Problem,
    attack_model,
)
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import ConvNetBN, build_model

torch.set_num_threads(1)

CPU = torch.device("cpu")


def small_bn_model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """``convnet_bn`` at width 2 on 8×8 digits: the same layers, cheap enough for float64."""
    torch.manual_seed(0)
    return ConvNetBN(SHAPE, CLASSES, width=2).to(dtype).train()


def bn_problem(tv_weight: float = 1e-2):
    _, x, y = sample([3, 4, 5])
    x = x.double()
    obs = observe(small_bn_model(), x, y)
    attack = ATTACKS.create("inverting_gradients", tv_weight=tv_weight)
    target = [t.double() for t in obs.gradient()]
    problem = _Problem(obs, attack_model(obs, CPU), target, attack.plan(obs), tv_weight)
    return obs, problem, target, y


def native_objective(obs, z, y, target, tv_weight):
    """The objective on the client's own model (native ``nn.BatchNorm2d`` in train mode)."""
    model = obs.fresh_model(CPU).train()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(z), y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    t = torch.cat([g.reshape(-1) for g in target])
    return 1 - flat @ t / (flat.norm() * t.norm()) + tv_weight * total_variation(z)


def test_convnet_bn_layers_follow_the_reference() -> None:
    model = build_model("convnet_bn", (3, 32, 32), 10)
    names = [n for n, _ in model.model.named_children()]
    blocks = [f"{k}{i}" for i in range(8) for k in ("conv", "bn", "relu")]
    expected = blocks[:18] + ["pool0"] + blocks[18:] + ["pool1", "flatten", "linear"]
    assert names == expected
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 256, 256, 256, 256, 256]
    assert model.model.linear.in_features == 36 * 64
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert all(m.training for m in model.modules())
    # small images keep a valid shape (pools that would go below 1×1 are left out)
    assert build_model("convnet_bn", SHAPE, CLASSES)(torch.zeros(2, *SHAPE)).shape == (2, 10)


def test_batch_stat_norm_is_train_mode_batchnorm() -> None:
    bn = torch.nn.BatchNorm2d(5).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    z = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 3 + 1
    assert torch.allclose(BatchStatNorm(bn)(z), bn(z), atol=1e-12, rtol=0)
    model = attack_model(observe(small_bn_model(torch.float32), *sample([1, 2])[1:]), CPU)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, BatchStatNorm) for m in model.modules()) == 8


def test_step_on_batch_stat_model_is_gradient_of_native_objective() -> None:
    """The attack's objective and input gradient equal those of the client's native-BN model."""
    obs, problem, target, y = bn_problem()
    z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    obj = native_objective(obs, zr, y, target, 1e-2)
    (expected,) = torch.autograd.grad(obj, zr)
    obj = obj.detach()
    fast, value = problem.step(z.clone().requires_grad_(True), y)
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((fast - expected).abs().max()) < 1e-9 * scale
    assert abs(float(value) - float(obj)) < 1e-12
    assert abs(problem.objective(z, y) - float(obj)) < 1e-12


def test_batched_restarts_with_batchnorm_equal_restarts_in_turn() -> None:
    """vmap over restarts (BN statistics per restart) gives each restart's own gradient."""
    _, problem, _, y = bn_problem()
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(3, 3, *SHAPE, generator=g, dtype=torch.float64)
    ys = torch.stack([y, y.roll(1), y])
    batched, bvalues = torch.func.vmap(problem.functional_step)(zs, ys)
    for r in range(3):
        grad, value = problem.step(zs[r].clone().requires_grad_(True), ys[r])
        scale = float(grad.abs().max())
        assert float((batched[r] - grad).abs().max()) < 1e-10 * scale
        assert abs(float(bvalues[r]) - float(value)) < 1e-12


def test_attack_batches_batchnorm_restarts_like_in_turn() -> None:
    """End to end: both paths give the same result to float32 rounding (few iterations)."""
    _, x, y = sample([7])
    obs = observe(small_bn_model(torch.float32), x, y)
    attack = ATTACKS.create("inverting_gradients")
    problem = _Problem(obs, attack_model(obs, CPU), obs.gradient(), attack.plan(obs), 0.0)
    assert problem.has_batch_norm and problem.batches_well(attack.plan(obs))  # vmap path
    out = {}
    for batch_restarts in (True, False):
        attack = ATTACKS.create(
            "inverting_gradients", iterations=3, restarts=3, batch_restarts=batch_restarts
        )
        out[batch_restarts] = attack(obs, generator=torch.Generator().manual_seed(0))
    a, b = out[True], out[False]
    assert a.inputs.shape == (1, *SHAPE)
    assert abs(a.metrics["final_loss"] - b.metrics["final_loss"]) < 1e-4
    assert torch.allclose(a.inputs, b.inputs, atol=1e-3)


def test_compiled_step_equals_step() -> None:
    """``compile_step``: the torch.compile'd iteration computes the same gradient and value
    (one conv-BN-ReLU block and a linear layer, float64, to keep the compilation short)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.BatchNorm2d(3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 8 * 8, CLASSES),
    ).double()
    _, x, y = sample([3, 4])
    obs = observe(model, x.double(), y)
    attack = ATTACKS.create("inverting_gradients", compile_step=True, tv_weight=1e-2)
    target = [t.double() for t in obs.gradient()]
    problem = _Problem(obs, attack_model(obs, CPU), target, attack.plan(obs), 1e-2)
    z = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    compiled, cvalue = attack._compiled(problem.functional_step)(z, y)
    grad, value = problem.step(z.clone().requires_grad_(True), y)
    assert float((compiled - grad).abs().max()) < 1e-10 * float(grad.abs().max())
    assert abs(float(cvalue) - float(value)) < 1e-12


def test_compile_step_must_be_bool() -> None:
    with pytest.raises(ConfigError, match="compile_step"):
        ATTACKS.create("inverting_gradients", compile_step="yes")
