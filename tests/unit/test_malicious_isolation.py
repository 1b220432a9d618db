"""Client isolation (Pasquini et al., CCS 2022) and the crafting shared by both server paths.

The decoy's update must vanish in every parameter but the classifier's bias, over FedSGD and
several FedAvg steps, with the project's own local update on real digits; then the weighted
mean of a target and nine decoys is the target's update times its share, and the analytic
attack on that mean recovers the target's image. The Crafter hands decoys to the non-targets
and :func:`observed_model`/:func:`undecoyed` read the aggregate as the target's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adversaries.base import ATTACKS
from adversaries.malicious import MODIFICATIONS
from adversaries.malicious.isolation import dead_layer
from clients.local_update import local_update
from fl_privsim.core.data import load_dataset
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.metrics import psnr
from fl_privsim.core.models import build_model
from fl_privsim.engine.offline import client_observation
from strategies.crafting import MIXED, Crafter, ModificationPlan, observed_model, undecoyed
from strategies.model_info import ModelInfo

CLIENTS = 10


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _batch(ds, client: int, size: int):
    idx = list(range(client * size, (client + 1) * size))
    return ds.normalize(ds.images("train", idx)), ds.labels("train", idx)


def _info(ds, model) -> ModelInfo:
    return ModelInfo(
        model=model,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        data_mean=ds.mean,
        data_std=ds.std,
        protocol="fedsgd",
        batch_size=1,
        local_steps=1,
        lr=0.1,
    )


def _crafted(ds, model_name: str = "mlp", targets=(3,)):
    torch.manual_seed(0)
    model = build_model(model_name, ds.input_shape, ds.num_classes)
    plan = ModificationPlan(
        "isolation", MODIFICATIONS.create("isolation"), rounds={1}, clients=set(targets)
    )
    x, y = _batch(ds, 0, 16)
    crafter = Crafter([plan], info=_info(ds, model), public_inputs=x, public_labels=y, seed=0)
    return model, crafter, crafter.craft(1, list(range(CLIENTS)))


def test_dead_layer_is_the_hidden_layer_before_the_classifier_and_other_models_are_refused(digits):
    shape, k = digits.input_shape, digits.num_classes
    assert dead_layer(build_model("mlp", shape, k)) == "3"
    assert dead_layer(build_model("convnet", (3, 32, 32), k)) == "head.0"
    for name in ("linear", "lenet", "cnn6"):
        with pytest.raises(ConfigError, match="isolation"):
            MODIFICATIONS.create("isolation").check_model(build_model(name, shape, k), shape, k)


@pytest.mark.parametrize(("protocol", "steps"), [("fedsgd", 1), ("fedavg", 4)])
def test_a_decoy_update_vanishes_except_the_classifier_bias(digits, protocol, steps):
    _, _, sent = _crafted(digits)
    decoy = sent[0].model
    batches = [_batch(digits, 20 + s, 4) for s in range(steps)]
    update = local_update(decoy, batches, protocol=protocol, lr=0.5).update
    classifier_bias = "5.bias"
    for name, value in update.items():
        if name == classifier_bias:
            assert value.abs().max() > 0
        else:
            assert torch.count_nonzero(value) == 0, name


def test_crafter_sends_the_real_model_to_the_target_and_decoys_to_the_others(digits):
    model, crafter, sent = _crafted(digits)
    assert sorted(sent) == list(range(CLIENTS))
    target = sent[3]
    assert not target.decoy and all(sent[c].decoy for c in sent if c != 3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state.items())
    assert observed_model([sent[c] for c in range(CLIENTS)]) is target
    assert observed_model([sent[0], sent[1]]) == MIXED  # decoys only: nothing to read
    assert crafter.report()["crafted"]["1"] == {
        "isolation": [3],
        "decoys": [c for c in range(CLIENTS) if c != 3],
    }
    assert undecoyed(list(range(CLIENTS)), [1] * CLIENTS, sent) == ((3,), 1, float(CLIENTS))
    assert undecoyed([0, 1], [1, 1], {}) == ((0, 1), 2, 1.0)


def test_the_mean_of_target_and_decoys_gives_the_analytic_attack_the_target(digits):
    """What SecAgg+ reveals (the example-weighted mean) of one target and nine decoys, batch 1."""
    model, _, sent = _crafted(digits)
    updates = []
    for c in range(CLIENTS):
        x, y = _batch(digits, c, 1)
        updates.append(local_update(sent[c].model, [(x, y)], protocol="fedsgd", lr=0.1).update)
    mean = {k: sum(u[k] for u in updates) / CLIENTS for k in updates[0]}
    members, _, scale = undecoyed(list(range(CLIENTS)), [1] * CLIENTS, sent)
    x3, y3 = _batch(digits, 3, 1)
    obs = client_observation(
        model,
        [(x3, y3)],
        protocol="fedsgd",
        lr=0.1,
        mean=digits.mean,
        std=digits.std,
        num_classes=digits.num_classes,
        client_id=3,
    )
    obs = dataclasses.replace(
        obs, update={k: v * scale for k, v in mean.items()}
    )  # the server's view only
    result = ATTACKS.create("analytic")(obs, generator=torch.Generator().manual_seed(0))
    truth, recon = digits.denormalize(x3), digits.denormalize(result.inputs)
    assert members == (3,)
    assert max(float(psnr(r[None], truth)) for r in recon) >= 40.0
