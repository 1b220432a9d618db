"""Inverting Gradients' FedAvg variant (unrolled local steps) and its fast objective."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from attack_helpers import CLASSES, SHAPE, digits, make_model, matched_psnr, sample

from adversaries import ATTACKS
from adversaries.reconstruction.inverting_gradients import (
    LocalPlan,
    _Problem,
    attack_model,
    label_arrangements,
    unrolled_delta,
)
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.engine.offline import aggregate_observation, client_observation

torch.set_num_threads(1)


def fedavg_obs(model, x, y, *, batch_size, lr=0.1, client_id=0):
    """A real FedAvg observation: ``local_update`` on consecutive batches of ``(x, y)``."""
    _, _, mean, std = digits()
    b = batch_size
    batches = [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]
    return client_observation(
        model,
        batches,
        protocol="fedavg",
        lr=lr,
        mean=(mean,),
        std=(std,),
        num_classes=CLASSES,
        client_id=client_id,
    )


def unroll_error(obs, x, y, plan) -> tuple[float, float]:
    """Max |unrolled delta - observed delta| and max |observed delta| over trainable params."""
    model = attack_model(obs, torch.device("cpu"))
    named = dict(model.named_parameters())
    names = obs.param_names()
    delta = unrolled_delta(model, names, [named[n] for n in names], x, y, plan)
    err = max(float((delta[n] - obs.update[n]).abs().max()) for n in names)
    return err, max(float(obs.update[n].abs().max()) for n in names)


@pytest.mark.parametrize(
    ("model_name", "dtype", "tol", "steps"),
    [
        *(("convnet", torch.float32, 1e-6, steps) for steps in (1, 2, 3)),
        # the attack evaluates BatchNorm with elementary ops (BatchStatNorm), the client with
        # the native kernel: they agree to rounding, checked in float64 (deltas reach 0.3)
        *(("convnet_bn", torch.float64, 1e-8, steps) for steps in (1, 2, 3)),
        # resnet18 on 8×8 digits normalises 2 samples at 1×1 resolution: ill-conditioned,
        # each SGD step amplifies rounding ~1e7-fold (2e-14 relative gradient difference after
        # one step, 4e-7 after two), so only one step is checked this tightly
        ("resnet18", torch.float64, 1e-8, 1),
    ],
)
def test_unroll_of_true_batches_reproduces_client_delta(
    model_name: str, dtype: torch.dtype, tol: float, steps: int
) -> None:
    """Known answer: the attack's simulation of the true batches is local_update's delta."""
    idx = list(range(10, 10 + 2 * steps))
    _, x, y = sample(idx)
    x = x.to(dtype)
    obs = fedavg_obs(make_model(model_name).to(dtype), x, y, batch_size=2)
    assert obs.local_steps == steps
    err, scale = unroll_error(obs, x, y, LocalPlan(batch_size=2, local_steps=steps, lr=0.1))
    assert scale > 1e-3  # a non-trivial update
    assert err < tol, err


def test_unroll_of_aggregate_reproduces_mean_delta() -> None:
    """Two clients (2 steps × batch 2 each) simulated from the same global model, averaged."""
    model = make_model("convnet")
    _, xa, ya = sample([1, 2, 3, 4])
    _, xb, yb = sample([50, 60, 70, 80])
    agg = aggregate_observation(
        [
            fedavg_obs(model, xa, ya, batch_size=2),
            fedavg_obs(model, xb, yb, batch_size=2, client_id=1),
        ]
    )
    assert agg.num_clients == 2
    plan = LocalPlan(batch_size=2, local_steps=2, lr=0.1, num_clients=2)
    err, scale = unroll_error(agg, torch.cat([xa, xb]), torch.cat([ya, yb]), plan)
    assert scale > 1e-3
    assert err < 1e-6, err
    # the attack's own plan for this observation is the same simulation
    assert ATTACKS.create("inverting_gradients").plan(agg) == plan


def test_fast_step_equals_differentiated_cosine_and_batched_form() -> None:
    """The VJP shortcut and the vmap form give the gradient of the cosine objective itself."""
    _, x, y = sample([5, 6, 7, 8])
    x = x.double()  # float64, so that the three computations agree to rounding
    obs = fedavg_obs(make_model("convnet").double(), x, y, batch_size=2)
    attack = ATTACKS.create("inverting_gradients", tv_weight=1e-2)
    device = torch.device("cpu")
    target = obs.gradient()
    problem = _Problem(obs, attack_model(obs, device), target, attack.plan(obs), 1e-2)
    z = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # straightforward: build the cosine's graph and differentiate it
    zr = z.clone().requires_grad_(True)
    u = problem._update(zr, y, create_graph=True)
    flat, t = torch.cat([g.reshape(-1) for g in u]), torch.cat([g.reshape(-1) for g in target])
    from adversaries.reconstruction._common import total_variation

    obj = 1 - flat @ t / (flat.norm() * t.norm()) + 1e-2 * total_variation(zr)
    (expected,) = torch.autograd.grad(obj, zr)
    fast, value = problem.step(z.clone().requires_grad_(True), y)
    batched, bvalue = torch.func.vmap(problem.functional_step)(
        torch.stack([z, z]), torch.stack([y, y])
    )
    scale = float(expected.abs().max())
    assert float((fast - expected).abs().max()) < 1e-10 * scale
    assert float((batched[1] - expected).abs().max()) < 1e-10 * scale
    assert abs(float(value) - float(obj)) < 1e-12 and abs(float(bvalue[0]) - float(obj)) < 1e-12
    assert abs(problem.objective(z, y) - float(obj)) < 1e-12


def test_label_arrangements() -> None:
    gen = torch.Generator().manual_seed(0)
    two_steps = LocalPlan(batch_size=1, local_steps=2, lr=0.1)
    arr = label_arrangements(torch.tensor([3, 1]), two_steps, 4, gen)
    assert [a.tolist() for a in arr] == [[3, 1], [1, 3]]
    # equal labels, or orderings inside one mini-batch, are not different arrangements
    assert len(label_arrangements(torch.tensor([2, 2]), two_steps, 4, gen)) == 1
    one_batch = LocalPlan(batch_size=3, local_steps=1, lr=0.1)
    assert len(label_arrangements(torch.tensor([0, 1, 2]), one_batch, 4, gen)) == 1
    # 3 steps of one sample: 3! = 6 arrangements, capped at the count asked for
    arr = label_arrangements(torch.tensor([0, 1, 2]), LocalPlan(1, 3, 0.1), 10, gen)
    assert len(arr) == 6 and len({tuple(a.tolist()) for a in arr}) == 6
    assert len(label_arrangements(torch.tensor([0, 1, 2]), LocalPlan(1, 3, 0.1), 3, gen)) == 3


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_unrolled_variant_beats_gradient_approximation(model_name: str) -> None:
    """Two local steps of one image each (lr 0.1): unrolling matches the real update,
    ``-delta / (lr * steps)`` treated as one gradient does not."""
    scores: dict[str, list[float]] = {"fedavg": [], "fedsgd": []}
    for k, idx in enumerate([[3, 11], [40, 90]]):
        raw, x, y = sample(idx)
        obs = fedavg_obs(make_model(model_name, seed=k), x, y, batch_size=1)
        for variant in scores:
            attack = ATTACKS.create(
                "inverting_gradients", iterations=120, restarts=2, variant=variant
            )
            res = attack(obs, generator=torch.Generator().manual_seed(k))
            assert sorted(res.labels.tolist()) == sorted(y.tolist())
            scores[variant] += matched_psnr(raw, res.inputs).tolist()
    fedavg, fedsgd = np.mean(scores["fedavg"]), np.mean(scores["fedsgd"])
    assert fedavg > fedsgd + 5.0, scores


def test_refusals_name_the_assumption() -> None:
    _, x, y = sample([1, 2])
    obs = fedavg_obs(make_model("mlp"), x, y, batch_size=1)
    attack = ATTACKS.create("inverting_gradients")
    attack.check(obs)
    for change, word in [
        ({"lr": 0.0}, "learning rate"),
        ({"local_steps": 0}, "local steps"),
        ({"batch_size": 0}, "batch size"),
    ]:
        with pytest.raises(ThreatModelError, match=f"inverting_gradients: requires.*{word}"):
            attack.check(dataclasses.replace(obs, **change))
    # the gradient approximation does not unroll: it needs neither the steps nor the batch size
    ATTACKS.create("inverting_gradients", variant="fedsgd").check(
        dataclasses.replace(obs, batch_size=0)
    )
    sgd = dataclasses.replace(obs, protocol="fedsgd", local_steps=1)
    with pytest.raises(ThreatModelError, match="requires a FedAvg observation.*'fedsgd'"):
        ATTACKS.create("inverting_gradients", variant="fedavg").check(sgd)
    partial = dataclasses.replace(obs, update={k: v for k, v in list(obs.update.items())[1:]})
    with pytest.raises(ThreatModelError, match="inverting_gradients: requires the update"):
        attack.check(partial)
    with pytest.raises(ConfigError, match="variant"):
        ATTACKS.create("inverting_gradients", variant="unrolled")
    with pytest.raises(ConfigError, match="batch_restarts"):
        ATTACKS.create("inverting_gradients", batch_restarts="yes")


@pytest.mark.parametrize("batch_restarts", [True, False])
def test_deterministic_given_generator(batch_restarts: bool) -> None:
    _, x, y = sample([30, 31, 32, 33])
    obs = fedavg_obs(make_model("convnet"), x, y, batch_size=2)
    attack = ATTACKS.create(
        "inverting_gradients", iterations=6, restarts=3, batch_restarts=batch_restarts
    )
    a = attack(obs, generator=torch.Generator().manual_seed(7))
    b = attack(obs, generator=torch.Generator().manual_seed(7))
    c = attack(obs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.inputs.shape == (4, *SHAPE)
    assert (
        a.metrics["unrolled_steps"] == 2
        and a.metrics["final_loss"] <= a.metrics["worst_restart_loss"]
    )


def test_quick_reproduction(shared_data, tmp_path) -> None:
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("inverting_batch_steps", quick=True, out=tmp_path / "run")
    assert (path / "table.md").exists()
    psnrs = [v for k, v in result.summary.items() if k.startswith("psnr_")]
    assert psnrs and all(np.isfinite(psnrs))
    assert "24000" in result.table or "24k" in result.table
