"""Defense registry, stacking rules, plugins by entry point, purity, and the wiring into
``local_update`` and the batch draw."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from defense_helpers import write_plugin_dist_info
from torch import nn

from clients.defenses import PerSampleDefense, TensorTransform, build_defenses
from clients.defenses.mixing import IdenticalLabels
from clients.local_update import local_update
from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import ConfigError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
BUILTINS = [
    "adversarial_perturbation",
    "dp_sgd",
    "dynamic_dp",
    "identical_labels",
    "model_inspection",
    "noise",
    "pruning",
    "quantization",
    "signsgd",
    "soteria",
    "vib",
]


def _stack(*entries: tuple[str, dict]) -> list[dict]:
    return [{"name": n, "params": p} for n, p in entries]


P, S, Q, N = (
    ("pruning", {"ratio": 0.5}),
    ("signsgd", {}),
    ("quantization", {}),
    ("noise", {"scale": 0.1}),
)


@pytest.mark.parametrize(
    ("stack", "message"),
    [
        (
            [S, P],
            "defenses[1] (pruning) after defenses[0] (signsgd): after signsgd only quantization may follow",
        ),
        ([S, N], "after signsgd only quantization may follow"),
        ([S, S], "at most one signsgd per 'update' stage"),
        (
            [Q, P],
            "defenses[1] (pruning) after defenses[0] (quantization): quantization must be the last",
        ),
        ([Q, Q], "at most one quantization per 'update' stage"),
        ([P, ("identical_labels", {})], "a 'sampler' defense runs before a 'update' one"),
        (
            [
                ("pruning", {"ratio": 0.5, "apply_to": "update"}),
                ("noise", {"scale": 1.0, "apply_to": "step"}),
            ],
            "a 'step' defense runs before a 'update' one",
        ),
        ([("identical_labels", {}), ("identical_labels", {})], "at most one identical_labels"),
    ],
)
def test_meaningless_stacks_are_rejected(stack, message) -> None:
    with pytest.raises(ConfigError) as err:
        build_defenses(_stack(*stack))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "stack",
    [
        [P, N, S, Q],
        [P, Q],
        [N, P],
        [("identical_labels", {}), P, N],
        [("signsgd", {"apply_to": "step"}), ("pruning", {"ratio": 0.5})],
        [("identical_labels", {}), ("dynamic_dp", {"sigma": 1.0}), P],
        [("dp_sgd", {}), Q],
    ],
)
def test_sensible_stacks_build(stack) -> None:
    assert [d.name for d in build_defenses(_stack(*stack))] == [n for n, _ in stack]


def test_unknown_name_lists_the_registered_defenses() -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.loads('[[defenses]]\nname = "prunning"\nparams = { ratio = 0.5 }\n')
    assert str(err.value) == (
        f"defenses[0]: unknown defense 'prunning' (did you mean 'pruning'?); "
        f"known: {', '.join(BUILTINS)}"
    )


def test_config_round_trips_defenses_and_names_the_bad_entry() -> None:
    text = (
        '[[defenses]]\nname = "pruning"\nparams = { ratio = 0.9 }\n[[defenses]]\nname = "noise"\n'
        'params = { scale = 0.01, distribution = "laplace" }\n'
    )
    cfg = config_mod.loads(text)
    assert [(d.name, d.params) for d in cfg.defenses] == [
        ("pruning", {"ratio": 0.9}),
        ("noise", {"scale": 0.01, "distribution": "laplace"}),
    ]
    assert config_mod.loads(config_mod.to_toml(cfg)) == cfg
    assert config_mod.Config().defenses == []
    with pytest.raises(
        ConfigError, match=r"^defenses\[1\]: defense 'noise': scale must be a finite number > 0"
    ):
        config_mod.loads(text.replace("0.01", "0"))


# ----------------------------------------------------------------------- local_update


def _model_and_batches(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [
        (torch.randn(4, 1, 3, 4, generator=gen), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(3)
    ]
    return model, batches


def _reference(model: nn.Module, batches, protocol: str, lr: float) -> dict[str, torch.Tensor]:
    """The undefended update written out by hand."""
    params = dict(model.named_parameters())
    if protocol == "fedsgd":
        x, y = batches[0]
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()))
        return {n: g for n, g in zip(params, grads, strict=True)}
    before = {n: p.detach().clone() for n, p in params.items()}
    for x, y in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads, strict=True):
                p.sub_(lr * g)
    return {n: p.detach() - before[n] for n, p in params.items()}


class _Identity(TensorTransform):
    def transform(self, tensors, *, generator):
        return dict(tensors)


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_no_defense_and_identity_defenses_leave_the_update_bit_identical(protocol) -> None:
    batches = _model_and_batches()[1][: 1 if protocol == "fedsgd" else 3]
    model, _ = _model_and_batches()
    expected = _reference(model, batches, protocol, 0.1)
    for defenses in ([], [_Identity(apply_to="step"), _Identity()]):
        model, _ = _model_and_batches()
        got = local_update(
            model,
            batches,
            protocol=protocol,
            lr=0.1,
            defenses=defenses,
            generator=torch.Generator().manual_seed(0),
        )
        assert got.update.keys() == expected.keys()
        assert all(torch.equal(got.update[k], expected[k]) for k in expected)
        assert got.metrics == {}


class _MeanPerSample(PerSampleDefense):
    """Per-sample hook with no clipping or noise: the mean must be the batch gradient."""

    def reduce_per_sample(self, grads, *, generator):
        return {n: g.mean(0) for n, g in grads.items()}


def test_per_sample_hook_mean_equals_the_batch_gradient() -> None:
    model, batches = _model_and_batches()
    expected = _reference(model, batches[:1], "fedsgd", 0.1)
    got = local_update(
        model,
        batches[:1],
        protocol="fedsgd",
        lr=0.1,
        defenses=[_MeanPerSample()],
        generator=torch.Generator(),
    )
    assert all(torch.allclose(got.update[k], expected[k], atol=1e-6) for k in expected)


def test_defended_update_is_reproducible_and_reports_metrics() -> None:
    stack = build_defenses(
        _stack(("pruning", {"ratio": 0.75, "apply_to": "step"}), ("noise", {"scale": 0.01}))
    )
    runs = []
    for _ in range(2):
        model, batches = _model_and_batches()
        runs.append(
            local_update(
                model,
                batches,
                protocol="fedavg",
                lr=0.1,
                defenses=stack,
                generator=torch.Generator().manual_seed(3),
            )
        )
    assert all(torch.equal(runs[0].update[k], runs[1].update[k]) for k in runs[0].update)
    assert runs[0].metrics["defense0.pruning.kept_fraction"] == pytest.approx(0.25, abs=0.01)
    assert runs[0].metrics["defense1.noise.noise_to_signal"] > 0
    with pytest.raises(ValueError, match="defenses need a generator"):
        local_update(
            *_model_and_batches()[:1], batches[:1], protocol="fedsgd", lr=0.1, defenses=stack
        )


# ----------------------------------------------------------------------- identical labels


def test_identical_labels_draws_one_class_per_batch_reproducibly() -> None:
    labels = np.array([0] * 6 + [1] * 9 + [2] * 2)
    part = np.arange(100, 100 + len(labels))
    sampler = IdenticalLabels()

    def draw(seed: int) -> list[np.ndarray]:
        return sampler.sample_batches(
            part,
            labels,
            batch_size=4,
            num_batches=20,
            generator=torch.Generator().manual_seed(seed),
        )

    batches = draw(5)
    for b in batches:
        assert len(b) == 4 and len(set(b.tolist())) == 4 and set(b.tolist()) <= set(part.tolist())
        assert len({int(labels[i - 100]) for i in b}) == 1  # class 2 (2 examples) is never chosen
    assert {int(labels[b[0] - 100]) for b in batches} == {0, 1}
    assert all(np.array_equal(a, b) for a, b in zip(batches, draw(5), strict=True))
    small = sampler.sample_batches(
        part[-4:], labels[-4:], batch_size=4, num_batches=1, generator=torch.Generator()
    )[0]
    assert sorted(small.tolist()) == part[-4:].tolist()  # no class has 4: the largest, filled up


def test_identical_labels_reaches_the_client_and_the_scorer_batches() -> None:
    from fl_privsim.engine.federated_data import client_batch_indices, federated_data

    cfg = config_mod.load(
        None, ["federation.num_clients=2", "federation.clients_per_round=2", "client.batch_size=5"]
    )
    cfg_mix = config_mod.from_dict(
        {**config_mod.to_dict(cfg), "defenses": _stack(("identical_labels", {}))}
    )
    fed = federated_data(cfg_mix)
    batch = client_batch_indices(cfg_mix, fed, 1, 0)[0]
    assert len(set(fed.data.labels("train", batch).tolist())) == 1
    assert np.array_equal(batch, client_batch_indices(cfg_mix, fed, 1, 0)[0])


# ----------------------------------------------------------------------- purity and plugins


def _run(script: str, extra_path: list[Path]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [ROOT, *extra_path]))}
    return subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_entry_point_plugin_is_found_validated_and_applied(tmp_path) -> None:
    src = write_plugin_dist_info(tmp_path)
    script = """
import torch
from fl_privsim.core import config
from clients.defenses import DEFENSES, build_defenses
from clients.local_update import local_update
from fl_privsim.core.errors import ConfigError
assert "clip_update" in DEFENSES.names() and "pruning" in DEFENSES.names() and "broken" not in DEFENSES.names()
cfg = config.loads('[[defenses]]\\nname = "clip_update"\\nparams = { max_norm = 0.001 }\\n')
res = local_update(torch.nn.Linear(3, 2), [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], protocol="fedsgd",
                   lr=0.1, defenses=build_defenses(cfg.defenses), generator=torch.Generator())
norm = sum(float(t.pow(2).sum()) for t in res.update.values()) ** 0.5
assert abs(norm - 0.001) < 1e-9, norm
assert res.metrics["defense0.clip_update.clip_factor"] < 1
try:
    config.loads('[[defenses]]\\nname = "clip_update"\\nparams = { max_norm = -1 }\\n')
except ConfigError as exc:
    print(exc)
"""
    out = _run(script, [tmp_path, src])
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.strip()
        == "defenses[0]: defense 'clip_update': max_norm must be a finite number > 0, got -1"
    )
    assert "could not load defense plugin 'broken'" in out.stderr
