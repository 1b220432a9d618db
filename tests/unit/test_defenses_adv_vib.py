"""Adversarial perturbation and VIB defenses (Li et al. 2024's five defenses, methods.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from clients.defenses import DEFENSES, build_defenses
from clients.defenses.adversarial import AdversarialPerturbation, project_ball_halfspace
from clients.defenses.vib import VIB, VIBHead, build_vib_model
from clients.local_update import local_update
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import build_model

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _per_sample(seed: int, b: int = 6, shapes=((4, 3), (4,))) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    # a shared component so the mean gradient is not tiny
    common = {
        f"p{i}": torch.randn(s, generator=g, dtype=torch.float64) for i, s in enumerate(shapes)
    }
    return {
        n: c + 0.7 * torch.randn((b, *c.shape), generator=g, dtype=torch.float64)
        for n, c in common.items()
    }


def _flat(t: dict[str, torch.Tensor], batched: bool = False) -> torch.Tensor:
    if batched:
        b = next(iter(t.values())).shape[0]
        return torch.cat([v.reshape(b, -1) for v in t.values()], dim=1)
    return torch.cat([v.reshape(-1) for v in t.values()])


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("adversarial_perturbation", {}, "budget"),
        (
            "adversarial_perturbation",
            {"budget": 0},
            "budget (relative L2 norm of the perturbation) must be",
        ),
        ("adversarial_perturbation", {"budget": -1.0}, "must be a finite number > 0"),
        ("adversarial_perturbation", {"budget": True}, "must be a finite number > 0"),
        ("adversarial_perturbation", {"budget": 0.5, "steps": 0}, "steps must be an integer >= 1"),
        (
            "adversarial_perturbation",
            {"budget": 0.5, "objective": "min"},
            "objective must be one of 'mean', 'max'",
        ),
        (
            "adversarial_perturbation",
            {"budget": 0.5, "min_inner": 0},
            "min_inner must be a number in (0, 1]",
        ),
        ("vib", {"beta": -1.0}, "beta (KL weight) must be a finite number >= 0"),
        ("vib", {"beta": "big"}, "beta (KL weight) must be a finite number >= 0"),
    ],
)
def test_bad_params_give_one_clear_error(name, params, message) -> None:
    with pytest.raises(ConfigError) as err:
        build_defenses([{"name": name, "params": params}])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_stack_rules_accept_them_and_keep_one_per_sample_defense() -> None:
    stack = build_defenses(
        [
            {"name": "adversarial_perturbation", "params": {"budget": 0.5}},
            {"name": "pruning", "params": {"ratio": 0.5}},
            {"name": "quantization", "params": {}},
        ]
    )
    assert [d.name for d in stack] == ["adversarial_perturbation", "pruning", "quantization"]
    assert [
        d.name
        for d in build_defenses(
            [
                {"name": "identical_labels"},
                {"name": "vib"},
                {"name": "noise", "params": {"scale": 0.1}},
            ]
        )
    ] == ["identical_labels", "vib", "noise"]
    with pytest.raises(ConfigError, match="at most one 'per_sample' defense"):
        build_defenses(
            [{"name": "vib"}, {"name": "adversarial_perturbation", "params": {"budget": 0.5}}]
        )
    with pytest.raises(ConfigError, match="a 'per_sample' defense runs before a 'update' one"):
        build_defenses(
            [{"name": "signsgd"}, {"name": "adversarial_perturbation", "params": {"budget": 0.5}}]
        )
    assert {"adversarial_perturbation", "vib"} <= set(DEFENSES.names())


# ----------------------------------------------------------------------------- projection


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    radius=st.floats(0.05, 5.0),
    offset=st.floats(0.0, 3.0),
    scale=st.floats(0.01, 10.0),
)
def test_projection_is_feasible_and_no_farther_than_feasible_points(
    seed, radius, offset, scale
) -> None:
    g = _gen(seed)
    d = torch.randn(7, generator=g, dtype=torch.float64) * scale
    u = torch.randn(7, generator=g, dtype=torch.float64)
    u = u / u.norm()
    p = project_ball_halfspace(d, u, radius, offset)
    assert float(p.norm()) <= radius * (1 + 1e-9) + 1e-12
    assert float(p @ u) >= -offset - 1e-9
    # no random feasible point is closer to d than its projection
    cand = torch.randn(200, 7, generator=g, dtype=torch.float64)
    cand = cand * (
        radius
        * torch.rand(200, 1, generator=g, dtype=torch.float64)
        / cand.norm(dim=1, keepdim=True)
    )
    ok = cand @ u >= -offset
    if ok.any():
        assert float((cand[ok] - d).norm(dim=1).min()) >= float((p - d).norm()) - 1e-9


# ----------------------------------------------------------------------------- adversarial perturbation


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    budget=st.floats(0.05, 3.0),
    objective=st.sampled_from(["mean", "max"]),
    min_inner=st.floats(0.01, 1.0),
)
def test_perturbation_respects_the_budget_and_keeps_a_positive_inner_product(
    seed, budget, objective, min_inner
) -> None:
    ps = _per_sample(seed)
    d = AdversarialPerturbation(budget=budget, steps=8, objective=objective, min_inner=min_inner)
    out = d.reduce_per_sample(ps, generator=_gen(seed))
    assert {n: t.shape for n, t in out.items()} == {n: t.shape[1:] for n, t in ps.items()}
    g = _flat(ps, batched=True).mean(dim=0)
    rel = float((_flat(out) - g).norm() / g.norm())
    assert rel <= budget * (1 + 1e-6)
    assert float(_flat(out) @ g) >= min_inner * float(g @ g) * (1 - 1e-6) > 0
    m = d.metrics()
    assert m["relative_perturbation"] == pytest.approx(rel, rel=1e-6, abs=1e-9)
    assert m["cosine_to_original"] == pytest.approx(
        float(_flat(out) @ g / (_flat(out).norm() * g.norm())), abs=1e-9
    )
    assert m["surrogate_confidence_after"] <= m["surrogate_confidence_before"] + 1e-12


def test_perturbation_lowers_the_surrogate_confidence_and_uses_the_budget() -> None:
    ps = _per_sample(3, b=8)
    d = AdversarialPerturbation(budget=0.5, steps=30)
    out = d.reduce_per_sample(ps, generator=_gen(1))
    rows = _flat(ps, batched=True)
    rows = rows / rows.norm(dim=1, keepdim=True)
    g, r = rows.new_tensor(_flat(ps, batched=True).mean(0)), _flat(out)
    before, after = float((rows @ g / g.norm()).mean()), float((rows @ r / r.norm()).mean())
    assert after < before - 0.05
    m = d.metrics()
    assert m["surrogate_confidence_before"] == pytest.approx(before) and m[
        "surrogate_confidence_after"
    ] == pytest.approx(after)
    assert m["relative_perturbation"] > 0.25 and 0 < m["cosine_to_original"] < 1


def test_perturbation_is_deterministic_given_the_generator_seed() -> None:
    ps = _per_sample(5)
    a = AdversarialPerturbation(budget=0.3, steps=5).reduce_per_sample(ps, generator=_gen(7))
    b = AdversarialPerturbation(budget=0.3, steps=5).reduce_per_sample(ps, generator=_gen(7))
    c = AdversarialPerturbation(budget=0.3, steps=5).reduce_per_sample(ps, generator=_gen(8))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_zero_gradient_is_released_unchanged() -> None:
    ps = {"w": torch.zeros(3, 2, 2)}
    d = AdversarialPerturbation(budget=0.5)
    assert torch.equal(d.reduce_per_sample(ps, generator=_gen())["w"], torch.zeros(2, 2))
    assert d.metrics()["relative_perturbation"] == 0.0


def _mlp_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 4, 4), 3)
    g = _gen(seed)
    return model, [(torch.randn(5, 1, 4, 4, generator=g), torch.randint(0, 3, (5,), generator=g))]


def test_fedsgd_release_through_local_update_is_within_budget_and_reproducible() -> None:
    model, batches = _mlp_batch()
    clean = local_update(model, batches, protocol="fedsgd", lr=0.1).update
    runs = [
        local_update(
            model,
            batches,
            protocol="fedsgd",
            lr=0.1,
            generator=_gen(11),
            defenses=build_defenses(
                [{"name": "adversarial_perturbation", "params": {"budget": 0.2, "steps": 5}}]
            ),
        )
        for _ in range(2)
    ]
    g, r = _flat(clean), _flat(runs[0].update)
    assert float((r - g).norm() / g.norm()) <= 0.2 * (1 + 1e-4)
    assert float(r @ g) > 0
    assert torch.equal(r, _flat(runs[1].update))
    assert set(runs[0].metrics) >= {
        "defense0.adversarial_perturbation.relative_perturbation",
        "defense0.adversarial_perturbation.cosine_to_original",
    }


# ----------------------------------------------------------------------------- VIB


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 20.0))
def test_kl_is_nonnegative_and_zero_at_the_prior(seed, scale) -> None:
    g = _gen(seed)
    mu = torch.randn(4, 6, generator=g) * scale
    sigma = torch.rand(4, 6, generator=g) * scale + 1e-3
    assert bool((VIBHead.kl(mu, sigma) >= 0).all())
    assert torch.allclose(VIBHead.kl(torch.zeros(2, 3), torch.ones(2, 3)), torch.zeros(2))


def test_vib_model_variant_replaces_the_last_linear_layer() -> None:
    for base in ("mlp", "lenet", "convnet", "cnn6", "linear"):
        model = build_model(f"{base}_vib", (1, 8, 8), 4)
        heads = [m for m in model.modules() if isinstance(m, VIBHead)]
        assert len(heads) == 1, base
        model.eval()
        out = model(torch.randn(3, 1, 8, 8))
        assert out.shape == (3, 4)
    with pytest.raises(ConfigError, match="unknown model 'nope_vib'"):
        build_model("nope_vib", (1, 8, 8), 4)
    with pytest.raises(ConfigError, match="unknown model 'nope_vib'"):
        build_vib_model("nope", (1, 8, 8), 4)


def test_vib_eval_is_deterministic_and_training_is_stochastic() -> None:
    torch.manual_seed(0)
    model = build_model("mlp_vib", (1, 4, 4), 3)
    with torch.no_grad():  # move σ away from ~0 so the noise shows
        next(m for m in model.modules() if isinstance(m, VIBHead)).encoder.bias[64:] += 6.0
    x = torch.randn(2, 1, 4, 4)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_vib_defense_refuses_a_model_without_the_head() -> None:
    model, batches = _mlp_batch()
    with pytest.raises(
        ValueError,
        match=r"the vib defense needs a model with one VIBHead \(model.name = '<base>_vib'",
    ):
        local_update(
            model,
            batches,
            protocol="fedsgd",
            lr=0.1,
            generator=_gen(),
            defenses=build_defenses([{"name": "vib"}]),
        )


def test_vib_gradient_is_the_gradient_of_ce_plus_beta_kl() -> None:
    torch.manual_seed(0)
    model = build_model("mlp_vib", (1, 4, 4), 3)
    g = _gen(1)
    x, y = torch.randn(5, 1, 4, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    beta = 0.5
    d = VIB(beta=beta)
    res = local_update(model, [(x, y)], protocol="fedsgd", lr=0.1, generator=_gen(), defenses=[d])
    # the same noise, drawn the same way (global RNG seeded from the defense generator's
    # first draw), through an ordinary autograd pass
    head = next(m for m in model.modules() if isinstance(m, VIBHead))
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=_gen())))
    noise = torch.randn(5, head.z_dim)
    sink: list[torch.Tensor] = []
    head.kl_sink, head.noise = sink, noise
    try:
        out = model(x)
    finally:
        head.kl_sink, head.noise = None, None
    loss = nn.functional.cross_entropy(out, y) + beta * sink[0].mean()
    names = [n for n, p in model.named_parameters()]
    ref = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    for n, r in zip(names, ref, strict=True):
        assert torch.allclose(res.update[n], r, atol=1e-5, rtol=1e-4), n
    assert res.loss == pytest.approx(float(loss), rel=1e-5)
    m = res.metrics
    assert m["defense0.vib.kl"] >= 0 and m["defense0.vib.kl"] == pytest.approx(
        float(sink[0].mean()), rel=1e-5
    )
    assert math.isfinite(m["defense0.vib.ce"])


def test_vib_update_repeats_under_the_defense_generator_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    model = build_model("mlp_vib", (1, 8, 8), 10).train()
    batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))]
    stack = [{"name": "vib", "params": {"beta": 1e-2}}]

    def run(seed: int) -> torch.Tensor:
        return _flat(
            local_update(
                model,
                batches,
                protocol="fedsgd",
                lr=0.1,
                generator=_gen(seed),
                defenses=build_defenses(stack),
            ).update
        )

    state = torch.random.get_rng_state()
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not consumed
    assert torch.equal(a, b)  # same defense seed, same reparameterisation noise
    assert not torch.equal(a, c)  # another seed draws other noise
