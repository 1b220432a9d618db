"""The curious-server inference attacks (adversaries.inference.federated) outside a federation:
leaky toys are detected, the attack never gets the secret, parameters are validated, and the
scorer side (fl_privsim.engine.inference_scoring) computes the secrets from the reproduced batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import adversaries  # noqa: F401  (registers the attacks)
from adversaries.base import ATTACKS, Observation
from adversaries.inference.federated import InferenceObservation, ServerKnowledge
from adversaries.inference.metrics import auc_score
from clients.local_update import local_update
from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import ConfigError, DataError, ThreatModelError
from fl_privsim.core.tabular import adult_attribute_column
from fl_privsim.engine.federated_data import client_batch_indices, federated_data
from fl_privsim.engine.inference_scoring import InferenceScorer, summarize


def _observation(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    knowledge: ServerKnowledge,
    *,
    round_: int = 1,
    client: int = 0,
) -> InferenceObservation:
    """A FedSGD observation of the batch (x, y): the real client update at ``model``."""
    import copy

    res = local_update(copy.deepcopy(model), [(x, y)], protocol="fedsgd", lr=0.1)
    obs = Observation(
        round=round_,
        client_id=client,
        protocol="fedsgd",
        model=model,
        global_params=model.state_dict(),
        update=res.update,
        batch_size=int(y.shape[0]),
        local_steps=1,
        lr=0.1,
        num_examples=int(y.shape[0]),
        input_shape=(1, 1, int(x.shape[-1])),
        num_classes=2,
        data_mean=(0.0,),
        data_std=(1.0,),
    )
    return InferenceObservation.of(obs, knowledge)


def _tabular(n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Adult-shaped synthetic rows: the two last columns are the binary sex and race."""
    x = torch.randn(n, d, generator=gen)
    x[:, d - 2 :] = (torch.rand(n, 2, generator=gen) < 0.5).float()
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=gen) > 0).long()
    return x, y


def test_attribute_leaky_toy_gives_high_auc():
    """Softmax regression, batch of one: the sex column of the weight gradient is zero iff a = 0."""
    gen = torch.Generator().manual_seed(0)
    d = 12
    col = adult_attribute_column(d, "sex")
    aux_x, aux_y = _tabular(400, d, gen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    attack = ATTACKS.create("attribute_inference", attribute="sex", shadow_trials=200)
    x, y = _tabular(40, d, gen)
    secrets, scores = [], []
    for i in range(40):
        masked = x[i : i + 1].clone()
        masked[:, col] = 0.0
        k = ServerKnowledge("adult", aux_x, aux_y, target_x=masked, target_y=y[i : i + 1])
        res = attack(_observation(model, x[i : i + 1], y[i : i + 1], k, client=i))
        secrets.append(int(x[i, col]))
        scores.append(res.score)
    assert 0 < sum(secrets) < 40
    assert auc_score(np.array(secrets), np.array(scores)) > 0.95
    assert res.metrics["shadow_auc"] > 0.95  # the classifier's own validation on its shadow trials


def _digits_fed():
    cfg = config_mod.load(
        None,
        [
            'attacks=[{name = "property_inference", params = {property = "class=0"}}]',
            'model.name="linear"',
            "client.batch_size=2",
            "federation.num_clients=4",
            "federation.clients_per_round=4",
        ],
    )
    return cfg, federated_data(cfg)


def test_property_leaky_toy_on_digits_and_constant_release_is_chance():
    cfg, fed = _digits_fed()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    attack = ATTACKS.create(
        "property_inference", property="class=0", shadow_trials=200, aux_size=300
    )
    scorer = InferenceScorer(cfg, fed)
    k = ServerKnowledge(**scorer.knowledge(attack.spec, 1, [0]))
    rng = np.random.default_rng(0)
    secrets, scores, constant = [], [], []
    for i in range(40):
        idx = rng.choice(len(fed.data), 2, replace=False)
        x, y = fed.tensors("train", idx)
        obs = _observation(model, x, y, k, client=i)
        secrets.append(int((y == 0).any()))
        scores.append(attack(obs).score)
        zero = {n: torch.zeros_like(v) for n, v in obs.update.items()}
        constant.append(attack(dataclasses.replace(obs, update=zero)).score)
    s = np.array(secrets)
    assert 0 < s.sum() < 40
    assert auc_score(s, np.array(scores)) > 0.9
    assert auc_score(s, np.array(constant)) == 0.5  # one release for every secret: chance exactly


def test_attack_sees_no_secret():
    """The attack's input has no secret field; a bare Observation is refused; the scorer hides
    the target's attribute and offers member and non-member targets in the same form."""
    names = {f.name for f in dataclasses.fields(InferenceObservation)} | {
        f.name for f in dataclasses.fields(ServerKnowledge)
    }
    assert not {"secret", "secrets", "truth", "label_secret", "is_member"} & names
    cfg, fed = _digits_fed()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = fed.tensors("train", np.array([0, 1]))
    bare = _observation(model, x, y, ServerKnowledge("digits", x, y)).__dict__.copy()
    bare.pop("knowledge")
    with pytest.raises(ThreatModelError, match="property_inference: requires .*ServerKnowledge"):
        ATTACKS.create("property_inference")(Observation(**bare))
    with pytest.raises(ThreatModelError, match="membership_inference: requires a target"):
        ATTACKS.create("membership_inference")(
            _observation(model, x, y, ServerKnowledge("digits", x, y))
        )
    scorer = InferenceScorer(cfg, fed)
    member = ATTACKS.create("membership_inference").spec
    seen = {}
    for r in range(1, 30):
        k = scorer.knowledge(member, r, [1])
        seen.setdefault(scorer.secret(member, r, [1]), []).append(k)
    assert set(seen) == {0, 1}
    assert {tuple(sorted(k)) for ks in seen.values() for k in ks} == {
        ("aux_x", "aux_y", "dataset", "target_x", "target_y")
    }
    for r in range(
        1, 30
    ):  # member targets are the batch's first record, non-members are outside it
        k = scorer.knowledge(member, r, [1])
        batch = client_batch_indices(cfg, fed, r, 1)[0]
        in_batch = any(
            torch.equal(k["target_x"][0], fed.tensors("train", np.array([i]))[0][0]) for i in batch
        )
        assert in_batch == bool(scorer.secret(member, r, [1]))


def test_property_secret_matches_the_client_batch():
    cfg, fed = _digits_fed()
    spec = ATTACKS.create("property_inference", property="class=3").spec
    scorer = InferenceScorer(cfg, fed)
    for r in range(1, 8):
        for c in range(4):
            idx = np.concatenate(client_batch_indices(cfg, fed, r, c))
            assert scorer.secret(spec, r, [c]) == int((fed.data.train_y[idx] == 3).any())
        agg = np.concatenate([np.concatenate(client_batch_indices(cfg, fed, r, c)) for c in (0, 2)])
        assert scorer.secret(spec, r, [0, 2]) == int((fed.data.train_y[agg] == 3).any())


def test_summarize_counts_trials():
    rows = [{"secret": float(i % 2), "score": 0.2 + 0.6 * (i % 2)} for i in range(10)] + [
        {"seconds": 1.0}
    ]
    out = summarize(rows, n_boot=50)
    assert out["trials"] == 10 and out["positives"] == 5
    assert out["auc"] == 1.0 and out["accuracy"] == 1.0 and out["advantage"] == 1.0
    assert len(out["auc_ci"]) == 2
    assert summarize([]) == {"trials": 0, "positives": 0}


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("property_inference", {"property": "colour"}, "class=K"),
        ("property_inference", {"property": "class=-1"}, "class=K"),
        ("attribute_inference", {"attribute": "age"}, "sex, race"),
        ("attribute_inference", {"dataset": "imagenet"}, "adult, digits"),
        ("membership_inference", {"attack_model": "svm"}, "mlp, random_forest"),
        ("membership_inference", {"features": "pixels"}, "auto, last, all, alignment"),
        ("membership_inference", {"shadow_trials": 3}, ">= 20"),
    ],
)
def test_bad_params_are_config_errors(name, params, match):
    with pytest.raises(ConfigError, match=match):
        ATTACKS.create(name, **params)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (['attacks=[{name = "attribute_inference"}]'], "data.name = 'adult'"),
        (
            ['attacks=[{name = "property_inference", params = {property = "sex"}}]'],
            "data.name = 'adult'",
        ),
        (
            ['attacks=[{name = "property_inference", params = {property = "class=12"}}]'],
            "classes 0..9",
        ),
        (
            ['attacks=[{name = "membership_inference", params = {dataset = "adult"}}]'],
            "does not match data.name",
        ),
        (
            ['data.name="adult"', 'data.root="/nowhere"', 'model.name="lenet"', "attacks=[]"],
            "mlp, linear",
        ),
    ],
)
def test_run_config_mismatch_is_config_error_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_mod.load(None, overrides)


def test_missing_adult_is_one_data_error_naming_the_folder(tmp_path):
    from fl_privsim.core.data import load_dataset

    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset("adult", root=tmp_path)


def test_adult_attribute_target_is_hidden_and_scored(shared_data):
    """On Adult: the attack gets the target with its sex column zeroed; the scorer's secret is
    the target's true sex, the first record of the client's batch."""
    root = shared_data / "adult"
    if not (root / "adult.data.gz").is_file():
        pytest.skip(f"needs {root}")
    cfg = config_mod.load(
        None,
        [
            'data.name="adult"',
            f'data.root="{root}"',
            'model.name="linear"',
            'attacks=[{name = "attribute_inference"}]',
            "federation.num_clients=3",
            "federation.clients_per_round=3",
            "client.batch_size=4",
        ],
    )
    fed = federated_data(cfg)
    assert fed.data.input_shape == (1, 1, 86) and fed.data.mean == (0.0,) and fed.data.std == (1.0,)
    scorer = InferenceScorer(cfg, fed)
    spec = ATTACKS.create("attribute_inference", attribute="sex").spec
    col = adult_attribute_column(86, "sex")
    truths = []
    for r in range(1, 15):
        k = scorer.knowledge(spec, r, [2])
        first = client_batch_indices(cfg, fed, r, 2)[0][0]
        row = fed.data.images("train", np.array([first])).reshape(1, -1)
        assert k["target_x"].shape == (1, 86) and float(k["target_x"][0, col]) == 0.0
        assert torch.equal(k["target_x"][0, :col], row[0, :col]) and int(k["target_y"][0]) == int(
            fed.data.train_y[first]
        )
        truths.append(scorer.secret(spec, r, [2]))
        assert truths[-1] == int(row[0, col])
        assert k["aux_x"].shape[1] == 86  # the server's pool: test-file rows
    assert set(truths) == {0, 1}


@pytest.mark.parametrize(
    "name", ["attribute_inference", "property_inference", "membership_inference"]
)
def test_contract_determinism_refusal_by_name_and_aggregates(name):
    """The attack-contract table's checks, for score-returning attacks: the same observation
    gives the same score (also from a fresh instance), a bare Observation is refused by name,
    and an aggregate of two clients is accepted, within the hang guard."""
    import time

    from fl_privsim.engine.offline import aggregate_observation

    gen = torch.Generator().manual_seed(3)
    d = 10
    aux_x, aux_y = _tabular(300, d, gen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    x, y = _tabular(4, d, gen)
    target = x[:1].clone()
    if name == "attribute_inference":
        target[:, adult_attribute_column(d, "sex")] = 0.0
    k = ServerKnowledge("adult", aux_x, aux_y, target_x=target, target_y=y[:1])
    params = {"property": "sex"} if name == "property_inference" else {}
    obs = _observation(model, x[:2], y[:2], k)
    t0 = time.perf_counter()
    first = ATTACKS.create(name, shadow_trials=60, **params)(obs)
    assert time.perf_counter() - t0 < 60.0
    assert first.inputs is None and first.labels is None and 0.0 <= first.score <= 1.0
    assert all(isinstance(v, float) for v in first.metrics.values())
    assert ATTACKS.create(name, shadow_trials=60, **params)(obs).score == first.score
    bare = Observation(**{f.name: getattr(obs, f.name) for f in dataclasses.fields(Observation)})
    with pytest.raises(ThreatModelError, match=f"{name}: requires"):
        ATTACKS.create(name, **params)(bare)
    other = _observation(model, x[2:], y[2:], k, client=1)
    agg = aggregate_observation(
        [
            bare,
            Observation(
                **{f.name: getattr(other, f.name) for f in dataclasses.fields(Observation)}
            ),
        ]
    )
    assert agg.is_aggregate and agg.num_clients == 2
    res = ATTACKS.create(name, shadow_trials=60, **params)(InferenceObservation.of(agg, k))
    assert 0.0 <= res.score <= 1.0
