"""The inference games of Li et al. (arXiv:2408.16913, CCS 2024), in the game style of Salem
et al. ("SoK: Let the Privacy Games Begin", S&P 2023), plus membership inference.

Each game, for T trials:

1. draws a secret s ~ Bernoulli(1/2) (:func:`sample_secrets`);
2. builds the aggregate B of K clients × ``batch_size`` records according to s
   (:meth:`Game.build`);
3. releases the update with :class:`~adversaries.inference.release.Release` (the real
   client update with the configured defenses);
4. hands the adversary an :class:`Observations`, whose fields are the released updates and
   the public knowledge of the game, and nothing else: the secret has no field there, so an
   adversary (which only ever receives an ``Observations``) cannot see it.

Games (``P`` = the pool's 0/1 column ``a``: a sensitive attribute or a property):

- ``attribute``: a target record (x_ns, a = s, y) is placed in client 0's batch; the other
  records come from the pool. The adversary knows x_ns and y (``target_x`` with the
  attribute column zeroed, ``target_y``). Images (UTKFace: no attribute column, the
  attribute is a property of the face itself): the target is a pool record with a = s and
  the adversary knows only its label (``target_y``; ``target_x`` is ``None``).
- ``property``: s = 1: one record with P is placed in the aggregate, the others come from
  the whole pool (so "at least one"); s = 0: every record comes from the non-P records.
- ``distributional``: every record has P with probability α_s (D_0 vs D_1, α0 vs α1).
- ``user``: a target user owns ``user_records`` records (a random group of the pool; no
  user ids in these datasets). s = 1: client 0's batch is drawn from the user's records;
  s = 0: from the pool. The adversary knows the user's records (``user_x``/``user_y``).
- ``membership``: s = 1: the target record is in client 0's batch; s = 0: it is not. The
  adversary knows the target record.

In every game the other records of the aggregate (the co-batch) are unknown to the
adversary: its shadow trials draw them from its own auxiliary pool. Multi-round observation
(:meth:`Game.play_rounds`): the same client batches are released at R successive global
models (one :class:`Release` per round), giving one :class:`Observations` per round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from adversaries.inference.release import Release, flat_per_sample_gradients
from fl_privsim.core import plugins
from fl_privsim.core.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["GAMES", "Game", "Observations", "Pool", "sample_secrets"]

#: The game kinds (``game.kind``): the registry :data:`fl_privsim.core.plugins.GAMES`, which each
#: game's builder below joins (``(game, pool, secrets, index, rng) -> (x, y, index, public)``).
GAMES = plugins.GAMES


@dataclass(frozen=True, eq=False)
class Observations:
    """What the adversary sees in T trials. There is deliberately no field for the secret.

    updates:
        ``[T, P]`` released updates (flattened trainable parameters).
    target_x, target_y:
        attribute: the target's non-sensitive features (attribute column set to 0) and label;
        membership: the target record. ``None`` in the other games.
    user_x, user_y:
        user: ``[T, m, ...]`` the target user's records. ``None`` in the other games.
    """

    updates: torch.Tensor
    target_x: torch.Tensor | None = None
    target_y: torch.Tensor | None = None
    user_x: torch.Tensor | None = None
    user_y: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.updates.shape[0])


OBSERVATION_FIELDS = tuple(f.name for f in fields(Observations))


@dataclass(frozen=True, eq=False)
class Pool:
    """Records a game draws from: the challenger's pool, or the adversary's auxiliary pool
    (``x`` inputs, ``y`` labels, ``a`` the 0/1 attribute or property)."""

    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


def sample_secrets(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent secrets s ~ Bernoulli(1/2), as int64."""
    return rng.integers(0, 2, n).astype(np.int64)


@dataclass
class Game:
    """One game kind with its parameters (see the module docstring)."""

    kind: str
    batch_size: int = 8
    clients_per_aggregate: int = 1
    alpha0: float = 0.25
    alpha1: float = 0.5
    user_records: int = 8
    attr_column: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GAMES:
            raise ConfigError(
                f"game.kind: {self.kind!r} is not allowed; allowed: {', '.join(GAMES)}"
            )
        if self.batch_size < 1 or self.clients_per_aggregate < 1:
            raise ConfigError("game.batch_size and game.clients_per_aggregate must be >= 1")

    def build(
        self, pool: Pool, secrets: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The bank ``(x, y)`` (pool + extra rows), the index ``[T, K, B]`` of each trial's
        client batches into it, and the adversary's public knowledge."""
        t, k, b = len(secrets), self.clients_per_aggregate, self.batch_size
        n = len(pool)
        index = torch.from_numpy(rng.integers(0, n, (t, k, b)))
        return GAMES.get(self.kind)(self, pool, secrets, index, rng)  # type: ignore[no-any-return]

    def play(
        self,
        pool: Pool,
        release: Release,
        n_trials: int,
        rng: np.random.Generator,
        *,
        stream: int = 0,
        pool_grads: torch.Tensor | None = None,
    ) -> tuple[Observations, np.ndarray]:
        """Run ``n_trials`` trials: the adversary's :class:`Observations` and, separately, the
        secrets (for scoring only; never put them where an adversary can read them)."""
        obs, secrets = self.play_rounds(
            pool, [release], n_trials, rng, stream=stream, pool_grads=pool_grads
        )
        return obs[0], secrets

    def play_rounds(
        self,
        pool: Pool,
        releases: Sequence[Release],
        n_trials: int,
        rng: np.random.Generator,
        *,
        stream: int = 0,
        pool_grads: torch.Tensor | None = None,
    ) -> tuple[list[Observations], np.ndarray]:
        """Multi-round observation: the same trials (secrets and client batches) released by
        each of ``releases`` (the global model of each round, in order). ``pool_grads`` is
        reused for the first release only. Round r uses defense stream ``stream + 16·r``."""
        if not releases:
            raise ValueError("play_rounds needs at least one release")
        secrets = sample_secrets(n_trials, rng)
        x, y, index, public = self.build(pool, secrets, rng)
        out = []
        for r, release in enumerate(releases):
            grads = None
            if release.fast:
                grads = (
                    pool_grads
                    if (pool_grads is not None and r == 0)
                    else flat_per_sample_gradients(
                        release.model, pool.x, pool.y, device=release.device
                    )
                )
                if x.shape[0] > len(pool):
                    grads = torch.cat(
                        [
                            grads,
                            flat_per_sample_gradients(
                                release.model, x[len(pool) :], y[len(pool) :]
                            ),
                        ]
                    )
            updates = release.updates(x, y, index, stream=stream + 16 * r, grads=grads)
            out.append(Observations(updates=updates.detach(), **public))
        return out, secrets


# ----------------------------------------------------------------------------- the games
# One builder per game kind: ``(game, pool, secrets, index, rng) -> (x, y, index, public)``
# places the secret in the trials' client batches ``index`` ``[T, K, B]`` (drawn uniformly
# from the pool by :meth:`Game.build`) and returns the bank, the index and the adversary's
# public knowledge.

_Built = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _with_and_without(game: Game, pool: Pool) -> tuple[np.ndarray, np.ndarray]:
    a = pool.a.numpy()
    pos, neg = np.flatnonzero(a == 1), np.flatnonzero(a == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise ConfigError(
            f"game.kind = {game.kind!r}: the pool needs records with and without the property"
        )
    return pos, neg


@plugins.GAMES.register("attribute")
def _attribute(
    game: Game, pool: Pool, secrets: np.ndarray, index: torch.Tensor, rng: np.random.Generator
) -> _Built:
    t, n, s = len(secrets), len(pool), torch.from_numpy(secrets)
    if game.attr_column is None:  # images: the target is a record with a = s
        a = pool.a.numpy()
        pos, neg = np.flatnonzero(a == 1), np.flatnonzero(a == 0)
        if len(pos) == 0 or len(neg) == 0:
            raise ConfigError(
                "game.kind = 'attribute': the pool needs records with both attribute values"
            )
        target = torch.from_numpy(
            np.where(
                secrets == 1,
                pos[rng.integers(0, len(pos), t)],
                neg[rng.integers(0, len(neg), t)],
            )
        )
        index[:, 0, 0] = target
        return pool.x, pool.y, index, {"target_y": pool.y[target]}
    target = torch.from_numpy(rng.integers(0, n, t))
    tx = pool.x[target].clone()
    tx[:, game.attr_column] = s.to(tx.dtype)  # the target's attribute is the secret
    x, y = torch.cat([pool.x, tx]), torch.cat([pool.y, pool.y[target]])
    index[:, 0, 0] = n + torch.arange(t)
    masked = tx.clone()
    masked[:, game.attr_column] = 0.0
    return x, y, index, {"target_x": masked, "target_y": pool.y[target]}


@plugins.GAMES.register("property")
def _property(
    game: Game, pool: Pool, secrets: np.ndarray, index: torch.Tensor, rng: np.random.Generator
) -> _Built:
    pos, neg = _with_and_without(game, pool)
    t, (k, b), s = len(secrets), index.shape[1:], torch.from_numpy(secrets)
    no_p = torch.from_numpy(neg[rng.integers(0, len(neg), (t, k, b))])
    index = torch.where(s.view(-1, 1, 1) == 1, index, no_p)
    index[:, 0, 0] = torch.where(
        s == 1, torch.from_numpy(pos[rng.integers(0, len(pos), t)]), index[:, 0, 0]
    )
    return pool.x, pool.y, index, {}


@plugins.GAMES.register("distributional")
def _distributional(
    game: Game, pool: Pool, secrets: np.ndarray, index: torch.Tensor, rng: np.random.Generator
) -> _Built:
    pos, neg = _with_and_without(game, pool)
    t, (k, b), s = len(secrets), index.shape[1:], torch.from_numpy(secrets)
    alpha = torch.where(s == 1, game.alpha1, game.alpha0).view(-1, 1, 1)
    has_p = torch.from_numpy(rng.random((t, k, b))) < alpha
    index = torch.where(
        has_p,
        torch.from_numpy(pos[rng.integers(0, len(pos), (t, k, b))]),
        torch.from_numpy(neg[rng.integers(0, len(neg), (t, k, b))]),
    )
    return pool.x, pool.y, index, {}


@plugins.GAMES.register("user")
def _user(
    game: Game, pool: Pool, secrets: np.ndarray, index: torch.Tensor, rng: np.random.Generator
) -> _Built:
    t, n, b, s = len(secrets), len(pool), index.shape[2], torch.from_numpy(secrets)
    m = game.user_records
    if m > n:
        raise ConfigError(f"game.user_records: {m} exceeds the pool ({n} records)")
    users = torch.from_numpy(np.stack([rng.choice(n, m, replace=False) for _ in range(t)]))
    pick = torch.from_numpy(rng.integers(0, m, (t, b)))
    own = torch.gather(users, 1, pick)
    index[:, 0, :] = torch.where(s.view(-1, 1) == 1, own, index[:, 0, :])
    return pool.x, pool.y, index, {"user_x": pool.x[users], "user_y": pool.y[users]}


@plugins.GAMES.register("membership")
def _membership(
    game: Game, pool: Pool, secrets: np.ndarray, index: torch.Tensor, rng: np.random.Generator
) -> _Built:
    t, n, s = len(secrets), len(pool), torch.from_numpy(secrets)
    target = torch.from_numpy(rng.integers(0, n, t))
    index[:, 0, 0] = torch.where(s == 1, target, index[:, 0, 0])
    return pool.x, pool.y, index, {"target_x": pool.x[target], "target_y": pool.y[target]}
