"""The client defense ``model_inspection``: crafted models are refused, honest ones are not.

Detection of hand-made structures and of the real ``craft()`` outputs of every registered
modification (imprint: Fowl et al., ICLR 2022; trap weights: Boenisch et al., EuroS&P 2023;
fishing: Wen et al., ICML 2022; arXiv 2503.11514 for the detection argument); no alarm on
fresh models of every architecture nor after rounds of real federated training; the refusal
inside ``local_update``; parameters; determinism; stacking.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from adversaries.malicious import MODIFICATIONS
from clients.defenses import DEFENSES, build_defenses
from clients.defenses.base import ModelRefused, TrainingInfo
from clients.defenses.model_inspection import (
    CHECKS,
    ModelInspection,
    ModelInspector,
    balanced_null_probability,
    parallel_null_probability,
)
from clients.local_update import local_update
from fl_privsim.app.inspection_rates import (
    VARIANTS,
    Training,
    honest_trajectory,
    measure,
    sent_unchanged,
    server_view,
)
from fl_privsim.core.architecture import FrontBlock, FrontBlockModel
from fl_privsim.core.data import load_dataset
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import MODELS, build_model, init_weights

DIGITS = (1, 8, 8)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _mlp(seed: int = 0, shape: tuple[int, int, int] = DIGITS) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", shape, 10)


def _checks(model: nn.Module, **params) -> set[str]:
    return {f.check for f in ModelInspector(**params).findings(model)}


# ---------------------------------------------------------------------- hand-made structures
def _imprint_block(rows: int, direction: torch.Tensor) -> FrontBlockModel:
    """Fowl et al.'s structure: identical encoder rows, quantile-spaced biases, identical
    small decoder columns."""
    block = FrontBlock(DIGITS, rows)
    d = direction.numel()
    u = direction / direction.norm()
    with torch.no_grad():
        block.encoder.weight.copy_(u.expand(rows, d))
        block.encoder.bias.copy_(
            -torch.distributions.Normal(0.0, 1.0).icdf(torch.arange(1, rows + 1) / (rows + 1))
        )
        v = torch.randn(d, generator=torch.Generator().manual_seed(1))
        block.decoder.weight.copy_(1e-2 * (v / v.norm())[:, None].expand(d, rows))
    return FrontBlockModel(block, _mlp())


def test_imprint_structures_are_found_in_encoder_and_decoder():
    brightness = _imprint_block(64, torch.ones(64))
    found = ModelInspector().findings(brightness)
    layers = {(f.check, f.layer) for f in found}
    assert ("parallel_rows", "block.encoder.weight") in layers
    assert ("parallel_rows", "block.decoder.weight") in layers
    assert ("few_values", "block.encoder.weight") in layers  # one value per row
    random = _imprint_block(32, torch.randn(64, generator=torch.Generator().manual_seed(2)))
    assert "parallel_rows" in _checks(random, checks=["parallel_rows"])
    one_shot = _imprint_block(2, torch.randn(64, generator=torch.Generator().manual_seed(3)))
    assert _checks(one_shot, checks=["parallel_rows"]) == {"parallel_rows"}


def test_parallel_rows_ignores_scale_and_sign_and_skips_untestable_layers():
    model = _mlp()
    with torch.no_grad():
        model[1].weight[1] = -3.0 * model[1].weight[0]  # anti-parallel, other scale
    found = ModelInspector(checks="parallel_rows").findings(model)
    assert [(f.check, f.layer) for f in found] == [("parallel_rows", "1.weight")]
    # 2-dimensional rows are near-parallel by chance: not testable at alpha, never flagged
    assert parallel_null_probability(2, 0.999) > 0.01
    tiny = nn.Sequential(nn.Linear(2, 50))
    assert _checks(tiny) == set()


def _trap(model: nn.Module, mean: float, std: float, seed: int = 0) -> nn.Module:
    """Boenisch et al.'s rows: half negative, half positive x0.95, folded through (x-mean)/std."""
    layer = model[1]
    rows, d = layer.weight.shape
    g = torch.Generator().manual_seed(seed)
    mag = torch.randn(rows, d, generator=g).abs() * 0.5
    neg = torch.zeros(rows, d, dtype=torch.bool)
    neg.scatter_(1, torch.rand(rows, d, generator=g).argsort(1)[:, : d // 2], True)
    w = torch.where(neg, -mag, 0.95 * mag)
    with torch.no_grad():
        layer.weight.copy_(w * std)
        layer.bias.copy_(w.sum(1) * mean)
    return model


def test_trap_rows_have_balanced_signs():
    found = ModelInspector().findings(_trap(_mlp(), mean=0.3, std=0.4))
    assert [(f.check, f.layer) for f in found] == [("balanced_signs", "1.weight")]
    assert found[0].statistic < 1e-100  # p-value of 256 balanced rows
    # a linear model has only 10 rows, still far beyond chance (p = 0.099 ** 10)
    torch.manual_seed(0)
    linear = build_model("linear", DIGITS, 10)
    assert _checks(_trap(linear, 0.3, 0.4)) == {"balanced_signs"}


def test_balanced_probability_is_the_binomial():
    assert balanced_null_probability(4) == pytest.approx(6 / 16)
    assert balanced_null_probability(5) == pytest.approx(20 / 32)  # 2 or 3 negatives
    assert balanced_null_probability(64) == pytest.approx(math.comb(64, 32) / 2**64)


def test_fishing_zero_rows_and_saturated_bias():
    model = _mlp()
    with torch.no_grad():
        keep = model[5].weight[3].clone()
        model[5].weight.zero_()
        model[5].weight[3] = keep
        model[5].bias.fill_(1000.0)
        model[5].bias[3] = 0.1
    found = ModelInspector().findings(model)
    assert {(f.check, f.layer) for f in found} == {
        ("zero_rows", "5.weight"),
        ("saturated_bias", "5.weight"),
    }
    # an all-zero layer (e.g. a zero-initialised head) is not a fishing layer
    with torch.no_grad():
        model[5].weight.zero_()
        model[5].bias.zero_()
    assert _checks(model) == set()


def test_nonfinite_weights():
    model = _mlp()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    found = ModelInspector().findings(model)
    assert [(f.check, f.layer) for f in found] == [("nonfinite", "3.weight")]


# ---------------------------------------------------------------------- the real modifications
@pytest.fixture(scope="module")
def crafts(digits):
    """(label, model name, crafted model) of every registered modification and variant, on
    mlp (and convnet for fishing, whose classifier sits behind convolutions)."""
    out = []
    for name in MODIFICATIONS.names():
        for params in VARIANTS.get(name, ({},)):
            for arch in ("mlp", "convnet") if name == "fishing" else ("mlp",):
                mod = MODIFICATIONS.create(name, **params)
                torch.manual_seed(0)
                model = build_model(arch, digits.input_shape, digits.num_classes)
                try:
                    mod.check_model(model, digits.input_shape, digits.num_classes)
                except ConfigError:
                    continue
                view = server_view(digits, stage=0, seed=0, training=Training())
                crafted = mod.craft(model, view)
                for who, sent in [
                    ("", crafted.model),
                    *((f" to client {c}", m) for c, m in crafted.per_client.items()),
                ]:
                    if sent_unchanged(sent, model):
                        continue  # isolation's target gets the honest model: nothing to detect
                    out.append((name, f"{name}{params}{who}", arch, sent))
    return out


def test_every_registered_modification_is_detected_by_its_own_check(crafts):
    assert {"imprint", "trap_weights", "fishing"} <= set(MODIFICATIONS.names())
    assert {"imprint", "trap_weights", "fishing", "isolation", "loki"} <= {
        name for name, *_ in crafts
    }
    own = {
        "imprint": "parallel_rows",
        "trap_weights": "balanced_signs",
        "fishing": "zero_rows",
        "isolation": "dead_rows",
        "loki": "parallel_rows",
    }
    inspector = ModelInspector()
    for name, label, arch, model in crafts:
        checks = {f.check for f in inspector.findings(model)}
        assert checks, (label, arch)
        if name in own:
            assert own[name] in checks, (label, arch)


# ---------------------------------------------------------------------- no false alarms
@pytest.mark.parametrize("name", [*sorted(MODELS), "mlp_vib", "convnet_vib", "lenet_vib"])
def test_fresh_models_of_every_architecture_pass(name):
    shapes = [(3, 32, 32)] if name.startswith("resnet") else [DIGITS, (3, 32, 32)]
    for shape in shapes:
        torch.manual_seed(0)
        model = build_model(name, shape, 10)
        assert ModelInspector().findings(model) == [], (name, shape)


@pytest.mark.parametrize("scheme", ["uniform", "normal", "kaiming", "xavier"])
def test_every_init_scheme_passes(scheme):
    for name in ("mlp", "convnet", "cnn6", "lenet", "linear"):
        model = init_weights(
            build_model(name, DIGITS, 10), scheme, torch.Generator().manual_seed(0)
        )
        assert ModelInspector().findings(model) == [], (name, scheme)


@pytest.mark.parametrize("protocol", ["fedavg", "fedsgd"])
def test_models_after_rounds_of_real_training_pass(digits, protocol):
    training = Training(protocol=protocol, rounds=4, local_steps=3, lr=0.3)
    inspector = ModelInspector()
    for name in ("mlp", "linear", "convnet") if protocol == "fedsgd" else ("mlp", "linear"):
        for rnd, model in honest_trajectory(name, digits, seed=0, training=training):
            assert inspector.findings(model) == [], (name, rnd)
        assert rnd == training.rounds


def test_measure_reports_rates(digits):
    result = measure(
        models=["linear"],
        seeds=[0],
        training=Training(rounds=2, local_steps=2),
        stages=[2],
        modifications={"fishing": [{}], "trap_weights": [{}]},
    )
    fa = result["false_alarms"]
    assert fa["n"] == 3 and fa["alarms"] == 0 and 0 < fa["upper95"] < 1
    assert result["detection"]["fishing"]["rate"] == 1.0
    assert result["detection"]["trap_weights"]["detected"] == 1
    assert set(fa["margins"]) >= {"max_abs_cos", "max_bias_ratio"}


# ---------------------------------------------------------------------- the defense
def _batches(data, n: int = 1):
    x = data.normalize(data.images("train", slice(0, 16 * n)))
    y = data.labels("train", slice(0, 16 * n))
    return [(x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]) for i in range(n)]


def test_local_update_refuses_a_crafted_model_with_a_reason(digits):
    mod = MODIFICATIONS.create("fishing")
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, 10)
    crafted = mod.craft(model, server_view(digits, stage=0, seed=0, training=Training())).model
    defense = DEFENSES.create("model_inspection")
    with pytest.raises(ModelRefused) as info:
        local_update(
            crafted,
            _batches(digits),
            protocol="fedsgd",
            lr=0.1,
            defenses=[defense],
            generator=torch.Generator().manual_seed(0),
        )
    reason = str(info.value)
    assert "\n" not in reason and reason.startswith("model_inspection")
    assert "zero_rows in 5.weight" in reason and "saturated_bias" in reason
    with pytest.raises(ModelRefused, match="parallel_rows in block.encoder.weight"):
        local_update(
            _imprint_block(16, torch.ones(64)),
            _batches(digits, 2),
            protocol="fedavg",
            lr=0.1,
            defenses=[defense],
            generator=torch.Generator().manual_seed(0),
        )


def test_an_honest_model_trains_unchanged(digits):
    model = _mlp()
    plain = local_update(copy.deepcopy(model), _batches(digits, 3), protocol="fedavg", lr=0.1)
    defense = ModelInspection()
    defended = local_update(
        copy.deepcopy(model),
        _batches(digits, 3),
        protocol="fedavg",
        lr=0.1,
        defenses=[defense],
        generator=torch.Generator().manual_seed(0),
    )
    for key, value in plain.update.items():
        assert torch.equal(value, defended.update[key])
    metrics = defended.metrics
    assert metrics["defense0.model_inspection.layers"] == 3.0
    assert 0 < metrics["defense0.model_inspection.max_abs_cos"] < 0.999


def test_deterministic_and_state_free(digits):
    defense = ModelInspection()
    honest, crafted = _mlp(), _trap(_mlp(), 0.3, 0.4)
    info = TrainingInfo("fedsgd", 0.1, 1, 16)
    reasons = []
    for model in (crafted, honest, crafted, honest):
        try:
            defense.begin(model, info)
            reasons.append(None)
        except ModelRefused as exc:
            reasons.append(str(exc))
    assert reasons[0] == reasons[2] is not None and reasons[1] is None and reasons[3] is None
    assert defense.state_dict() == {}
    first = ModelInspector().inspect(crafted)
    assert repr(first) == repr(ModelInspector().inspect(crafted))  # stats hold nan: compare reprs


@pytest.mark.parametrize(
    "params",
    [
        {"checks": ["parallel_rows", "nope"]},
        {"checks": []},
        {"checks": 3},
        {"cos_threshold": 1.0},
        {"cos_threshold": 0.5},
        {"alpha": 0.0},
        {"alpha": 0.5},
        {"zero_tol": -1e-6},
        {"bias_ratio": 1.0},
        {"bias_ratio": float("inf")},
        {"distinct_share": 1.0},
        {"distinct_share": True},
    ],
)
def test_bad_parameters(params):
    with pytest.raises(ValueError) as info:
        ModelInspection(**params)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        build_defenses([{"name": "model_inspection", "params": params}])


def test_check_selection():
    crafted = _trap(_mlp(), 0.3, 0.4)
    assert _checks(crafted, checks=["parallel_rows", "zero_rows"]) == set()
    assert _checks(crafted, checks="balanced_signs") == {"balanced_signs"}
    assert ModelInspector(checks="all").checks == CHECKS


def test_stacks_with_the_other_defenses():
    dp = {"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    for specs in (
        [{"name": "model_inspection"}],
        [{"name": "identical_labels"}, {"name": "model_inspection"}],
        [
            dp,
            {"name": "model_inspection"},
            {"name": "pruning", "params": {"ratio": 0.5}},
            {"name": "signsgd"},
            {"name": "quantization"},
        ],
        [
            {"name": "soteria"},
            {"name": "model_inspection"},
            {"name": "noise", "params": {"scale": 0.1}},
        ],
    ):
        defenses = build_defenses(specs)
        assert any(d.name == "model_inspection" for d in defenses)


def test_trap_rows_with_some_zero_weights_are_still_found():
    model = _trap(_mlp(), 0.3, 0.4)
    with torch.no_grad():
        model[1].weight[::2, 0] = 0.0  # every other row: 63 non-zero weights (odd count)
    assert _checks(model) == {"balanced_signs"}
    assert balanced_null_probability(63) > balanced_null_probability(64)


def test_the_defense_imports_neither_flower_ray_nor_the_attacks():
    import ast
    from pathlib import Path

    import clients.defenses.model_inspection as mi

    tree = ast.parse(Path(mi.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m.split(".")[0] for m in names} & {"flwr", "ray", "adversaries"}
