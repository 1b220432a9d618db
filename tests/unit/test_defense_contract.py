"""One table of cases that every registered defense must pass (the defenses' counterpart of
tests/unit/test_attack_contract.py).

For each defense, through the hooks it implements and through
:func:`clients.local_update.local_update` with the defense stacked alone: shapes and dtypes of
every tensor are those of the undefended computation; the update is a function of the defense
generator's seed alone (bit-identical under the same seed whatever torch's global RNG holds,
different under another seed exactly for the rows marked ``random``, which are the defenses
that draw from the generator); the state kept across rounds survives the JSON round trip the
ClientApp makes (``clients.client_app.save_defense_state``) and is empty for stateless
defenses; an unknown parameter is one line naming it; and every defense builds where Flower
and Ray cannot be imported.

Adding a defense means adding a row to :data:`CASES` (``test_every_registered_defense_has_a_row``
fails until it has one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from clients.defenses import (
    DEFENSES,
    BatchSamplerDefense,
    Defense,
    PerSampleDefense,
    TrainingInfo,
    batch_sampler,
    draw_batches,
)
from clients.defenses.per_sample import per_sample_gradients
from clients.defenses.vib import VIBHead
from clients.local_update import LocalUpdate, local_update
from fl_privsim.core.data import sample_batch
from fl_privsim.core.errors import ConfigError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SHAPE, CLASSES, EXAMPLES, BATCH, STEPS, LR = (1, 8, 8), 10, 24, 4, 2, 0.1


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def _vib_mlp() -> nn.Module:
    """The same MLP with a VIB head (what ``mlp_vib`` is, at a tiny width)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), VIBHead(16, CLASSES, z_dim=4))


@dataclass(frozen=True)
class Case:
    """One defense's row.

    params:
        Small valid constructor parameters (JSON-able: they also travel to a subprocess).
    random:
        The defense draws from its generator, so another seed gives another update (checked
        both ways: a row marked deterministic must leave the generator untouched).
    stateful:
        It keeps state across rounds (``state_dict()`` non-empty after an update).
    model:
        The tiny model it runs on (1x8x8 inputs, 10 classes).
    """

    params: dict[str, Any]
    random: bool
    stateful: bool = False
    model: Callable[[], nn.Module] = _mlp


CASES: dict[str, Case] = {
    "adversarial_perturbation": Case({"budget": 0.5, "steps": 3}, random=True),
    "dp_sgd": Case({"max_grad_norm": 1.0, "noise_multiplier": 1.0}, random=True, stateful=True),
    "dynamic_dp": Case(
        {"schedule": "linear", "horizon": 10, "step_unit": "iteration", "clip_norm": 1.0},
        random=True,
        stateful=True,
    ),
    "identical_labels": Case({}, random=True),
    "model_inspection": Case({}, random=False),
    "noise": Case({"scale": 0.01}, random=True),
    "pruning": Case({"ratio": 0.5, "apply_to": "step"}, random=False),
    "quantization": Case({"bits": 4, "apply_to": "step"}, random=False),
    "signsgd": Case({"scale": "l1"}, random=False),
    "soteria": Case({"pruning_ratio": 0.5, "method": "exact"}, random=False),
    "vib": Case({"beta": 0.01}, random=True, model=_vib_mlp),
}

NAMES = sorted(CASES)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """24 examples of 3 classes (8 each, so a one-class batch of 4 exists)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(EXAMPLES, *SHAPE, generator=g), torch.arange(EXAMPLES) % 3


X, Y = _data()
PART = np.arange(EXAMPLES, dtype=np.int64)
#: The undefended batch draw (a fixed seed: only a sampler defense draws with the run's seed).
DEFAULT_BATCHES = [
    sample_batch(PART, BATCH, g)
    for g in [torch.Generator().manual_seed(1000)]
    for _ in range(STEPS)
]


def _create(name: str) -> Defense:
    return DEFENSES.create(name, **CASES[name].params)


def _model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name].model().to(dtype)


def _batch_indices(d: Defense | None, steps: int, gen: torch.Generator) -> list[np.ndarray]:
    sampler = batch_sampler([d]) if d is not None else None
    if sampler is None:
        return DEFAULT_BATCHES[:steps]
    return draw_batches(
        sampler, PART, Y.numpy(), batch_size=BATCH, num_batches=steps, generator=gen
    )


def _run(
    name: str,
    *,
    seed: int,
    protocol: str = "fedavg",
    defense: Defense | None = None,
    defended: bool = True,
    server_round: int = 1,
    global_seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[LocalUpdate, bool]:
    """The update of the defense stacked alone (or undefended, on the default batches) and
    whether the generator was drawn from. A sampler defense draws the batches (from the same
    generator); torch's global RNG is reseeded with ``global_seed`` just before the update."""
    d = (defense or _create(name)) if defended else None
    gen = torch.Generator().manual_seed(seed)
    start = gen.get_state()
    steps = 1 if protocol == "fedsgd" else STEPS
    batches = [(X[i].to(dtype), Y[i]) for i in _batch_indices(d, steps, gen)]
    model = _model(name, dtype)
    torch.manual_seed(global_seed)
    out = local_update(
        model,
        batches,
        protocol=protocol,
        lr=LR,
        defenses=[d] if d is not None else [],
        generator=gen,
        server_round=server_round,
        dataset_size=EXAMPLES,
        expected_batch_size=BATCH,
    )
    return out, not torch.equal(gen.get_state(), start)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _layout(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def _implements(d: Defense, hook: str) -> bool:
    base = {"reduce_per_sample": PerSampleDefense, "sample_batches": BatchSamplerDefense}
    own = getattr(type(d), hook, None)
    return own is not None and own is not getattr(base.get(hook, Defense), hook)


STAGE_HOOK = {
    "sampler": "sample_batches",
    "per_sample": "reduce_per_sample",
    "step": "transform_step",
    "update": "transform_update",
}


# ----------------------------------------------------------------------- the table itself


def _built_in(name: str) -> bool:
    """A defense of this package (a user's entry-point plugin is not this table's business)."""
    return DEFENSES.get(name).__module__.startswith("clients.defenses")


def test_every_registered_defense_has_a_row() -> None:
    registered = {n for n in DEFENSES.names() if _built_in(n)}
    assert set(CASES) == registered, (
        f"add a row to CASES in tests/unit/test_defense_contract.py for every registered "
        f"defense (no row: {sorted(registered - set(CASES))}; "
        f"not registered: {sorted(set(CASES) - registered)})"
    )


# ----------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", NAMES)
def test_hooks_keep_shapes_and_dtypes(name: str, dtype: torch.dtype) -> None:
    """Each hook the defense implements returns what the undefended computation has there."""
    d = _create(name)
    hooks = [h for h in STAGE_HOOK.values() if _implements(d, h)]
    assert STAGE_HOOK[d.stage] in hooks, f"{name}: stage {d.stage!r} but no {STAGE_HOOK[d.stage]}"
    model = _model(name, dtype)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    x, y = X[DEFAULT_BATCHES[0]].to(dtype), Y[DEFAULT_BATCHES[0]]
    gen = torch.Generator().manual_seed(3)
    d.begin(model, TrainingInfo("fedsgd", LR, 1, BATCH, 1, EXAMPLES, BATCH))
    grads = dict(
        zip(
            names,
            torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values())),
            strict=True,
        )
    )
    expected = _layout(grads)
    assert {n: (tuple(p.shape), p.dtype) for n, p in params.items()} == expected
    if "sample_batches" in hooks:
        assert isinstance(d, BatchSamplerDefense)
        raw = d.sample_batches(PART, Y.numpy(), batch_size=BATCH, num_batches=STEPS, generator=gen)
        assert [(b.shape, b.dtype) for b in map(np.asarray, raw)] == [
            (b.shape, b.dtype) for b in DEFAULT_BATCHES
        ]
    if "reduce_per_sample" in hooks:
        assert isinstance(d, PerSampleDefense)
        _, plain = per_sample_gradients(model, names, x, y)
        _, ps = d.per_sample_gradients(model, names, x, y)
        assert _layout(ps) == _layout(plain)
        assert _layout(d.reduce_per_sample(ps, generator=gen)) == expected
    if "transform_step" in hooks:
        if d.needs_batch:
            d.observe_batch(model, x, y, generator=gen)
        assert _layout(d.transform_step(dict(grads), generator=gen)) == expected
    if "transform_update" in hooks:
        assert _layout(d.transform_update(dict(grads), generator=gen)) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
@pytest.mark.parametrize("name", NAMES)
def test_local_update_keeps_shapes_and_dtypes(name: str, protocol: str, dtype: torch.dtype) -> None:
    defended, _ = _run(name, seed=1, protocol=protocol, dtype=dtype)
    plain, _ = _run(name, seed=1, protocol=protocol, dtype=dtype, defended=False)
    assert _layout(defended.update) == _layout(plain.update)
    assert defended.num_examples == plain.num_examples
    assert all(torch.isfinite(t).all() for t in defended.update.values())


# ----------------------------------------------------------------------- randomness


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_from_its_generator(name: str) -> None:
    """Same seed: bit-identical update and metrics whatever torch's global RNG holds. Another
    seed: another update exactly when the row is ``random``, which must be exactly when the
    defense draws from its generator."""
    first, drew = _run(name, seed=5, global_seed=1)
    again, _ = _run(name, seed=5, global_seed=2)
    assert _same(first.update, again.update)
    assert first.metrics == again.metrics
    assert drew == CASES[name].random, (
        f"{name}: the row says random={CASES[name].random}, but the defense "
        f"{'drew' if drew else 'did not draw'} from its generator"
    )
    other, _ = _run(name, seed=6, global_seed=1)
    assert _same(first.update, other.update) is not CASES[name].random


# ----------------------------------------------------------------------- state across rounds


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_or_is_empty(name: str) -> None:
    """Round 1, then round 2 twice: by the same instance, and by a fresh one given the JSON
    round trip of the state (what the ClientApp keeps in Context.state): same update, same
    accounting. A stateless defense's state is ``{}``."""
    case = CASES[name]
    d = _create(name)
    _run(name, seed=1, defense=d, server_round=1)
    state = d.state_dict()
    assert bool(state) == case.stateful, f"{name}: state after a round is {state!r}"
    restored = _create(name)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.state_dict() == state
    kept, _ = _run(name, seed=2, defense=d, server_round=2)
    again, _ = _run(name, seed=2, defense=restored, server_round=2)
    assert _same(kept.update, again.update)
    assert kept.metrics == again.metrics
    assert d.state_dict() == restored.state_dict()
    if case.stateful:  # the state matters: without it the accounting restarts
        fresh, _ = _run(name, seed=2, server_round=2)
        assert fresh.metrics != kept.metrics
    else:
        assert d.state_dict() == {}


# ----------------------------------------------------------------------- construction


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_one_line_naming_it(name: str) -> None:
    for params in ({"bogus": 1}, {**CASES[name].params, "bogus": 1}):
        with pytest.raises(ConfigError) as err:
            DEFENSES.create(name, **params)
        message = str(err.value)
        assert "\n" not in message
        assert "bogus" in message and repr(name) in message, message


def test_every_defense_builds_without_flower_or_ray() -> None:
    script = """
import json, sys
sys.modules["flwr"] = None
sys.modules["ray"] = None
from clients.defenses import DEFENSES, build_defenses
from clients.local_update import local_update
rows = json.loads(sys.argv[1])
builtin = [n for n in DEFENSES.names() if DEFENSES.get(n).__module__.startswith("clients.defenses")]
assert sorted(rows) == builtin, builtin
for name, params in rows.items():
    (d,) = build_defenses([{"name": name, "params": params}])
    assert d.name == name
print("built", len(rows))
"""
    rows = json.dumps({n: c.params for n, c in CASES.items()})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script, rows],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"built {len(CASES)}"
