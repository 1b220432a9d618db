"""The registries: one :class:`~fl_privsim.core.registry.Registry` per plugin kind.

Every kind of plugin (attack, defense, server modification, analysis, inference game, measure,
dataset, model, reproduction, plus the model variants and the config checks) has exactly one
registry here, and each plugin registers itself where it is defined with
``@plugins.<KIND>.register("name")``. Each registry names the modules that register its
built-ins as strings: the foundation (the config checks, the model builder) finds a plugin by
name without importing a higher layer at module level, and a user's package adds to the same
registry through its entry-point group (``fl_privsim.<kind>``).

The datasets and models name their built-ins in a ``name -> module`` map, so the config's
allowed values (and ``fl-privsim --help``) list them without importing torch; the module
must then register exactly those names (``tests/unit/test_registries.py`` holds it).
"""

from __future__ import annotations

from typing import Any

from fl_privsim.core.registry import Registry

_DATA = "fl_privsim.core.data"
_MODELS = "fl_privsim.core.models"

#: Attacks (:class:`adversaries.base.Attack`), group ``fl_privsim.attacks``.
ATTACKS: Registry[Any] = Registry(
    kind="attack", group="fl_privsim.attacks", builtins=("adversaries",)
)

#: Client defenses (:class:`clients.defenses.base.Defense`), group ``fl_privsim.defenses``.
DEFENSES: Registry[Any] = Registry(
    kind="defense", group="fl_privsim.defenses", builtins=("clients.defenses",)
)

#: A malicious server's model modifications (:class:`adversaries.malicious.base.Modification`),
#: group ``fl_privsim.modifications``.
MODIFICATIONS: Registry[Any] = Registry(
    kind="modification", group="fl_privsim.modifications", builtins=("adversaries.malicious",)
)

#: Analyst-side measures run on attacked updates (``[[analyses]]``): a class built with
#: ``(cfg, **params)`` (:mod:`fl_privsim.engine.analyses`), group ``fl_privsim.analyses``.
ANALYSES: Registry[Any] = Registry(
    kind="analysis",
    group="fl_privsim.analyses",
    builtins=("fl_privsim.engine.analyses",),
    ordered=True,
)

#: Inference games (``game.kind``): a function building one game's trials
#: (:mod:`adversaries.inference.games`), group ``fl_privsim.games``.
GAMES: Registry[Any] = Registry(
    kind="game",
    group="fl_privsim.games",
    builtins=("adversaries.inference.games",),
    ordered=True,
)

#: Leakage measures of ``fl-privsim measure`` (``measure.kind``): a function
#: ``(cfg, data, model, device, out) -> (summary, rows)`` (:mod:`fl_privsim.app.measure`),
#: group ``fl_privsim.measures``.
MEASURES: Registry[Any] = Registry(
    kind="measure",
    group="fl_privsim.measures",
    builtins=("fl_privsim.app.measure",),
    ordered=True,
)

#: Datasets (``data.name``): a loader ``(root, *, image_size, download, test_fraction, seed)
#: -> (train_x, train_y, test_x, test_y, class_names)`` (:mod:`fl_privsim.core.data`), group
#: ``fl_privsim.datasets``.
DATASETS: Registry[Any] = Registry(
    kind="dataset",
    group="fl_privsim.datasets",
    builtins={
        name: _DATA
        for name in (
            "digits",
            "mnist",
            "fashion_mnist",
            "cifar10",
            "folder",
            "cifar10_npz",
            "mnist_idx",
            "adult",
        )
    },
    ordered=True,
)

#: Model architectures (``model.name``): a builder ``(input_shape, num_classes) -> nn.Module``
#: (:mod:`fl_privsim.core.models`), group ``fl_privsim.models``.
MODELS: Registry[Any] = Registry(
    kind="model",
    group="fl_privsim.models",
    builtins={
        name: _MODELS
        for name in (
            "mlp",
            "linear",
            "lenet",
            "convnet",
            "cnn6",
            "resnet18",
            "resnet18_gn",
            "convnet_bn",
        )
    },
    ordered=True,
)

#: The papers' reproductions (``fl-privsim reproduce NAME``): a
#: :class:`~fl_privsim.app.reproduce.base.Reproduction`, group ``fl_privsim.reproductions``.
REPRODUCTIONS: Registry[Any] = Registry(
    kind="reproduction",
    group="fl_privsim.reproductions",
    builtins=("fl_privsim.app.reproduce",),
)

#: Model variants a defense adds to every base model (``<base>_<variant>``, e.g. ``mlp_vib``):
#: a function ``(base, input_shape, num_classes) -> nn.Module``.
MODEL_VARIANTS: Registry[Any] = Registry(
    kind="model variant",
    group="fl_privsim.model_variants",
    builtins={"vib": "clients.defenses.vib"},
)

#: Checks each layer runs on the whole config at load time (one ``ConfigError`` line before
#: anything launches): a function ``(cfg) -> None``, looked up by name when its section is set.
CONFIG_CHECKS: Registry[Any] = Registry(
    kind="config check",
    group="fl_privsim.config_checks",
    builtins={
        "secure_aggregation": "fl_privsim.engine.secure_aggregation",
        "defenses": "clients.defenses",
        "analyses": "fl_privsim.engine.analyses",
        "inference_attacks": "adversaries.inference.federated",
    },
)


#: Injected client failures (``federation.failure_mode``): a function
#: ``(state, seed, server_round, client) -> update`` that raises (the client crashes) or returns
#: the arrays the failed client replies with (:mod:`fl_privsim.core.faults`), group
#: ``fl_privsim.failures``.
FAILURES: Registry[Any] = Registry(
    kind="failure",
    group="fl_privsim.failures",
    builtins={"crash": "fl_privsim.core.faults", "garbage": "fl_privsim.core.faults"},
    ordered=True,
)


#: Every plugin kind's registry, by kind.
REGISTRIES: dict[str, Registry[Any]] = {
    "attacks": ATTACKS,
    "defenses": DEFENSES,
    "modifications": MODIFICATIONS,
    "analyses": ANALYSES,
    "games": GAMES,
    "measures": MEASURES,
    "datasets": DATASETS,
    "models": MODELS,
    "reproductions": REPRODUCTIONS,
    "model_variants": MODEL_VARIANTS,
    "config_checks": CONFIG_CHECKS,
    "failures": FAILURES,
}


def model_names() -> list[str]:
    """Every ``model.name``: the :data:`MODELS`, then each with each :data:`MODEL_VARIANTS`
    suffix (``<base>_<variant>``, e.g. ``mlp_vib``)."""
    bases = MODELS.names()
    return [*bases, *(f"{b}_{v}" for v in MODEL_VARIANTS.names() for b in bases)]


def split_model_name(name: str) -> tuple[str, str | None]:
    """``(base, variant)`` of a ``model.name`` (``variant`` ``None`` for a base model); a name
    that is neither is returned as ``(name, None)``."""
    if name in MODELS:
        return name, None
    for variant in MODEL_VARIANTS.names():
        base = name.removesuffix(f"_{variant}")
        if base != name and base in MODELS:
            return base, variant
    return name, None
