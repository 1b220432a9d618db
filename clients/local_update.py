"""The local update of one client, in pure torch (no Flower, no Ray).

Both the Flower ClientApp and code outside a federation (tests, inference games) call
:func:`local_update`, so an update produced anywhere is exactly what a Flower client
would send.

Protocols (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data"):

- **FedSGD**: the mean loss gradient of one batch, one tensor per trainable parameter
  (cross-entropy unless ``loss`` names another, :mod:`clients.defenses.losses`).
- **FedAvg**: ``local_steps`` plain SGD steps (learning rate ``lr``), one batch each;
  the update is weights after minus weights before.

In both, floating-point buffers (BatchNorm running statistics) are sent as their change.

Client defenses (:mod:`clients.defenses`) run inside: a per-sample defense (DP-SGD) replaces
each batch gradient, step transforms change each local gradient before its step, update
transforms change the final update of the trainable parameters before it is sent. With no
defense the computation is exactly the undefended one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from clients.defenses.base import Defense, PerSampleDefense, TrainingInfo
from clients.defenses.losses import loss_function


@dataclass
class LocalUpdate:
    """What one client sends back.

    Attributes
    ----------
    update:
        By ``state_dict`` name: gradient (FedSGD) or delta (FedAvg) of every trainable
        parameter, and the change of every floating-point buffer.
    num_examples:
        Examples the update was computed on (FedAvg: summed over local steps).
    loss:
        Mean training loss over the local batches, before each step.
    metrics:
        Metrics of the defenses, keyed ``defense<i>.<name>.<metric>`` (e.g.
        ``defense0.pruning.kept_fraction``); empty without defenses.
    """

    update: dict[str, torch.Tensor]
    num_examples: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def _float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}


def _checked(
    d: Defense, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``after`` when it has the names and shapes of ``before``; a clear error otherwise."""
    bad = [n for n in before if n not in after or after[n].shape != before[n].shape]
    if bad or len(after) != len(before):
        raise ValueError(
            f"defense {d.name or type(d).__name__} changed the names or shapes of the update "
            f"(first: {(bad or sorted(set(after) - set(before)))[0]!r})"
        )
    return after


def _per_sample_gradients(
    d: PerSampleDefense,
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``d.per_sample_gradients``; a defense that draws from torch's global RNG there
    (``uses_global_rng``, e.g. VIB's reparameterisation noise) gets it seeded from the
    defense generator inside a forked RNG state, so runs repeat and global state is untouched."""
    if not getattr(d, "uses_global_rng", False) or generator is None:
        return d.per_sample_gradients(model, names, x, y)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return d.per_sample_gradients(model, names, x, y)


def local_update(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    protocol: str,
    lr: float,
    defenses: Sequence[Defense] = (),
    generator: torch.Generator | None = None,
    server_round: int = 0,
    dataset_size: int = 0,
    expected_batch_size: int = 0,
    loss: str = "cross_entropy",
) -> LocalUpdate:
    """Compute one client's update on ``model`` (modified in place for FedAvg).

    Parameters
    ----------
    model:
        The global model, already on the right device and loaded with the global weights.
    batches:
        ``(inputs, labels)`` pairs on the model's device; FedSGD uses exactly one, FedAvg
        takes one SGD step per batch.
    protocol:
        ``"fedsgd"`` or ``"fedavg"``.
    lr:
        Local SGD learning rate (FedAvg).
    defenses:
        The client's defense stack, in order (see :func:`clients.defenses.build_defenses`);
        sampler defenses are ignored here (they chose ``batches`` already).
    generator:
        The CPU generator every defense draws its randomness from, in stack order; needed
        when ``defenses`` is not empty (seed it for reproducible runs).
    server_round:
        The round, passed to the defenses (0 = unknown).
    dataset_size, expected_batch_size:
        The client's partition size and configured batch size, passed to the defenses (DP
        accounting uses q = expected_batch_size / dataset_size); 0 = unknown.
    loss:
        The training loss (:data:`clients.defenses.losses.LOSSES`): ``"cross_entropy"``
        (default) or ``"mse"`` (Eloul et al.'s loss choice); per-sample defenses need
        cross-entropy.
    """
    if protocol not in ("fedsgd", "fedavg"):
        raise ValueError(f"protocol must be 'fedsgd' or 'fedavg', got {protocol!r}")
    if not batches:
        raise ValueError("local_update needs at least one batch")
    if protocol == "fedsgd" and len(batches) != 1:
        raise ValueError(f"fedsgd sends one batch's gradient, got {len(batches)} batches")
    defenses = tuple(defenses)
    loss_fn = loss_function(loss)
    if loss != "cross_entropy" and any(isinstance(d, PerSampleDefense) for d in defenses):
        raise ValueError(
            f"per-sample defenses compute cross-entropy per sample; loss {loss!r} is not supported"
        )
    if defenses and generator is None:
        raise ValueError("defenses need a generator (seed it from run seed, round and client)")
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in params]
    buffers_before = _float_buffers(model)
    losses: list[float] = []
    info = TrainingInfo(
        protocol,
        float(lr),
        len(batches),
        int(batches[0][1].shape[0]),
        int(server_round),
        int(dataset_size),
        int(expected_batch_size),
    )
    for d in defenses:
        d.begin(model, info)
    per_sample = [d for d in defenses if isinstance(d, PerSampleDefense)]
    step_defs = [d for d in defenses if d.stage == "step"]
    update_defs = [d for d in defenses if d.stage == "update"]

    def gradient(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if per_sample:
            value, ps = _per_sample_gradients(per_sample[0], model, names, x, y, generator)
            g = _checked(
                per_sample[0],
                dict(params),
                per_sample[0].reduce_per_sample(ps, generator=generator),
            )
        else:
            value = loss_fn(model(x), y)
            grads = torch.autograd.grad(value, [p for _, p in params])
            if not step_defs:
                return value, list(grads)
            g = dict(zip(names, grads, strict=True))
        for d in step_defs:
            if getattr(
                d, "needs_batch", False
            ):  # e.g. soteria: the batch itself, not only its gradient
                d.observe_batch(model, x, y, generator=generator)
            g = _checked(d, g, d.transform_step(g, generator=generator))
        return value, [g[n] for n in names]

    if protocol == "fedsgd":
        x, y = batches[0]
        value, grads = gradient(x, y)
        update = {n: g.detach().clone() for (n, _), g in zip(params, grads, strict=True)}
        losses.append(float(value.detach()))
    else:
        before = {n: p.detach().clone() for n, p in params}
        for x, y in batches:
            value, grads = gradient(x, y)
            with torch.no_grad():
                for (_, p), g in zip(params, grads, strict=True):
                    p.sub_(lr * g)
            losses.append(float(value.detach()))
        update = {n: (p.detach() - before[n]).clone() for n, p in params}

    for d in update_defs:
        out = _checked(d, update, d.transform_update(update, generator=generator))
        update = {n: t.detach() for n, t in out.items()}
    for n, b in model.named_buffers():
        if n in buffers_before:
            update[n] = (b.detach() - buffers_before[n]).clone()
    num_examples = int(sum(int(y.shape[0]) for _, y in batches))
    metrics = {
        f"defense{i}.{d.name or type(d).__name__}.{k}": v
        for i, d in enumerate(defenses)
        for k, v in d.metrics().items()
    }
    return LocalUpdate(
        update=update, num_examples=num_examples, loss=sum(losses) / len(losses), metrics=metrics
    )
