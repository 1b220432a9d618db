"""Deterministic random streams derived from one root seed.

Ray runs clients in no fixed order, so global seeding is not enough: every consumer
(a client drawing its batch in a round, an attack restart, a partitioner) derives its own
generator from ``numpy.random.SeedSequence([seed, round, client, purpose])``.
"""

from __future__ import annotations

import numpy as np
import torch

#: Purpose ids: never renumber these, or seeded runs stop being reproducible.
PURPOSES: dict[str, int] = {
    "batch": 1,
    "partition": 2,
    "model_init": 3,
    "attack": 4,
    "split": 5,
    "sampling": 6,
    "defense": 7,
    "central_dp": 8,
    "modification": 9,
    "public_data": 10,
    "secagg_rounding": 11,
    "failure": 12,
}


def seed_int(seed: int, *keys: int | str) -> int:
    """Return a 63-bit integer derived from ``seed`` and ``keys`` (strings map to purpose ids)."""
    entropy = [int(seed)]
    for key in keys:
        if isinstance(key, str):
            if key not in PURPOSES:
                raise KeyError(f"unknown seed purpose {key!r}; known: {sorted(PURPOSES)}")
            entropy.append(PURPOSES[key])
        else:
            entropy.append(int(key) % (1 << 32))  # negative keys (aggregate = -1) wrap
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def torch_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, *keys)``."""
    gen = torch.Generator()
    gen.manual_seed(seed_int(seed, *keys))
    return gen


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A ``numpy.random.Generator`` seeded from ``(seed, *keys)``."""
    return np.random.default_rng(seed_int(seed, *keys))
