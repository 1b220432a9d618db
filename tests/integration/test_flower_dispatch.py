"""fl-privsim's changes to Flower's simulation runtime (strategies.flower_dispatch): one pass
per dispatch sweep with Flower's per-node semantics, the node map kept and used instead of a
query round, and Flower left as it was after the run."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from strategies import flower_dispatch as fd
from strategies.fedupdates import discover_clients


class FakeState:
    """The parts of Flower's InMemoryLinkState the dispatcher reads."""

    def __init__(self, messages: list[tuple[str, int, str]]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(
                id=mid, metadata=SimpleNamespace(dst_node_id=dst, delivered_at=delivered)
            )
            for mid, dst, delivered in messages
        }
        self.checked: list[set[str]] = []

    def _check_stored_messages(self, ids: set[str]) -> None:
        self.checked.append(ids)
        self.message_ins_store.pop("expired", None)


def test_one_message_per_node_per_sweep_in_store_order() -> None:
    state = FakeState(
        [
            ("a", 1, ""),
            ("b", 2, ""),
            ("c", 1, ""),  # node 1's second message: next sweep
            ("d", 3, "2026-01-01"),  # delivered already
            ("e", 9, ""),  # not a node of this simulation
            ("expired", 2, ""),
        ]
    )
    nodes = {1: 0, 2: 1, 3: 2}
    first = fd._undelivered_once(state, nodes)
    assert [m.id for m in first] == ["a", "b"]
    assert all(m.metadata.delivered_at for m in first)
    assert state.checked[0] == {"a", "b", "c", "d", "e", "expired"}  # each validated, once
    assert [m.id for m in fd._undelivered_once(state, nodes)] == ["c"]
    assert fd._undelivered_once(state, nodes) == []


def test_patch_is_undone_after_the_run() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    before = (vce_api.add_messages_to_queue, vce_api._register_nodes)
    with fd.patched_simulation() as patched:
        assert patched  # flwr 1.41, the version this project pins
        assert vce_api.add_messages_to_queue is not before[0]
    assert (vce_api.add_messages_to_queue, vce_api._register_nodes) == before
    assert fd.registered_nodes() == {}


class NoQueryGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        raise AssertionError("no query message should be sent")


def test_known_node_map_answers_without_messages() -> None:
    known = {101: 0, 102: 1, 103: 2}
    got = discover_clients(NoQueryGrid(list(known)), expected=3, known=lambda: known)
    assert got == known


def test_a_map_that_does_not_cover_the_nodes_falls_back_to_queries(monkeypatch) -> None:
    monkeypatch.setattr("strategies.fedupdates.time.sleep", lambda s: None)
    clock = iter(range(10_000))
    monkeypatch.setattr("strategies.fedupdates.time.monotonic", lambda: float(next(clock)))
    monkeypatch.setattr("strategies.fedupdates.Message", lambda **kw: SimpleNamespace(**kw))
    with pytest.raises(AssertionError, match="no query"):
        discover_clients(NoQueryGrid([101, 102]), expected=2, known=lambda: {101: 0})
