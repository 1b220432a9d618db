"""What a server may send: the agreed base model, optionally behind a dense front block.

A malicious server (:mod:`adversaries.malicious`) may change the *architecture* it sends, not
only the weights: Fowl et al.'s imprint block ("Robbing the Fed", ICLR 2022) is a dense layer
placed in front of the model. The server then sends an architecture *spec* beside the weights,
and a client, which trusts the server's model, builds it with :func:`build_architecture` and
loads the weights it received. The structure lives here, in the foundation, so that clients can
build it without importing any attack; the values (which rows, which biases) are the server's
and travel as ordinary weights.

Spec (JSON-serialisable dict; ``{}`` is the agreed model unchanged)::

    {"front_block": {"rows": 256, "activation": "relu"}}      # or "clamp" (per-row upper bound)

The model with a front block is :class:`FrontBlockModel`: ``model(block(x))``. Its state-dict
names are ``block.*`` and ``model.<agreed name>``; :func:`honest_update` maps an update of it
back to the agreed model's names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fl_privsim.core.errors import ConfigError

ACTIVATIONS = ("relu", "clamp")

#: ConfigRecord key of the architecture spec in a train message (absent: the agreed model).
ARCH_KEY = "fl-privsim-arch"


class FrontBlock(nn.Module):
    """A dense block on the flattened input, added back to it: ``x + V·act(W x + b) + c``.

    ``act`` is ReLU (``"relu"``) or ``clamp(·, 0, upper)`` with a per-row upper bound kept in
    the buffer ``upper`` (``"clamp"``, a Hardtanh whose width differs per row). The output has
    the input's shape, so any model can follow it.

    Parameters
    ----------
    input_shape:
        (C, H, W) of one input.
    rows:
        Rows of the dense layer ``W`` (at least 1).
    activation:
        ``"relu"`` or ``"clamp"``.
    """

    upper: torch.Tensor  # a buffer (register_buffer below)

    def __init__(
        self, input_shape: tuple[int, int, int], rows: int, activation: str = "relu"
    ) -> None:
        super().__init__()
        if rows < 1:
            raise ConfigError(f"front block: rows must be >= 1, got {rows}")
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"front block: activation {activation!r} not in {', '.join(ACTIVATIONS)}"
            )
        d = int(input_shape[0] * input_shape[1] * input_shape[2])
        self.activation = activation
        self.encoder = nn.Linear(d, rows)
        self.decoder = nn.Linear(rows, d)
        # "no bound" is the largest float32, not inf: a client sends each buffer's change, and
        # inf - inf would be NaN
        self.register_buffer("upper", torch.full((rows,), torch.finfo(torch.float32).max))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x.flatten(1))
        h = torch.relu(h) if self.activation == "relu" else torch.minimum(torch.relu(h), self.upper)
        out: torch.Tensor = x + self.decoder(h).view_as(x)
        return out


class FrontBlockModel(nn.Module):
    """The agreed model behind a :class:`FrontBlock`: ``model(block(x))``."""

    def __init__(self, block: FrontBlock, model: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(self.block(x))
        return out


def check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` as a plain dict after checking its keys; :class:`ConfigError` otherwise."""
    unknown = sorted(set(spec) - {"front_block"})
    if unknown:
        raise ConfigError(f"architecture spec: unknown entry {unknown[0]!r}; allowed: front_block")
    out = dict(spec)
    if "front_block" in out:
        fb = dict(out["front_block"])
        bad = sorted(set(fb) - {"rows", "activation"})
        if bad:
            raise ConfigError(
                f"architecture spec: front_block has unknown key {bad[0]!r}; allowed: rows, activation"
            )
        out["front_block"] = {
            "rows": int(fb.get("rows", 0)),
            "activation": str(fb.get("activation", "relu")),
        }
    return out


def wrap(model: nn.Module, spec: Mapping[str, Any], input_shape: tuple[int, int, int]) -> nn.Module:
    """``model`` with the structure ``spec`` adds (``model`` itself for ``{}``)."""
    spec = check_spec(spec)
    if "front_block" in spec:
        fb = spec["front_block"]
        return FrontBlockModel(FrontBlock(input_shape, fb["rows"], fb["activation"]), model)
    return model


def build_architecture(
    base: nn.Module, spec: Mapping[str, Any] | str | None, input_shape: tuple[int, int, int]
) -> nn.Module:
    """The model a client builds from the agreed ``base`` and the server's ``spec``
    (a dict, its JSON text, or ``None``/``""`` for none)."""
    if isinstance(spec, str):
        spec = json.loads(spec) if spec else {}
    return wrap(base, spec or {}, input_shape)


def spec_to_text(spec: Mapping[str, Any]) -> str:
    """The spec as the JSON text a message carries (``""`` for the agreed model)."""
    return json.dumps(check_spec(spec), sort_keys=True) if spec else ""


def honest_name(name: str, spec: Mapping[str, Any]) -> str | None:
    """The agreed model's name of a sent model's state-dict entry (``None`` for block entries)."""
    if "front_block" not in spec:
        return name
    if name.startswith("block."):
        return None
    return name.removeprefix("model.")


def honest_update(
    update: Mapping[str, torch.Tensor], spec: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """An update of the sent model restricted to, and renamed as, the agreed model's entries."""
    out: dict[str, torch.Tensor] = {}
    for name, value in update.items():
        hn = honest_name(name, spec)
        if hn is not None:
            out[hn] = value
    return out
