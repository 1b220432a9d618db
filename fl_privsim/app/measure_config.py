"""The config of ``fl-privsim measure``: a typed schema bound by the same binder as the run and
game configs (:func:`fl_privsim.core.config.bind`), so every command reads its TOML, applies
``--set`` and reports a bad key or value the same way (one line naming what is allowed).

Sections: ``[measure]``, ``[data]``, ``[model]``, one per measure (``[i2f]``, ``[vinfo]``,
``[sensitivity]``, ``[subspace]``) and ``[output]``; a file only needs the keys it changes.
:func:`load_config` returns the bound config as plain ``{section: {key: value}}`` tables, the
shape the measures read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_privsim.core import paths, plugins
from fl_privsim.core.config import (
    _f,
    apply_override,
    bind,
    choices_of,
    override_key,
    read_toml_file,
)
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import INITS

#: Perturbations of the ``i2f`` measure (and of the ``i2f_vs_dgl`` reproduction).
I2F_NOISES = ("gaussian", "laplace", "pruning")
TARGETS = ("label", "parity")
#: Targets of the ``vinfo`` measure: the discrete ones, or the (continuous) input.
VINFO_TARGETS = (*TARGETS, "input")
#: ``vinfo.input_variance``: the Gaussian decoders' variance (one per dimension, or shared).
INPUT_VARIANCES = ("per_dim", "shared")
SPLITS = ("train", "test")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class MeasureSection:
    """``[measure]``: which measure, its seed, threads and device."""

    kind: str = _f("i2f", "the leakage measure", choices=plugins.MEASURES.names)
    seed: int = _f(0, "seed of the samples, probes and noise draws")
    threads: int = _f(1, "torch CPU threads", min=1)
    device: str = _f("cpu", "where the measure runs", choices=DEVICES)


@dataclass(frozen=True)
class MeasureData:
    """``[data]``: the records measured."""

    name: str = _f("digits", "dataset", choices=plugins.DATASETS.names)
    root: str = _f("", 'folder holding the dataset files ("" = the loader\'s default)')
    split: str = _f("test", "which split the samples come from", choices=SPLITS)


@dataclass(frozen=True)
class MeasureModel:
    """``[model]``: the model whose gradients are measured (at initialisation)."""

    name: str = _f("lenet", "model", choices=plugins.model_names)
    init: str = _f("uniform", "weight initialisation scheme", choices=INITS)


@dataclass(frozen=True)
class I2FSection:
    """``[i2f]``: the Inversion Influence Function (Zhang et al., NeurIPS 2023)."""

    samples: int = _f(16, "records measured, one row each", min=1)
    first_index: int = _f(0, "index of the first record in the split", min=0)
    noise: str = _f("gaussian", "the defense's perturbation of the gradient", choices=I2F_NOISES)
    scale: float = _f(
        1e-3,
        "gaussian/laplace: the noise VARIANCE (Laplace b = sqrt(var/2)); pruning: the fraction "
        "of smallest-|g| entries zeroed",
    )
    eps: float = _f(1.0, "regulariser of (JJ^T + eps I)^-1")
    mc_samples: int = _f(0, "0: one draw of the perturbation; N > 0: mean +- stderr of N", min=0)
    cg_max_iter: int = _f(500, "conjugate-gradient iterations", min=1)


@dataclass(frozen=True)
class VInfoSection:
    """``[vinfo]``: layer-wise V-information of the per-sample gradients (Xu et al. 2020)."""

    target: str = _f("label", "what the gradients inform about", choices=VINFO_TARGETS)
    samples_per_class: int = _f(30, "records per class", min=4)
    max_features: int = _f(256, "gradient features kept per layer", min=1)
    mlp_epochs: int = _f(300, "training epochs of the MLP predictive family", min=1)
    input_components: int = _f(16, "target = input: principal components kept", min=1)
    input_variance: str = _f(
        "per_dim", "target = input: the Gaussian decoders' variance", choices=INPUT_VARIANCES
    )


@dataclass(frozen=True)
class SensitivitySection:
    """``[sensitivity]``: Jacobian sensitivity per layer by Hutchinson probes (Mo et al.)."""

    samples: int = _f(8, "records measured", min=1)
    first_index: int = _f(0, "index of the first record in the split", min=0)
    probes: int = _f(16, "Hutchinson probes per record", min=2)


@dataclass(frozen=True)
class SubspaceSection:
    """``[subspace]``: principal-angle distance of two groups' gradient subspaces (Mo et al.)."""

    target: str = _f(
        "label", "label: the two classes in `classes`; parity: even vs odd", choices=TARGETS
    )
    classes: list[int] = _f([0, 1], "target = label: the two classes compared", min=0)
    samples_per_class: int = _f(20, "records per group", min=2)
    k: int = _f(5, "subspace dimension", min=1)


@dataclass(frozen=True)
class OutputSection:
    """``[output]``: where run folders go."""

    dir: str = _f("runs", "parent folder of the run folder")


@dataclass(frozen=True)
class MeasureConfig:
    """A whole ``fl-privsim measure`` config."""

    measure: MeasureSection = field(default_factory=MeasureSection)
    data: MeasureData = field(default_factory=MeasureData)
    model: MeasureModel = field(default_factory=MeasureModel)
    i2f: I2FSection = field(default_factory=I2FSection)
    vinfo: VInfoSection = field(default_factory=VInfoSection)
    sensitivity: SensitivitySection = field(default_factory=SensitivitySection)
    subspace: SubspaceSection = field(default_factory=SubspaceSection)
    output: OutputSection = field(default_factory=OutputSection)


#: Every section and key with its default (from :class:`MeasureConfig`).
DEFAULTS: dict[str, dict[str, Any]] = dataclasses.asdict(MeasureConfig())


def choices() -> dict[str, tuple[Any, ...]]:
    """``{"section.key": allowed values}`` of every key that takes one of a few."""
    out = {}
    for section in dataclasses.fields(MeasureConfig):
        for f in dataclasses.fields(section.default_factory):  # type: ignore[arg-type]
            allowed = choices_of(f.metadata)
            if allowed is not None:
                out[f"{section.name}.{f.name}"] = allowed
    return out


def describe() -> str:
    """One line per key: ``section.key = default`` (and the allowed values)."""
    allowed = choices()
    lines = []
    for section, keys in DEFAULTS.items():
        for key, default in keys.items():
            full = f"{section}.{key}"
            extra = f"  ({' | '.join(map(str, allowed[full]))})" if full in allowed else ""
            lines.append(f"  {full} = {default!r}{extra}")
    return "\n".join(lines)


def validate(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Defaults updated by ``data`` (a parsed config), bound and checked; then the checks that
    join keys. Returns ``{section: {key: value}}``."""
    cfg: dict[str, dict[str, Any]] = dataclasses.asdict(bind(MeasureConfig, dict(data)))
    i2f = cfg["i2f"]
    for key in ("scale", "eps"):
        if not math.isfinite(i2f[key]):
            raise ConfigError(f"i2f.{key}: expected a finite number, got {i2f[key]!r}")
    if i2f["scale"] < 0 or (i2f["noise"] == "pruning" and i2f["scale"] > 1):
        raise ConfigError(
            f"i2f.scale: must be a variance >= 0 (gaussian, laplace) or a ratio in [0, 1] "
            f"(pruning), got {i2f['scale']}"
        )
    if i2f["eps"] < 0:
        raise ConfigError(f"i2f.eps: must be >= 0, got {i2f['eps']}")
    if i2f["noise"] == "pruning" and i2f["mc_samples"] > 0:
        raise ConfigError(
            'i2f.mc_samples: pruning is deterministic; use mc_samples = 0 with noise = "pruning"'
        )
    sub = cfg["subspace"]
    if sub["target"] == "label" and (
        len(sub["classes"]) != 2 or sub["classes"][0] == sub["classes"][1]
    ):
        raise ConfigError(
            f"subspace.classes: expected two different class labels, got {sub['classes']}"
        )
    return cfg


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """The TOML file (if any), then the ``--set`` overrides, validated (:func:`validate`).

    Relative ``data.root`` and ``output.dir`` resolve against the file's folder when written in
    the file, against the current directory when given with ``--set`` (:mod:`fl_privsim.core.paths`)."""
    path_keys = ("data.root", "output.dir")
    data: dict[str, Any] = read_toml_file(path) if path else {}
    if path:
        paths.resolve_keys(data, path_keys, paths.absolute(path).parent)
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if "=" in assignment and key.count(".") != 1:
            raise ConfigError(
                f"--set {key}: expected SECTION.KEY=VALUE; sections: {', '.join(DEFAULTS)}"
            )
        apply_override(data, assignment)
        paths.resolve_keys(data, path_keys, under=override_key(assignment))
    return validate(data)
