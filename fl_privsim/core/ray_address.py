"""The form of ``federation.ray_address``: which Ray a run uses, checked without Ray.

``""`` starts a fresh local Ray for the run; ``"auto"`` joins the cluster ``ray start``
recorded on this machine (or ``RAY_ADDRESS``); ``host:port`` joins the cluster whose GCS
listens there (``ray start --head --port=...``); ``ray://host:port`` connects through Ray
Client. Reaching the cluster is :mod:`fl_privsim.app.ray_cluster`'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fl_privsim.core.errors import ConfigError

#: The forms, as a user reads them in an error.
FORMS = '"" (start a local Ray), "auto", "host:port" or "ray://host:port"'

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")


@dataclass(frozen=True)
class RayAddress:
    """A cluster address: ``client`` when it goes through Ray Client (``ray://``)."""

    host: str
    port: int
    client: bool = False

    @property
    def hostport(self) -> str:
        """``host:port`` (what a socket or a gRPC channel connects to)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"ray://{self.hostport}" if self.client else self.hostport


def parse_host_port(text: str, *, key: str = "federation.ray_address") -> RayAddress:
    """``host:port`` or ``ray://host:port`` as a :class:`RayAddress`; anything else (no port,
    a port outside 1-65535, spaces, another scheme) is one :class:`ConfigError` naming
    ``key`` and the allowed forms."""
    raw = text.strip()
    client = raw.startswith("ray://")
    rest = raw[len("ray://") :] if client else raw
    host, sep, port = rest.rpartition(":")
    bad = ConfigError(f"{key}: {text!r} is not a Ray address; use {FORMS}")
    if "://" in rest or not sep or not _HOST.match(host) or not port.isdigit():
        raise bad
    number = int(port)
    if not 1 <= number <= 65535:
        raise ConfigError(f"{key}: port {number} of {text!r} is outside 1-65535")
    return RayAddress(host=host.strip("[]"), port=number, client=client)


def check_ray_address(text: str, *, key: str = "federation.ray_address") -> None:
    """Accept ``""``, ``"auto"``, ``host:port`` and ``ray://host:port``; refuse the rest with
    one :class:`ConfigError` line."""
    if text in ("", "auto"):
        return
    parse_host_port(text, key=key)
