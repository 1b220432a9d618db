"""Injected client failures (``federation.failure_rate``, ``federation.failure_mode``).

How the failures are drawn: in round ``r`` every *sampled* client ``c`` fails independently
with probability ``failure_rate``, from its own stream ``numpy_rng(seed, r, c, "failure")``
(:mod:`fl_privsim.core.seeding`). The client computes the same draw itself (it knows the seed,
the round and its id), so the server never tells it to fail, and the same seed gives the same
failures whatever order Ray runs the clients in. The number of failures in a round is therefore
binomial (mean ``failure_rate × sampled``), not fixed.

Kinds (``failure_mode``):

- ``crash``: the client raises before training; Flower turns it into an error reply.
- ``garbage``: the client replies with an update of the right keys filled with NaN, or with
  wrong shapes (which of the two is drawn from the same stream).
- ``hang``: the client sends nothing until ``federation.round_timeout`` has passed (it sleeps
  past it, then raises): the server stops waiting at the timeout and counts it as failed; the
  late reply is never read. (In the simulation a hanging client keeps one Ray actor busy for
  that time, so the other clients share the remaining actors.)
- ``mixed``: crash or garbage, drawn per (round, client) with equal probability (not hang,
  which costs a whole timeout).
- any other name registered in :data:`fl_privsim.core.plugins.FAILURES` (a plugin hook, entry
  point group ``fl_privsim.failures``): a function ``(state, seed, server_round, client)``
  that raises (a crash) or returns the arrays the client replies with.

The server drops error replies and replies that fail :func:`reply_problem`, so the aggregate
holds only real updates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import torch

from fl_privsim.core import plugins
from fl_privsim.core.seeding import numpy_rng

#: The built-in failure kinds (``mixed`` draws among these).
FAILURE_KINDS: tuple[str, ...] = ("crash", "garbage")
#: Prefix of the reason an injected crash raises with (the server's failure reasons show it).
INJECTED = "injected failure"
#: The failure mode of a client that does not reply before the round's timeout.
HANG = "hang"
#: Seconds a hanging client sleeps beyond ``federation.round_timeout`` before it gives up.
HANG_MARGIN = 2.0


def failure_kind(seed: int, server_round: int, client: int, rate: float, mode: str) -> str | None:
    """The injected failure of ``client`` in ``server_round`` (``"crash"``/``"garbage"``), or
    ``None`` when it does not fail. Only meaningful for a client sampled in that round."""
    if rate <= 0.0:
        return None
    rng = numpy_rng(seed, server_round, client, "failure")
    if float(rng.random()) >= rate:
        return None
    if mode == "mixed":  # the built-in kinds only: a plugin does not change the draws
        return FAILURE_KINDS[int(rng.integers(len(FAILURE_KINDS)))]
    return mode


@plugins.FAILURES.register("crash")
def crash(
    state: Mapping[str, torch.Tensor], seed: int, server_round: int, client: int
) -> dict[str, torch.Tensor]:
    """An injected crash: raises (Flower replies with an error)."""
    raise RuntimeError(f"{INJECTED}: client {client} crashed in round {server_round}")


@plugins.FAILURES.register("garbage")
def garbage(
    state: Mapping[str, torch.Tensor], seed: int, server_round: int, client: int
) -> dict[str, torch.Tensor]:
    """An injected garbage reply: :func:`garbage_update` of the model's ``state``."""
    return garbage_update(state, seed, server_round, client)


def injected_failures(
    seed: int, rate: float, mode: str, sampled: Mapping[int, Iterable[int]]
) -> dict[int, dict[int, str]]:
    """``{round: {client: kind}}`` of the injected failures among ``sampled`` (round -> the
    round's sampled clients): what the clients will do, computed without asking them."""
    out: dict[int, dict[int, str]] = {}
    for rnd, clients in sampled.items():
        out[rnd] = {}
        for c in sorted(clients):
            kind = failure_kind(seed, rnd, c, rate, mode)
            if kind is not None:
                out[rnd][c] = kind
    return out


def hang(round_timeout: float, server_round: int, client: int) -> None:
    """An injected hang: sleep until ``HANG_MARGIN`` seconds past ``round_timeout`` (the
    server has stopped waiting by then), then raise; the late error reply is never read."""
    time.sleep(round_timeout + HANG_MARGIN)
    raise RuntimeError(f"{INJECTED}: client {client} hung in round {server_round}")


def garbage_update(
    update: Mapping[str, torch.Tensor], seed: int, server_round: int, client: int
) -> dict[str, torch.Tensor]:
    """A garbage reply in place of ``update``: NaN-filled, or (drawn) every tensor with one
    extra element, so its shapes are wrong."""
    rng = numpy_rng(seed, server_round, client, "failure", 1)
    if float(rng.random()) < 0.5:
        return {k: torch.full_like(v, float("nan")) for k, v in update.items()}
    return {k: torch.zeros(v.numel() + 1, dtype=v.dtype) for k, v in update.items()}


def update_problem(
    update: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    num_examples: float | None,
) -> str | None:
    """Why a client's ``update`` cannot be aggregated (``None`` when it can): a key the global
    model (``expected``, name -> tensor) lacks, a shape that differs from the global tensor's,
    a non-finite value, or a non-positive or non-finite ``num-examples``."""
    if num_examples is None or not math.isfinite(num_examples) or num_examples <= 0:
        return f"garbage reply: num-examples = {num_examples!r}"
    if not update:
        return "garbage reply: no arrays"
    for name, value in update.items():
        if name not in expected:
            return f"garbage reply: unknown array {name!r}"
        if tuple(value.shape) != tuple(expected[name].shape):
            return (
                f"garbage reply: {name} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"garbage reply: {name} has non-finite values"
    return None
