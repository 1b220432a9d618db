"""Two changes to Flower's simulation runtime (flwr 1.41) that make a round cost what its
sampled clients cost, not what the whole federation costs. Applied by
:func:`fl_privsim.app.simulation.launch` only, for the duration of one run, and only where
Flower's code is the code they were written against (otherwise Flower runs unchanged).

1. **Dispatch.** Flower's ``vce_api.add_messages_to_queue`` hands the waiting messages to the
   client actors by asking the in-memory LinkState, every 0.1 s and for *every* registered
   node, for that node's next message; each such call scans (and validates) every stored
   message. A sweep therefore costs (nodes x messages) validations: with 10 000 nodes and
   100 messages in flight, a million per sweep, sweeps back to back on a driver core; the
   query round that maps nodes to clients (10 000 messages: 10^8 per sweep) did not finish in
   3.5 minutes (docs/scale.md). :func:`dispatch_messages`
   does the same sweep in one pass over the stored messages (each validated once, at most one
   message per node per sweep, as Flower's ``limit=1``), so a sweep costs the messages in
   flight. Which actor runs which message, and when, changes only in order; replies are
   aggregated in client order (:meth:`strategies.fedupdates.FedUpdates.order_replies`), so
   the results do not change.
2. **Node map.** ``vce_api._register_nodes`` creates the SuperNodes and their
   ``partition-id``; :func:`registered_nodes` keeps that ``{node_id: partition_id}`` map so
   the server knows which node holds which client without sending every node a query message
   (:func:`strategies.fedupdates.discover_clients` with ``known=``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_nodes: dict[int, int] = {}


def registered_nodes() -> dict[int, int]:
    """``{node_id: partition_id}`` of the SuperNodes the running simulation registered (empty
    when no patched simulation runs, or before it registered its nodes)."""
    with _lock:
        return dict(_nodes)


def _undelivered_once(state: Any, nodes: Any) -> list[Any]:
    """The next undelivered message of each node in ``nodes``, in store order, marked
    delivered: Flower's ``get_message_ins(node_id, limit=1)`` for every node at once."""
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store.keys())
        state._check_stored_messages(set(ids))  # expired or foreign messages are dropped
        picked, seen = [], set()
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            dst = msg.metadata.dst_node_id
            if dst in seen or dst not in nodes:
                continue
            seen.add(dst)
            picked.append(msg)
        stamp = now().isoformat()
        for msg in picked:
            msg.metadata.delivered_at = stamp
    return picked


def dispatch_messages(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue``: every 0.1 s, queue each node's next
    undelivered message, found in one pass over the stored messages."""
    while not f_stop.is_set():
        for msg in _undelivered_once(state, nodes_mapping):
            queue.put(msg)
        f_stop.wait(0.1)


def _supported(vce: Any, linkstate: Any) -> bool:
    """Flower's code is the code this module replaces (flwr 1.41's names and fields)."""
    import flwr

    cls = getattr(linkstate, "InMemoryLinkState", None)
    return (
        flwr.__version__.startswith("1.41.")
        and callable(getattr(vce, "add_messages_to_queue", None))
        and callable(getattr(vce, "_register_nodes", None))
        and cls is not None
        and callable(getattr(cls, "_check_stored_messages", None))
    )


@contextlib.contextmanager
def patched_simulation() -> Iterator[bool]:
    """Within the block, Flower's simulation dispatches in one pass per sweep and records its
    node map (:func:`registered_nodes`); yields whether it could (False: Flower unchanged)."""
    from flwr.server.superlink.fleet.vce import vce_api as vce
    from flwr.server.superlink.linkstate import in_memory_linkstate as linkstate

    if not _supported(vce, linkstate):
        log.info("Flower's simulation runtime is not the one fl-privsim patches; unchanged")
        yield False
        return
    original_dispatch, original_register = vce.add_messages_to_queue, vce._register_nodes

    def dispatch(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        if isinstance(state, linkstate.InMemoryLinkState):
            dispatch_messages(state, queue, nodes_mapping, f_stop)
        else:
            original_dispatch(state, queue, nodes_mapping, f_stop)

    def register(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping: dict[int, int] = original_register(num_nodes, state_factory)
        with _lock:
            _nodes.clear()
            _nodes.update(mapping)
        return mapping

    vce.add_messages_to_queue, vce._register_nodes = dispatch, register
    try:
        yield True
    finally:
        vce.add_messages_to_queue, vce._register_nodes = original_dispatch, original_register
        with _lock:
            _nodes.clear()
