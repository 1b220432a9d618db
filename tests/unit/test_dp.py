"""DP client defenses: dynamic_dp (Wei & Liu 2022) and dp_sgd (Opacus), and their RDP accounting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.validators import ModuleValidator

from clients.defenses import TrainingInfo, build_defenses
from clients.defenses.accounting import ALPHAS, PoissonSampler, PrivacyAccountant
from clients.defenses.dp_sgd import DPSGD
from clients.defenses.dynamic_dp import DynamicDP
from clients.defenses.per_sample import per_sample_gradients
from clients.defenses.schedules import cyclic, exponential, linear, staircase
from clients.local_update import local_update
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import build_model

torch.set_num_threads(1)
FAST = settings(max_examples=25, deadline=None)


def _info(batch: int, *, rnd: int = 1, steps: int = 1, n: int = 0) -> TrainingInfo:
    return TrainingInfo("fedavg", 0.1, steps, batch, rnd, n, 0)


def _per_sample(norms: list[float], dims: tuple[int, ...] = (3, 5)) -> dict[str, torch.Tensor]:
    """Per-sample gradients over two tensors whose flat norm for sample i is norms[i]."""
    gen = torch.Generator().manual_seed(len(norms))
    grads = {
        f"p{k}": torch.randn(len(norms), d, generator=gen, dtype=torch.float64)
        for k, d in enumerate(dims)
    }
    flat = torch.cat(list(grads.values()), dim=1).norm(dim=1)
    scale = torch.tensor(norms, dtype=torch.float64) / flat
    return {n: g * scale[:, None] for n, g in grads.items()}


# ----------------------------------------------------------------------------- clipping


@FAST
@given(
    norms=st.lists(st.floats(1e-3, 100.0), min_size=1, max_size=6),
    clipping=st.sampled_from(["fixed", "l2max", "mean"]),
    scope=st.sampled_from(["flat", "layer"]),
    c=st.floats(0.05, 10.0),
)
def test_dynamic_dp_clipped_per_sample_norms_are_at_most_c_t(norms, clipping, scope, c) -> None:
    d = DynamicDP(sigma=1.0, clipping=clipping, clip_scope=scope, clip_norm=c)
    grads = _per_sample(norms)
    clipped, bounds = d.clip(grads)
    groups = [list(grads)] if scope == "flat" else [[n] for n in grads]
    for names, bound in zip(groups, bounds, strict=True):
        if clipping != "fixed":
            assert 0.1 <= bound <= 8.0
        group_norms = torch.cat([clipped[n] for n in names], dim=1).norm(dim=1)
        assert (group_norms <= bound * (1 + 1e-9)).all()
        orig = torch.cat([grads[n] for n in names], dim=1).norm(dim=1)
        # a sample already inside the ball is untouched
        inside = orig <= bound
        assert torch.allclose(group_norms[inside], orig[inside])


def test_dynamic_dp_clip_rules() -> None:
    grads = _per_sample([0.05, 1.0, 3.0, 20.0])
    assert DynamicDP(sigma=1.0, clipping="l2max").clip(grads)[1] == [
        8.0
    ]  # max 20 clamped to clip_max
    assert DynamicDP(sigma=1.0, clipping="mean").clip(grads)[1] == [pytest.approx(24.05 / 4)]
    assert DynamicDP(sigma=1.0, clipping="l2max", clip_max=32).clip(grads)[1] == [
        pytest.approx(20.0)
    ]
    assert DynamicDP(sigma=1.0, clipping="fixed", clip_norm=2.5).clip(grads)[1] == [2.5]


@FAST
@given(scale=st.floats(1e-2, 1e3), c=st.floats(0.1, 5.0))
def test_dp_sgd_single_sample_gradient_is_clipped_to_c(scale, c) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    d = DPSGD(max_grad_norm=c, noise_multiplier=1e-12)
    x, y = torch.randn(1, 4) * scale, torch.tensor([1])
    res = local_update(
        model, [(x, y)], protocol="fedsgd", lr=0.1, defenses=[d], generator=torch.Generator()
    )
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in res.update.values()))
    plain = local_update(model, [(x, y)], protocol="fedsgd", lr=0.1).update
    plain_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in plain.values()))
    assert norm <= c * (1 + 1e-5)
    assert norm == pytest.approx(min(c, plain_norm), rel=1e-4, abs=1e-9)  # noise std 1e-12·C


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_dynamic_dp_noise_std_is_sigma_c_over_b(batch) -> None:
    d = DynamicDP(sigma=0.7, clip_norm=3.0)
    d.begin(torch.nn.Linear(1, 1), _info(batch))
    out = d.reduce_per_sample(
        {"w": torch.zeros(batch, 40_000)}, generator=torch.Generator().manual_seed(1)
    )
    assert float(out["w"].mean()) == pytest.approx(0.0, abs=4 * 0.7 * 3 / batch / 200)
    assert float(out["w"].std()) == pytest.approx(0.7 * 3.0 / batch, rel=0.02)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_dp_sgd_noise_std_is_sigma_c_over_b(batch) -> None:
    model = torch.nn.Linear(200, 200)
    d = DPSGD(max_grad_norm=2.0, noise_multiplier=1.3)
    d.begin(model, _info(batch))
    zeros = {n: torch.zeros(batch, *p.shape) for n, p in model.named_parameters()}
    out = d.reduce_per_sample(zeros, generator=torch.Generator().manual_seed(2))
    assert float(out["weight"].std()) == pytest.approx(1.3 * 2.0 / batch, rel=0.02)
    assert not any(hasattr(p, "grad_sample") or p.grad is not None for p in model.parameters())


def test_noise_is_reproducible_from_the_generator() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for spec in ({"name": "dp_sgd"}, {"name": "dynamic_dp", "params": {"schedule": "linear"}}):
        a, b = (
            local_update(
                model,
                [(x, y)],
                protocol="fedsgd",
                lr=0.1,
                defenses=build_defenses([spec]),
                generator=torch.Generator().manual_seed(5),
            ).update
            for _ in range(2)
        )
        for n in a:
            torch.testing.assert_close(a[n], b[n])


# ----------------------------------------------------------------------------- accounting


@FAST
@given(
    sigma=st.floats(0.5, 5.0),
    q=st.floats(0.01, 0.5),
    steps=st.integers(1, 200),
    more=st.integers(1, 50),
    factor=st.floats(1.05, 3.0),
)
def test_epsilon_grows_with_steps_and_falls_with_sigma(sigma, q, steps, more, factor) -> None:
    def eps(s: float, n: int) -> float:
        acc = PrivacyAccountant()
        for _ in range(n):
            acc.step(noise_multiplier=s, sample_rate=q)
        return acc.epsilon(1e-5)

    base = eps(sigma, steps)
    assert eps(sigma, steps + more) > base > 0
    assert eps(sigma * factor, steps) < base


FORMULAS = {
    "linear": lambda t, T: 15 - 10.15 * t / T,
    "staircase": lambda t, T: 15 - 1.015 * math.floor(10 * t / T),
    "exponential": lambda t, T: math.exp(1.58 + 1.13 * (T - t) / T),
    "cyclic": lambda t, T: 15 * math.cos(1.24 * t / T),
}


@pytest.mark.parametrize("schedule", sorted(FORMULAS))
def test_schedule_epsilon_is_the_rdp_composition_of_its_sigmas(schedule) -> None:
    """3 rounds × 4 local iterations, per-iteration σ_t (T = 12), q = 4/40."""
    model = build_model("linear", (1, 4, 4), 3)
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    d = DynamicDP(schedule=schedule, horizon=12, step_unit="iteration", delta=1e-5)
    for rnd in (1, 2, 3):
        res = local_update(
            model,
            [(x, y)] * 4,
            protocol="fedavg",
            lr=0.1,
            defenses=[d],
            generator=torch.Generator().manual_seed(rnd),
            server_round=rnd,
            dataset_size=40,
        )
    sigmas = [FORMULAS[schedule](t, 12) for t in range(12)]
    rdp = sum(compute_rdp(q=0.1, noise_multiplier=s, steps=1, orders=list(ALPHAS)) for s in sigmas)
    expected, _ = get_privacy_spent(orders=list(ALPHAS), rdp=rdp, delta=1e-5)
    assert res.metrics["defense0.dynamic_dp.epsilon"] == pytest.approx(float(expected), rel=1e-12)
    assert res.metrics["defense0.dynamic_dp.sigma"] == pytest.approx(np.mean(sigmas[8:]))
    assert res.metrics["defense0.dynamic_dp.steps"] == 12


def test_dp_sgd_accountant_over_five_rounds_equals_one_opacus_accountant() -> None:
    """Each round a fresh defense (as a client builds it per message) restores the JSON state
    saved the round before; ε after 5 rounds is that of one Opacus RDPAccountant over the steps."""
    model = build_model("mlp", (1, 8, 8), 10)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    state: dict | None = None
    single = RDPAccountant()
    eps = []
    for rnd in range(1, 6):
        (d,) = build_defenses(
            [{"name": "dp_sgd", "params": {"noise_multiplier": 1.1, "max_grad_norm": 1.0}}]
        )
        if state is not None:
            d.load_state_dict(json.loads(json.dumps(state)))
        res = local_update(
            model,
            [(x, y)] * 3,
            protocol="fedavg",
            lr=0.1,
            defenses=[d],
            generator=torch.Generator().manual_seed(rnd),
            server_round=rnd,
            dataset_size=100,
        )
        state = d.state_dict()
        for _ in range(3):
            single.step(noise_multiplier=1.1, sample_rate=0.05)
        eps.append(res.metrics["defense0.dp_sgd.epsilon"])
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert eps[-1] == pytest.approx(single.get_epsilon(1e-5, alphas=list(ALPHAS)), rel=1e-12)
    assert state == {"history": [[1.1, 0.05, 15]]}


def test_target_epsilon_is_reached_at_the_horizon() -> None:
    model = build_model("linear", (1, 4, 4), 3)
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    (d,) = build_defenses([{"name": "dp_sgd", "params": {"target_epsilon": 2.0, "steps": 20}}])
    for rnd in range(1, 5):
        res = local_update(
            model,
            [(x, y)] * 5,
            protocol="fedavg",
            lr=0.1,
            defenses=[d],
            generator=torch.Generator().manual_seed(rnd),
            server_round=rnd,
            dataset_size=80,
        )
    eps = res.metrics["defense0.dp_sgd.epsilon"]
    assert res.metrics["defense0.dp_sgd.steps"] == 20
    assert 1.9 <= eps <= 2.0 + 1e-9, eps
    assert d.sigma > 0.5


def test_layer_clipping_charges_the_effective_multiplier() -> None:
    d = DynamicDP(sigma=2.0, clip_scope="layer")
    d.begin(torch.nn.Linear(1, 1), _info(3, n=30))
    d.reduce_per_sample(
        _per_sample([1.0, 2.0, 3.0], dims=(3, 5, 7, 9)), generator=torch.Generator()
    )
    assert d.state_dict() == {"history": [[1.0, 0.1, 1]]}  # σ/√L with L = 4 tensors


def test_epsilon_is_formal_only_with_poisson_sampling_and_fixed_clipping() -> None:
    model = build_model("linear", (1, 4, 4), 3)
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    for clipping, poisson, formal in (
        ("fixed", True, 1.0),
        ("l2max", True, 0.0),
        ("mean", True, 0.0),
        ("fixed", False, 0.0),
    ):
        res = local_update(
            model,
            [(x, y)],
            protocol="fedsgd",
            lr=0.1,
            generator=torch.Generator(),
            defenses=[DynamicDP(sigma=1.0, clipping=clipping, poisson=poisson)],
        )
        assert res.metrics["defense0.dynamic_dp.epsilon_formal"] == formal
    for poisson in (True, False):
        res = local_update(
            model,
            [(x, y)],
            protocol="fedsgd",
            lr=0.1,
            generator=torch.Generator(),
            defenses=[DPSGD(poisson=poisson)],
        )
        assert res.metrics["defense0.dp_sgd.epsilon_formal"] == float(poisson)


# ----------------------------------------------------------------------------- schedules


def test_schedules_follow_the_formulas() -> None:
    # every schedule goes from ≈15 to ≈4.85 (methods.md §3, T = 100)
    for fn in (linear, staircase, exponential, cyclic):
        assert fn(0, 100) == pytest.approx(15.0, abs=0.05)
        assert fn(100, 100) == pytest.approx(4.85, abs=0.03)
        assert fn(250, 100) == fn(100, 100)  # clamped past the horizon
    assert linear(50, 100) == pytest.approx(9.925)
    assert staircase(25, 100) == pytest.approx(15 - 2 * 1.015)
    assert staircase(19, 100) == staircase(10, 100) == pytest.approx(13.985)
    assert exponential(50, 100) == pytest.approx(math.exp(1.58 + 0.565))
    assert cyclic(50, 100) == pytest.approx(15 * math.cos(0.62))
    assert staircase(2500, 10000) == pytest.approx(15 - 2 * 1.015)  # per-iteration horizon


def user_schedule(t: int, horizon: int) -> float:
    """A user-defined schedule for the dotted-path test."""
    return 3.0 + t


def test_user_defined_schedule_by_dotted_path() -> None:
    d = DynamicDP(schedule="tests.unit.test_dp:user_schedule", horizon=10)
    d.begin(torch.nn.Linear(1, 1), _info(2, rnd=3))
    d.reduce_per_sample({"w": torch.ones(2, 3)}, generator=torch.Generator())
    assert d.metrics()["sigma"] == 5.0


# ----------------------------------------------------------------------------- params, names, models


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"name": "dynamic_dp", "params": {"schedule": "cosine"}},
            "schedule must be one of 'constant', 'linear', 'staircase', 'exponential', 'cyclic'",
        ),
        ({"name": "dynamic_dp", "params": {}}, "schedule 'constant' needs sigma"),
        (
            {"name": "dynamic_dp", "params": {"sigma": 1, "clipping": "max"}},
            "clipping must be one of 'fixed', 'l2max', 'mean'",
        ),
        (
            {"name": "dynamic_dp", "params": {"sigma": 1, "clip_scope": "x"}},
            "clip_scope must be one of 'flat', 'layer'",
        ),
        (
            {"name": "dynamic_dp", "params": {"sigma": 1, "step_unit": "epoch"}},
            "step_unit must be one of 'round', 'iteration'",
        ),
        (
            {"name": "dynamic_dp", "params": {"sigma": 1, "clip_min": 9}},
            "clip_min (9) must be <= clip_max (8.0)",
        ),
        ({"name": "dynamic_dp", "params": {"schedule": "no_such_mod:f"}}, "cannot import it"),
        (
            {"name": "dynamic_dp", "params": {"sigma": 1, "delta": 0}},
            "delta must be a number in (0, 1)",
        ),
        (
            {"name": "dp_sgd", "params": {"noise_multiplier": 0}},
            "noise_multiplier must be a finite number > 0",
        ),
        (
            {"name": "dp_sgd", "params": {"target_epsilon": 1.0}},
            "target_epsilon needs exactly one horizon",
        ),
        ({"name": "dp_sgd", "params": {"poisson": "yes"}}, "poisson must be true or false"),
        (
            {"name": "dynamic_dp", "params": {"sigma": 1, "poisson": 1}},
            "poisson must be true or false",
        ),
        ({"name": "dp_sgd", "params": {"noise": 1.0}}, "noise"),
    ],
)
def test_bad_params_give_one_clear_error(spec, message) -> None:
    with pytest.raises(ConfigError) as info:
        build_defenses([spec])
    text = str(info.value)
    assert text.startswith("defenses[0]") and message in text and "\n" not in text, text


def test_dp_sgd_update_names_have_no_module_prefix_and_the_model_no_hooks() -> None:
    model = build_model("convnet", (1, 8, 8), 10)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    res = local_update(
        model,
        [(x, y)] * 2,
        protocol="fedavg",
        lr=0.1,
        defenses=build_defenses([{"name": "dp_sgd"}]),
        generator=torch.Generator(),
    )
    assert set(res.update) == set(model.state_dict())
    assert not any("_module" in n for n in res.update)
    assert not model._forward_hooks and all(
        not m._forward_hooks and not m._backward_hooks for m in model.modules()
    )
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_opacus_per_sample_gradients_match_torch_func() -> None:
    model = build_model("convnet", (1, 8, 8), 10)
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    loss_a, a = DPSGD().per_sample_gradients(model, names, x, y)
    loss_b, b = per_sample_gradients(model, names, x, y)
    torch.testing.assert_close(loss_a, loss_b)
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6)


def test_batchnorm_is_refused_and_resnet18_gn_is_dp_compatible() -> None:
    model = build_model("resnet18", (3, 8, 8), 10).train()
    with pytest.raises(ValueError, match="resnet18_gn"):
        DPSGD().begin(model, _info(2))
    assert ModuleValidator.validate(build_model("resnet18_gn", (3, 8, 8), 10).train()) == []


def test_poisson_batches_and_stack_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    part = np.arange(100, 150)
    batches = PoissonSampler().sample_batches(
        part, np.zeros(50), batch_size=5, num_batches=2000, generator=gen
    )
    sizes = np.array([len(b) for b in batches])
    assert sizes.mean() == pytest.approx(5.0, rel=0.05) and sizes.min() == 0 and sizes.max() > 8
    assert all(set(b) <= set(part) and len(set(b)) == len(b) for b in batches)
    with pytest.raises(ConfigError, match="samples its own batches"):
        build_defenses(
            [{"name": "identical_labels"}, {"name": "dp_sgd", "params": {"poisson": True}}]
        )


@pytest.mark.parametrize(
    "d",
    [
        DPSGD(poisson=True, noise_multiplier=1.0, max_grad_norm=1.0),
        DynamicDP(poisson=True, sigma=1.0, clip_norm=1.0),
    ],
    ids=["dp_sgd", "dynamic_dp"],
)
def test_an_empty_poisson_batch_sends_noise_divided_by_the_expected_size(d) -> None:
    model = torch.nn.Linear(50, 40)
    empty = (torch.zeros(0, 50), torch.zeros(0, dtype=torch.long))
    res = local_update(
        model,
        [empty],
        protocol="fedsgd",
        lr=0.1,
        defenses=[d],
        generator=torch.Generator(),
        dataset_size=100,
        expected_batch_size=4,
    )
    assert float(res.update["weight"].std()) == pytest.approx(1.0 / 4, rel=0.05)
    assert res.metrics[f"defense0.{d.name}.sample_rate"] == 0.04


@pytest.mark.parametrize("poisson, divisor", [(True, 8), (False, 2)])
@pytest.mark.parametrize(
    "make",
    [lambda p: DPSGD(poisson=p, noise_multiplier=1e-9), lambda p: DynamicDP(poisson=p, sigma=1e-9)],
    ids=["dp_sgd", "dynamic_dp"],
)
def test_poisson_batches_are_averaged_over_the_expected_size(make, poisson, divisor) -> None:
    """A batch of 2 (expected size 8): under Poisson sampling the clipped sum is divided by 8,
    with fixed-size batches by the drawn 2."""
    d = make(poisson)
    model = torch.nn.Linear(3, 2)
    d.begin(model, TrainingInfo("fedsgd", 0.1, 1, 2, 1, 100, 8))
    grads = {n: torch.zeros(2, *p.shape) for n, p in model.named_parameters()}
    grads["bias"][:, 0] = 0.5  # norms 0.5 < C: unclipped; the sum is 1.0
    out = d.reduce_per_sample(grads, generator=torch.Generator().manual_seed(0))
    assert float(out["bias"][0]) == pytest.approx(1.0 / divisor, abs=1e-6)


def test_dp_stack_rules() -> None:
    with pytest.raises(ConfigError, match="declare defenses in execution order"):
        build_defenses([{"name": "pruning", "params": {"ratio": 0.5}}, {"name": "dp_sgd"}])
    with pytest.raises(ConfigError, match="at most one 'per_sample' defense"):
        build_defenses([{"name": "dp_sgd"}, {"name": "dynamic_dp", "params": {"sigma": 1.0}}])


def test_client_batches_are_poisson_samples_with_dp_poisson() -> None:
    from fl_privsim.core import config as config_mod
    from fl_privsim.engine.federated_data import client_batch_indices, federated_data

    cfg = config_mod.from_dict(
        {
            "federation": {"num_clients": 2, "clients_per_round": 2, "protocol": "fedavg"},
            "client": {"batch_size": 6, "local_steps": 50},
            "defenses": [{"name": "dp_sgd", "params": {"poisson": True}}],
        }
    )
    fed = federated_data(cfg)
    batches = client_batch_indices(cfg, fed, 1, 0)
    sizes = [len(b) for b in batches]
    assert len(set(sizes)) > 3 and 4 < np.mean(sizes) < 8
    assert all(set(b) <= set(fed.train_parts[0]) for b in batches)
    again = client_batch_indices(cfg, fed, 1, 0)  # the scorer reproduces them
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
