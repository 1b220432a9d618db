"""The registries of plugin kinds that the foundation itself needs to look up.

Each registry names the modules that register its built-ins as strings: the foundation
(the config checks, the model builder) finds a plugin by name without importing a higher
layer at module level, and a user's package adds to the same registry through its entry-point
group. See :class:`fl_privsim.core.registry.Registry`.
"""

from __future__ import annotations

from typing import Any

from fl_privsim.core.registry import Registry

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
