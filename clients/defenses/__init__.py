"""Client defenses as plugins (pure torch; no Flower or Ray).

Importing this package registers the built-in defenses in :data:`DEFENSES`; third-party
defenses come from the entry-point group ``fl_privsim.defenses``. See
:mod:`clients.defenses.base` for the hook points and :mod:`clients.defenses.stack` for the
stacking rules.
"""

from typing import Any

# imported to register the built-ins
from clients.defenses import (  # noqa: F401
    adversarial,
    dp_sgd,
    dynamic_dp,
    mixing,
    model_inspection,
    soteria,
    transforms,
    vib,
)
from clients.defenses.base import (
    DEFENSES,
    STAGES,
    BatchSamplerDefense,
    Defense,
    PerSampleDefense,
    TensorTransform,
    TrainingInfo,
    register_defense,
)
from clients.defenses.losses import check_loss_config
from clients.defenses.stack import batch_sampler, build_defenses, draw_batches, validate_stack
from fl_privsim.core import plugins


@plugins.CONFIG_CHECKS.register("defenses")
def check_config(cfg: Any) -> None:
    """Config-load hook: ``[[defenses]]`` build (each defense validates its own params and the
    stack order) and ``client.loss`` fits the defenses and attacks
    (:func:`clients.defenses.losses.check_loss_config`)."""
    if cfg.defenses:
        build_defenses(cfg.defenses)
    check_loss_config(cfg)


__all__ = [
    "DEFENSES",
    "STAGES",
    "BatchSamplerDefense",
    "Defense",
    "PerSampleDefense",
    "TensorTransform",
    "TrainingInfo",
    "adversarial",
    "batch_sampler",
    "build_defenses",
    "check_config",
    "dp_sgd",
    "draw_batches",
    "dynamic_dp",
    "mixing",
    "register_defense",
    "soteria",
    "transforms",
    "validate_stack",
    "vib",
]
