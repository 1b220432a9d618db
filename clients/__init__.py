"""Client side: the Flower ClientApp (``clients.client_app``) and, in pure torch, the
local update every client computes (``clients.local_update``)."""

from clients.local_update import LocalUpdate, local_update

__all__ = ["LocalUpdate", "local_update"]
