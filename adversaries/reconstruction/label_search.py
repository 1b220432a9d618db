"""Which labels went into which local step: a screen of label arrangements for unrolled attacks.

An unrolled FedAvg attack (Inverting Gradients' FedAvg variant, Geiping et al., NeurIPS 2020,
arXiv:2003.14053, Sec. 5) must give every dummy sample a label, and with several local steps
the *order* matters: step ``i``'s mini-batch is seen by the parameters after steps
``0 .. i-1``. The last layer's update gives the label multiset (the bias identity of
Wainakh et al., PoPETs 2022, :func:`~adversaries.reconstruction.label_counts.bias_counts`),
not the order. On the sigmoid LeNet at its default initialisation the simulated update
depends far more on the labels than on the inputs, so a wrong arrangement leaves the image
optimisation stuck in saturated noise (about 4 dB on 8×8 digits, 4 steps × 2 images), and
the right one reaches 20–35 dB.

The screen here scores a labelling ``y`` by the cosine between the observed update and the
update the plan produces on **fixed, data-free dummy inputs** (all zero in the normalised
space, i.e. the declared mean colour) with labels ``y``. It costs one first-order unrolled
pass per candidate, vectorised with ``torch.func.vmap``, and needs no ground truth:

1. **Multiset.** Counts ``c = N (p̄ - ∂L/∂b)`` from the last layer's bias of the
   gradient-like update, ``p̄`` the softmax of the global model on the dummies (the sign
   rule, :func:`~adversaries.reconstruction._common.infer_labels`, without a bias). The
   rounding and every multiset one sample away from it are ranked by the screen with the
   first-order plan (all ``N`` samples in one step); the best ``multisets`` are kept.
2. **Arrangements.** The distinct arrangements of each kept multiset
   (:func:`~adversaries.reconstruction.inverting_gradients.label_arrangements`: all of
   them for up to 8 labels, else a random sample) are scored with the real plan.
3. **Local search.** From the best, single-label changes and swaps between mini-batches are
   tried while one improves the score.

The evaluation count is capped by ``budget``. On 8×8 digits with ``lenet``, 4 steps × 2
images, the attack's labels were the client's, step by step, for all 16 clients of
``experiments/ig_fedavg_defaults.py`` (the bias counts alone were off by one label in 5 of 40
earlier cases, which the neighbour multisets repair); a screen on a model whose update
depends more on its inputs (ReLU nets) is less sharp, which is why the attack's restarts
also try the runner-up arrangements when they screen within a factor of the best.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adversaries.base import Observation
from adversaries.reconstruction._common import LocalPlan, infer_labels, last_linear, layer_grads
from adversaries.reconstruction.label_counts import bias_counts, counts_to_labels

log = logging.getLogger(__name__)


def update_cosines(
    simulate: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]],
    unit_target: Sequence[torch.Tensor],
    x: torch.Tensor,
    ys: torch.Tensor,
    *,
    chunk: int = 256,
    batched: bool = True,
) -> torch.Tensor:
    """Cosine between the unit target and ``simulate(x, y)`` for each row ``y`` of ``ys``.

    ``simulate`` must be written with ``torch.func`` (no in-place autograd) when
    ``batched``: rows are evaluated ``chunk`` at a time under ``torch.func.vmap``;
    otherwise one after another.
    """
    t = torch.cat([u.reshape(-1) for u in unit_target])

    def cos_of(y: torch.Tensor) -> torch.Tensor:
        u = simulate(x, y)
        f = torch.cat([g.reshape(-1) for g in u])
        cos: torch.Tensor = (f @ t) / f.norm().clamp_min(torch.finfo(f.dtype).tiny)
        return cos

    out = []
    for part in ys.split(chunk):
        if batched:
            out.append(torch.func.vmap(cos_of)(part).detach())
        else:
            out.append(torch.stack([cos_of(y).detach() for y in part]))
    return torch.cat(out) if out else torch.empty(0)


def count_estimate(
    obs: Observation, grads: Sequence[torch.Tensor], model: nn.Module, x: torch.Tensor, n: int
) -> torch.Tensor:
    """The label multiset (sorted int64, CPU) of ``n`` samples from the last layer's update.

    With a bias: ``c = N (p̄ - ∂L/∂b)`` (:func:`bias_counts`), ``p̄`` the mean softmax of
    ``model`` on the dummies ``x``. Without one: the sign rule (:func:`infer_labels`).
    """
    name, _ = last_linear(obs.model)
    g = layer_grads(obs, list(grads), name)
    if "bias" not in g:
        return torch.sort(infer_labels(obs, list(grads), n)).values
    with torch.no_grad():
        p = F.softmax(model(x).double(), dim=1).mean(0)
    counts, _ = bias_counts(g["bias"], p, n)
    return counts_to_labels(counts)


def neighbour_multisets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels`` (sorted) and every multiset one sample away from it (one label changed)."""
    base = torch.bincount(labels.cpu(), minlength=num_classes)
    found = {tuple(base.tolist())}
    for a in torch.nonzero(base).flatten().tolist():
        for k in range(num_classes):
            if k != a:
                c = base.clone()
                c[a] -= 1
                c[k] += 1
                found.add(tuple(c.tolist()))
    rows = [torch.repeat_interleave(torch.arange(num_classes), torch.tensor(c)) for c in found]
    rows.sort(key=lambda r: (r.tolist() != labels.tolist(), r.tolist()))
    return torch.stack(rows)


def local_moves(y: torch.Tensor, batch_size: int, num_classes: int) -> torch.Tensor:
    """Every single-label change of ``y`` and every swap of two labels in different mini-batches."""
    n = len(y)
    out = []
    for i in range(n):
        for k in range(num_classes):
            if k != int(y[i]):
                c = y.clone()
                c[i] = k
                out.append(c)
        for j in range(i + 1, n):
            if i // batch_size != j // batch_size and int(y[i]) != int(y[j]):
                c = y.clone()
                c[i], c[j] = y[j], y[i]
                out.append(c)
    return torch.stack(out)


def _arrangement_key(labels: Sequence[int], plan: LocalPlan) -> tuple[object, ...]:
    """Labels per mini-batch, ignoring the order inside a batch and the order of clients."""
    b, s = plan.batch_size, plan.local_steps
    if len(labels) != plan.samples:
        return tuple(labels)
    clients = [
        tuple(tuple(sorted(labels[(k * s + i) * b : (k * s + i + 1) * b])) for i in range(s))
        for k in range(plan.num_clients)
    ]
    return tuple(sorted(clients))


def label_arrangements(
    labels: torch.Tensor, plan: LocalPlan, count: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Up to ``count`` distinct ways to assign ``labels`` to the plan's mini-batches.

    With several local steps the order of the steps matters (the step-``i`` batch is seen
    by the parameters after steps ``0 .. i-1``) but the sign rule gives the label multiset
    only. Arrangements that differ only inside a mini-batch or by a permutation of clients
    are equivalent. The first arrangement is ``labels`` as given; the others are all the
    remaining distinct ones when at most ``count - 1`` exist (enumerated for up to 8
    labels), else distinct random permutations drawn from ``generator``.
    """
    first = [int(v) for v in labels.tolist()]
    seen = {_arrangement_key(first, plan)}
    out = [labels]
    if count <= 1 or plan.local_steps * plan.num_clients == 1:
        return out
    n = len(first)
    if n <= 8:
        rest = []
        for perm in itertools.permutations(range(n)):
            cand = [first[i] for i in perm]
            key = _arrangement_key(cand, plan)
            if key not in seen:
                seen.add(key)
                rest.append(cand)
        if len(rest) > count - 1:
            pick = torch.randperm(len(rest), generator=generator)[: count - 1].tolist()
            rest = [rest[i] for i in sorted(pick)]
        out += [torch.tensor(c, dtype=labels.dtype, device=labels.device) for c in rest]
        return out
    for _ in range(50 * count):
        if len(out) >= count:
            break
        cand = [first[i] for i in torch.randperm(n, generator=generator).tolist()]
        key = _arrangement_key(cand, plan)
        if key not in seen:
            seen.add(key)
            out.append(torch.tensor(cand, dtype=labels.dtype, device=labels.device))
    return out


def ranked_labellings(
    obs: Observation,
    grads: Sequence[torch.Tensor],
    model: nn.Module,
    simulate: Callable[[torch.Tensor, torch.Tensor, LocalPlan], list[torch.Tensor]],
    unit_target: Sequence[torch.Tensor],
    plan: LocalPlan,
    generator: torch.Generator,
    *,
    budget: int,
    multisets: int = 5,
    batched: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Distinct labellings of the plan's ``plan.samples`` slots, best screen first, and their
    screen losses ``1 - cos`` (the three stages of the module docstring).

    Parameters
    ----------
    obs, grads:
        The observation and its gradient-like update (for the multiset).
    model:
        The attack's model (train mode), used for ``p̄`` on the dummies.
    simulate:
        ``simulate(x, y, plan)``: the gradient-like update of ``plan`` on ``(x, y)``
        (:func:`~adversaries.reconstruction.inverting_gradients.trajectory_gradient` in
        ``torch.func`` form when ``batched``).
    unit_target:
        The observed update, normalised to unit norm over all tensors.
    plan:
        The local training to simulate; ``plan.samples`` labels are returned per row.
    generator:
        Draws the arrangements sampled when there are too many to enumerate.
    budget:
        The most unrolled evaluations to spend (the local search stops there).
    multisets:
        How many label multisets of stage 1 get their arrangements scored.
    batched:
        Evaluate candidates under ``torch.func.vmap`` (else one by one, e.g. BatchNorm).
    """
    n = plan.samples
    device = unit_target[0].device
    x = torch.zeros((n, *obs.input_shape), device=device)
    spent = 0

    def score(ys: torch.Tensor, p: LocalPlan) -> torch.Tensor:
        nonlocal spent
        spent += len(ys)
        sim = lambda x_, y_: simulate(x_, y_, p)
        return update_cosines(sim, unit_target, x, ys.to(device), batched=batched).cpu()

    first = count_estimate(obs, grads, model, x, n)
    cands = neighbour_multisets(first, obs.num_classes)
    flat = dataclasses.replace(plan, batch_size=n, local_steps=1, num_clients=1)
    keep = torch.argsort(score(cands, flat), descending=True)[:multisets]
    cap = max(1, (budget - spent) // (2 * len(keep)))
    rows: list[torch.Tensor] = []
    for i in keep.tolist():
        rows += label_arrangements(cands[i], plan, cap, generator)
    table = torch.stack(rows)
    scores = score(table, plan)
    best, best_score = table[int(scores.argmax())], float(scores.max())
    for _ in range(n):  # greedy ascent
        moves = local_moves(best, plan.batch_size, obs.num_classes)
        if spent + len(moves) > budget:
            break
        move_scores = score(moves, plan)
        j = int(move_scores.argmax())
        if float(move_scores[j]) <= best_score:
            break
        best, best_score = moves[j], float(move_scores[j])
        table, scores = torch.cat([table, best[None]]), torch.cat([scores, move_scores[j : j + 1]])
    out: list[torch.Tensor] = []
    losses: list[float] = []
    seen: set[tuple[object, ...]] = set()
    for i in torch.argsort(scores, descending=True).tolist():
        key = _arrangement_key([int(v) for v in table[i].tolist()], plan)
        if key not in seen:
            seen.add(key)
            out.append(table[i])
            losses.append(1.0 - float(scores[i]))
    log.debug(
        "label screen: %d evaluations, first multiset %s, best %s (loss %.3g)",
        spent,
        first.tolist(),
        out[0].tolist(),
        losses[0],
    )
    return out, torch.tensor(losses, dtype=torch.float64)
