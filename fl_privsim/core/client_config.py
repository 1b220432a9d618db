"""The part of a run's config that a client needs, and nothing else.

The server sends each client only :data:`CLIENT_SECTIONS` of the resolved config
(:func:`client_config_text`, TOML text in every train and evaluate instruction), and the client
rebuilds a :class:`~fl_privsim.core.config.Config` from them with :func:`load_client_config`,
validating only those sections: their keys, types and ranges, the data/model cross-checks and
the ``[[defenses]]`` stack with ``client.loss``. Server-only settings (``[[attacks]]``,
``[server]``, ``[[analyses]]``, ``[scoring]``, ``[output]``, the server's federation settings,
central DP's noise and SecAgg+'s parameters) never travel and are never re-validated by a client.

In the client's ``Config`` every section that did not travel holds its default, and
``attacks`` is empty: client code reads only the sections listed here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import tomli_w

from fl_privsim.core.config import (
    Config,
    _check_data_root,
    _check_defenses,
    _check_tabular_model,
    bind,
    to_dict,
)
from fl_privsim.core.errors import ConfigError

#: What a client reads, as a tree of the config's keys (``True`` = the whole value):
#: the seed (its batches' and defenses' generators), ``[data]`` (the dataset and its partition),
#: ``[model]``, ``[client]``, ``[[defenses]]``, and of ``[federation]`` the partition count,
#: the protocol, the device and CPU threads it trains with, the injected failures (a client
#: draws its own, :mod:`fl_privsim.core.faults`; a hanging one sleeps past ``round_timeout``),
#: and central DP's mode (its clipping
#: mod is active only in the ``client_*`` modes). A malicious server's architecture travels
#: apart, under :data:`fl_privsim.core.architecture.ARCH_KEY`.
CLIENT_SECTIONS: dict[str, Any] = {
    "seed": True,
    "data": True,
    "model": True,
    "client": True,
    "defenses": True,
    "federation": {
        "num_clients": True,
        "protocol": True,
        "device": True,
        "num_cpus_per_client": True,
        "failure_rate": True,
        "failure_mode": True,
        "round_timeout": True,
        "central_dp": {"mode": True},
    },
}


def _pick(data: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, sub in spec.items():
        if key not in data:
            continue
        value = data[key]
        if sub is True:
            out[key] = value
        elif isinstance(value, Mapping):
            out[key] = _pick(value, sub)
        else:  # a scalar where a table belongs: let validation name it
            out[key] = value
    return out


def client_sections(cfg: Config | Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`CLIENT_SECTIONS` of ``cfg`` (a :class:`Config` or a TOML-shaped dict), as a
    TOML-shaped dict; every other key is left out."""
    data = to_dict(cfg) if isinstance(cfg, Config) else cfg
    return _pick(data, CLIENT_SECTIONS)


def client_config_text(cfg: Config) -> str:
    """What the server sends a client: :func:`client_sections` of ``cfg`` as TOML text."""
    return tomli_w.dumps(client_sections(cfg))


def client_config_from_dict(data: Mapping[str, Any]) -> Config:
    """A client's :class:`Config` from a TOML-shaped dict: only :func:`client_sections` of
    ``data`` are read and validated (any other key is ignored); ``attacks`` is empty and the
    other sections hold their defaults."""
    cfg: Config = bind(Config, {**client_sections(data), "attacks": []})
    _check_data_root(cfg)
    _check_tabular_model(cfg)
    _check_defenses(cfg)
    return cfg


def load_client_config(text: str) -> Config:
    """Parse and validate the config text a client received (:func:`client_config_text`; a
    whole run config's TOML works too, its server-only sections are ignored)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"client config text is not valid TOML: {exc}") from None
    return client_config_from_dict(data)
