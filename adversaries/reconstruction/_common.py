"""Helpers shared by the reconstruction attacks (pure torch, no Flower or Ray).

Everything here sees only an :class:`~adversaries.base.Observation`: the model
structure, the global parameters and the update. Nothing reads ground truth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adversaries.base import Observation
from fl_privsim.core.errors import ThreatModelError

log = logging.getLogger(__name__)

#: Parameter-free modules that pass the input through unchanged (up to a reshape).
PASS_THROUGH = (nn.Flatten, nn.Identity)


def num_targets(obs: Observation) -> int:
    """How many distinct training samples can have shaped ``obs``.

    A client touches at most ``batch_size * local_steps`` samples per round and never more
    than it holds; an aggregate adds up ``num_clients`` such clients. The count is
    ``min(num_examples, batch_size * max(local_steps, 1) * num_clients)``, at least 1.
    For one client and one FedSGD step this is the batch size.
    """
    touched = obs.batch_size * max(obs.local_steps, 1) * max(obs.num_clients, 1)
    return max(1, min(obs.num_examples, touched))


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


def first_layer(model: nn.Module) -> tuple[str, nn.Module, list[str]]:
    """The first leaf module (registration order) that owns trainable parameters.

    Returns its name, the module, and the type names of the parameter-free leaf modules
    registered before it that are not plain pass-throughs (``Flatten``/``Identity``); a
    non-empty list means the input may not reach the layer unchanged. Registration order
    is taken as execution order, which holds for the project's model zoo.
    """
    before: list[str] = []
    for name, mod in leaf_modules(model):
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            return name, mod, before
        if not isinstance(mod, PASS_THROUGH):
            before.append(type(mod).__name__)
    raise ThreatModelError("the model has no trainable layer")


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the last ``nn.Linear`` (registration order): the classifier."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ThreatModelError(
            "label inference requires a final nn.Linear classifier layer; none found"
        )
    return found[-1]


def layer_grads(
    obs: Observation, grads: list[torch.Tensor], layer_name: str
) -> dict[str, torch.Tensor]:
    """The gradient-like tensors of one layer's parameters, keyed ``"weight"``/``"bias"``."""
    names = obs.param_names()
    prefix = f"{layer_name}." if layer_name else ""
    out = {}
    for pname in ("weight", "bias"):
        full = prefix + pname
        if full in names:
            out[pname] = grads[names.index(full)]
    return out


def label_scores(obs: Observation, grads: list[torch.Tensor]) -> torch.Tensor:
    """Per-class score of the last linear layer; the classes present score negative.

    Uses the bias gradient when the layer has a bias (``∂L/∂b_k = mean_n (p_nk - y_nk)``),
    else the row sums of the weight gradient (iDLG, Zhao et al. 2020): with non-negative
    activations into the layer, both are negative exactly for the classes in the batch
    (single sample) or dominated by them (batches).
    """
    name, _ = last_linear(obs.model)
    g = layer_grads(obs, grads, name)
    if "bias" in g:
        return g["bias"].detach().double().flatten()
    return g["weight"].detach().double().sum(dim=1)


def infer_labels(obs: Observation, grads: list[torch.Tensor], n: int) -> torch.Tensor:
    """The ``n`` most negative classes by :func:`label_scores` (int64, on CPU).

    For one sample this is the iDLG rule ``argmin_k``. For ``n > 1`` it is a heuristic: if
    fewer than ``n`` classes score negative, the negative ones (most negative first) are
    repeated cyclically; with none negative the argmin is used.
    """
    scores = label_scores(obs, grads).cpu()
    order = torch.argsort(scores)
    negative = order[scores[order] < 0]
    if negative.numel() == 0:
        negative = order[:1]
    if negative.numel() >= n:
        return negative[:n].to(torch.int64)
    reps = -(-n // negative.numel())
    return negative.repeat(reps)[:n].to(torch.int64)


def trainable_params(model: nn.Module) -> list[torch.nn.Parameter]:
    """Trainable parameters in ``named_parameters()`` order (as :meth:`Observation.gradient`)."""
    return [p for p in model.parameters() if p.requires_grad]


def model_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool
) -> list[torch.Tensor]:
    """Mean cross-entropy gradient of ``model`` at ``(x, y)``, as a client computes it."""
    loss = F.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, trainable_params(model), create_graph=create_graph))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of a (N, C, H, W) batch: ``mean|∂x| + mean|∂y|`` (Geiping et al. 2020)."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean() if x.shape[3] > 1 else x.new_zeros(())
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() if x.shape[2] > 1 else x.new_zeros(())
    return dx + dy


#: Dummy-input initialisations accepted by :func:`random_init`.
INITS = ("normal", "uniform")


def random_init(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    device: torch.device,
    kind: str = "normal",
) -> torch.Tensor:
    """A dummy input drawn on CPU from ``generator`` and moved to ``device``.

    ``normal``: N(0, 1) (DLG's and Inverting Gradients' reference code); ``uniform``:
    U(0, 1) (the uniform seed of Wei et al.'s CPL attack).
    """
    if kind == "normal":
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
    elif kind == "uniform":
        x = torch.rand(shape, generator=generator, dtype=torch.float32)
    else:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {kind!r}")
    return x.to(device)


def target_gradient(obs: Observation, device: torch.device) -> list[torch.Tensor]:
    """``obs.gradient()`` detached, as float32 tensors on ``device``."""
    return [g.detach().to(device=device, dtype=torch.float32) for g in obs.gradient()]


def group_candidates(cands: torch.Tensor, tol: float) -> list[list[int]]:
    """Greedy grouping of candidate rows by relative L2 distance below ``tol``.

    Candidates are visited in the given order; each unassigned one opens a group holding every
    unassigned candidate within ``‖c_i - c_j‖ / max(‖c_i‖, ‖c_j‖) < tol`` of it.
    """
    if cands.shape[0] == 0:
        return []
    norms = cands.norm(dim=1)
    dist = torch.cdist(cands, cands, compute_mode="donot_use_mm_for_euclid_dist")
    scale = torch.maximum(norms[:, None], norms[None, :]).clamp_min(torch.finfo(cands.dtype).tiny)
    close = (dist / scale < tol).cpu()
    free = torch.ones(cands.shape[0], dtype=torch.bool)
    groups: list[list[int]] = []
    for i in range(cands.shape[0]):
        if not free[i]:
            continue
        members = torch.nonzero(close[i] & free).flatten().tolist()
        if i not in members:
            members = [i, *members]
        free[members] = False
        groups.append(sorted(members))
    return groups


@dataclass(frozen=True)
class LocalPlan:
    """How the simulated clients train: what the server knows of the local update.

    ``num_clients`` clients each take ``local_steps`` plain SGD steps of size ``lr`` from
    the global parameters, step ``i`` on its own mini-batch of ``batch_size`` dummy
    samples (one fresh batch per step, as :func:`clients.local_update.local_update`).
    FedSGD is the special case ``local_steps = num_clients = 1`` with the whole batch.
    """

    batch_size: int
    local_steps: int
    lr: float
    num_clients: int = 1

    @property
    def samples(self) -> int:
        """Dummy-sample slots the plan consumes (``num_clients * local_steps * batch_size``)."""
        return self.num_clients * self.local_steps * self.batch_size
