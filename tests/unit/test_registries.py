"""One registry per plugin kind (``fl_privsim.core.plugins``), and the config's allowed values
are the registries' names, never a second list."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from fl_privsim.app.game import GameSection
from fl_privsim.app.measure_config import choices as measure_choices
from fl_privsim.core import config, plugins
from fl_privsim.core.config import DataConfig, ModelConfig, choices_of
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import build_model
from fl_privsim.core.registry import Registry

KINDS = {
    "attacks": {"analytic", "dlg", "idlg", "inverting_gradients", "rgap", "imprint", "fishing"},
    "defenses": {"dp_sgd", "noise", "pruning", "signsgd", "soteria", "vib", "quantization"},
    "modifications": {"imprint", "trap_weights", "fishing", "loki", "isolation"},
    "analyses": {"i2f"},
    "games": {"attribute", "property", "distributional", "user", "membership"},
    "measures": {"i2f", "vinfo", "sensitivity", "subspace"},
    "datasets": {
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "folder",
        "cifar10_npz",
        "mnist_idx",
        "adult",
    },
    "models": {"mlp", "linear", "lenet", "convnet", "cnn6", "resnet18", "resnet18_gn"},
    "reproductions": {"defenses", "i2f_vs_dgl", "inference_aggregation", "secure_aggregation"},
    "model_variants": {"vib"},
    "config_checks": {"secure_aggregation", "defenses", "analyses", "inference_attacks"},
    "failures": {"crash", "garbage"},
}


def test_plugins_has_one_registry_per_kind() -> None:
    registries = {
        name: value for name, value in vars(plugins).items() if isinstance(value, Registry)
    }
    assert set(plugins.REGISTRIES) == set(KINDS)
    assert {name.lower() for name in registries} == set(KINDS)
    for kind, registry in plugins.REGISTRIES.items():
        assert registries[kind.upper()] is registry
    assert len({id(r) for r in registries.values()}) == len(registries)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_registry_lists_its_builtins_under_its_group(kind: str) -> None:
    registry = plugins.REGISTRIES[kind]
    assert registry.group == f"fl_privsim.{kind}"
    assert KINDS[kind] <= set(registry.names())
    assert list(registry) == registry.names()


@pytest.mark.parametrize(
    "kind", ["datasets", "models", "model_variants", "config_checks", "failures"]
)
def test_a_name_declared_with_its_module_is_registered_there(kind: str) -> None:
    """The datasets and models name their built-ins' modules in plugins.py (so that the config
    lists them without importing torch): each such module registers exactly those names."""
    registry = plugins.REGISTRIES[kind]
    declared = dict(registry._lazy)
    for module in set(declared.values()):
        importlib.import_module(module)
    for name in declared:
        assert registry.get(name) is not None
    modules = {registry.get(n).__module__ for n in declared}
    in_modules = {n for n, obj in registry._items.items() if obj.__module__ in modules}
    assert in_modules == set(declared)


def test_a_duplicate_name_is_refused() -> None:
    assert "mlp" in plugins.MODELS._items  # imported above: the built-in is registered
    with pytest.raises(ValueError, match="model 'mlp' is already registered"):
        plugins.MODELS.register("mlp")(lambda shape, k: None)
    reg: Registry[object] = Registry(kind="widget", group="fl_privsim.widgets")

    @reg.register("a")
    class A:
        pass

    reg.register("a")(A)  # the same object again is fine (a module imported twice)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(type("B", (), {}))


def _choices(cls: type, name: str) -> list[str]:
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    found = choices_of(meta)
    assert found is not None
    return list(found)


def test_the_configs_choices_are_the_registries_names() -> None:
    assert _choices(DataConfig, "name") == plugins.DATASETS.names()
    models = plugins.MODELS.names()
    assert _choices(ModelConfig, "name") == [*models, *(f"{m}_vib" for m in models)]
    assert _choices(ModelConfig, "name") == plugins.model_names()
    assert _choices(GameSection, "kind") == plugins.GAMES.names()
    assert list(measure_choices()["measure.kind"]) == plugins.MEASURES.names()


def test_every_model_name_the_config_accepts_builds() -> None:
    for name in plugins.model_names():
        shape = (1, 28, 28) if name.startswith("lenet") else (3, 32, 32)
        assert build_model(name, shape, 10) is not None


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("data.name", "digitz", "digits, mnist, fashion_mnist, cifar10"),
        ("model.name", "mlp_vibb", "mlp, linear, lenet, convnet, cnn6, resnet18, resnet18_gn,"),
    ],
)
def test_an_unknown_name_is_one_line_with_did_you_mean(key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(overrides=[f'{key}="{value}"'])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: {value!r} is not allowed (did you mean ")
    assert f"allowed: {allowed}" in message


def test_an_unknown_plugin_lookup_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown game 'membershp' \(did you mean 'membership'"):
        plugins.GAMES.get("membershp")
    with pytest.raises(ConfigError, match="unknown analysis 'i2ff'.*known: i2f$"):
        plugins.ANALYSES.get("i2ff")
