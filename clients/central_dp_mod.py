"""Client side of Flower's central DP with client-side clipping (``client_*`` modes).

The ClientApp is built once, for every run, so it cannot simply list Flower's
``fixedclipping_mod`` / ``adaptiveclipping_mod``: :func:`make_central_dp_mod` returns one
mod that reads the run's ``[federation.central_dp]`` from the message and, only for train
messages of a ``client_fixed`` / ``client_adaptive`` run, hands the reply to Flower's mod.

Flower's mods clip ``reply − received`` (they expect weights); our reply is the update
itself (a FedSGD gradient or FedAvg delta; see :mod:`strategies.central_dp`). So the
handler first runs on the real message, and Flower's mod is then called on a view of the
message whose ArrayRecord is the origin (zeros with the update's keys and shapes) and
whose ``call_next`` returns that reply: Flower's code clips exactly the update, unchanged,
and (adaptive) adds its ``norm_bit`` to the reply's metrics.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from fl_privsim.core.config import Config

log = logging.getLogger(__name__)

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
FLOWER_MODS = {"client_fixed": fixedclipping_mod, "client_adaptive": adaptiveclipping_mod}


def _origin_view(msg: Message, reply: Message) -> Message:
    """``msg`` as Flower's mod should see it: the update-space origin and the train config."""
    record = next(iter(reply.content.array_records.values()))
    zeros = ArrayRecord(
        {
            k: Array(np.zeros_like(v))
            for k, v in zip(record.keys(), record.to_numpy_ndarrays(), strict=True)
        }
    )
    configs = msg.content.config_records
    config = next(iter(configs.values())) if len(configs) == 1 else ConfigRecord({})
    return Message(
        content=RecordDict({"arrays": zeros, "config": config}),
        metadata=copy.deepcopy(msg.metadata),
    )


def make_central_dp_mod(config_of: Callable[[Message, Context], Config]) -> Mod:
    """A ClientApp mod applying Flower's clipping mod when the run's config asks for it.

    ``config_of(msg, context)`` returns the run config carried by a message.
    """

    def central_dp_mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        mode = config_of(msg, context).federation.central_dp.mode
        flower_mod = FLOWER_MODS.get(mode)
        if flower_mod is None:
            return call_next(msg, context)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        out = flower_mod(_origin_view(msg, reply), context, lambda _m, _c: reply)
        if out.has_error():  # Flower's mod answered the view: answer the real message instead
            log.error("central DP %s: %s", mode, out.error.reason)
            return Message(out.error, reply_to=msg)
        return out

    return central_dp_mod
