"""The release mechanism M(θ, B) = T(ḡ) of the inference games, computed as a client would.

Li et al. (arXiv:2408.16913, CCS 2024) release the mean gradient of the aggregate B (one
client's batch, or K clients averaged) through a defense T. Here the release is the real
client update of :func:`clients.local_update.local_update` (FedSGD gradient or FedAvg delta)
with the configured ``[[defenses]]``, each client defending its own update, and the K client
updates averaged (equal batch sizes, so equal weights).

Two paths compute it:

- **exact**: one ``local_update`` call per client per trial (any protocol, any defense,
  including the per-sample ``dp_sgd``/``dynamic_dp``; FedAvg with several local steps takes
  ``local_steps`` SGD steps on the client's batch). A Python loop: slow but literal.
- **fast** (FedSGD, no per-sample or sampler defense, no BatchNorm): the mean gradient of a
  batch is the mean of its per-sample gradients, so the per-sample gradients of a whole bank
  of records are computed once with ``torch.func`` (``vmap(grad)``, the function DP-SGD uses)
  and each trial's client gradient is a sparse mean over its index set. The step/update
  defenses of the stack (the same objects ``local_update`` calls, with the same per-trial
  generator) then run per client and trial, and clients are averaged. A unit test checks that
  both paths give the same update.

An update is returned flattened over the trainable parameters in ``named_parameters`` order.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clients.defenses.base import BatchSamplerDefense, Defense, PerSampleDefense, TrainingInfo
from clients.defenses.per_sample import per_sample_gradients
from clients.local_update import local_update
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.seeding import seed_int

logger = logging.getLogger(__name__)

__all__ = ["Release", "flat_per_sample_gradients", "param_layout"]


def param_layout(model: nn.Module) -> list[tuple[str, torch.Size, int, int]]:
    """``(name, shape, start, end)`` of each trainable parameter in the flat update."""
    out, start = [], 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            out.append((n, p.shape, start, start + p.numel()))
            start += p.numel()
    return out


def flat_per_sample_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample cross-entropy gradients of every trainable parameter, flattened: ``[n, P]``.

    ``device`` (e.g. ``"cuda"``): compute there, on a copy of ``model``, a chunk of records at
    a time; the result is on ``x``'s device either way."""
    names = [n for n, _, _, _ in param_layout(model)]
    home = x.device
    if device is not None and torch.device(device) != model_device(model):
        model = copy.deepcopy(model).to(device)
    where = model_device(model)
    rows = []
    for i in range(0, int(y.shape[0]), chunk):
        xs, ys = x[i : i + chunk].to(where), y[i : i + chunk].to(where)
        _, g = per_sample_gradients(model, names, xs, ys)
        rows.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1).to(home))
    return (
        torch.cat(rows)
        if rows
        else torch.zeros(0, sum(e - s for _, _, s, e in param_layout(model)))
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@dataclass
class Release:
    """The release mechanism of one game: protocol, defenses and the global model θ.

    ``defenses`` are built by :func:`clients.defenses.build_defenses`; ``seed`` and ``stream``
    derive each client's defense generator as ``(seed, "defense", stream, trial, client)``.
    """

    model: nn.Module
    protocol: str = "fedsgd"
    lr: float = 0.1
    local_steps: int = 1
    defenses: Sequence[Defense] = ()
    seed: int = 0
    force_exact: bool = False
    #: Where the fast path computes the per-sample gradients (the bulk of a game's work);
    #: the defenses, their generators and the exact path stay on the CPU.
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.protocol not in ("fedsgd", "fedavg"):
            raise ConfigError(
                f"game.protocol: {self.protocol!r} is not allowed; allowed: fedsgd, fedavg"
            )
        if any(
            isinstance(d, BatchSamplerDefense) or getattr(d, "poisson", False)
            for d in self.defenses
        ):
            raise ConfigError(
                "defenses: a game builds its own batches; sampler defenses (identical_labels, "
                "dp_sgd with poisson = true) are not supported in games"
            )
        self.layout = param_layout(self.model)

    @property
    def fast(self) -> bool:
        """Whether the vectorised path applies (see the module docstring)."""
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        return (
            not self.force_exact
            and self.protocol == "fedsgd"
            and not has_bn
            and not any(isinstance(d, PerSampleDefense) for d in self.defenses)
        )

    def _generator(self, stream: int, trial: int, client: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(seed_int(self.seed, "defense", stream, trial, client))
        return g

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat[s:e].reshape(shape) for n, shape, s, e in self.layout}

    def _flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n, _, _, _ in self.layout])

    def updates(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        *,
        stream: int = 0,
        grads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Released updates of T trials, ``[T, P]``.

        ``x``/``y`` is the bank of records; ``index`` ``[T, K, B]`` picks client k's batch of
        trial t. ``grads`` (``[n, P]``, :func:`flat_per_sample_gradients` of the bank) is
        reused when given (fast path only).
        """
        if index.dim() != 3:
            raise ValueError(
                f"index must be [trials, clients, batch], got shape {tuple(index.shape)}"
            )
        if self.fast:
            if grads is None:
                grads = flat_per_sample_gradients(self.model, x, y, device=self.device)
            return self._fast(grads, index, stream)
        return self._exact(x, y, index, stream)

    def _fast(self, grads: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
        t, k, b = index.shape
        rows = torch.arange(t * k).repeat_interleave(b)
        w = torch.sparse_coo_tensor(
            torch.stack([rows, index.reshape(-1)]),
            torch.full((t * k * b,), 1.0 / b),
            (t * k, grads.shape[0]),
            check_invariants=False,
        ).coalesce()
        client = torch.sparse.mm(w, grads)  # [T*K, P]: each client's mean gradient
        if self.defenses:
            info = TrainingInfo(self.protocol, float(self.lr), 1, b)
            stages = [d for d in self.defenses if d.stage in ("step", "update")]
            out = torch.empty_like(client)
            for r in range(t * k):
                g = self._unflatten(client[r])
                gen = self._generator(stream, r // k, r % k)
                for d in stages:
                    d.begin(self.model, info)
                for d in stages:
                    fn = d.transform_step if d.stage == "step" else d.transform_update
                    g = fn(g, generator=gen)
                out[r] = self._flatten(g)
            client = out
        mean: torch.Tensor = client.reshape(t, k, -1).mean(dim=1)
        return mean

    def _exact(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, stream: int
    ) -> torch.Tensor:
        t, k, _ = index.shape
        model = copy.deepcopy(self.model)
        state = copy.deepcopy(model.state_dict())
        out: list[torch.Tensor] = []
        for i in range(t):
            acc: torch.Tensor | None = None
            for c in range(k):
                model.load_state_dict(state)
                idx = index[i, c]
                batches = [(x[idx], y[idx])] * (
                    1 if self.protocol == "fedsgd" else self.local_steps
                )
                res = local_update(
                    model,
                    batches,
                    protocol=self.protocol,
                    lr=self.lr,
                    defenses=self.defenses,
                    generator=self._generator(stream, i, c) if self.defenses else None,
                )
                flat = self._flatten(res.update)
                acc = flat if acc is None else acc + flat
            assert acc is not None  # k >= 1 clients
            out.append(acc / k)
        model.load_state_dict(state)
        return torch.stack(out)
