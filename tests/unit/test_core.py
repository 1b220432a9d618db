"""Registry, seeding, models and the pure-torch local update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clients.local_update import local_update
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import MODELS, build_model
from fl_privsim.core.registry import Registry
from fl_privsim.core.seeding import seed_int, torch_generator


class Dummy:
    def __init__(self, *, k: int, scale: float = 1.0) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        self.k, self.scale = k, scale


def test_registry_register_create_and_errors():
    reg: Registry[Dummy] = Registry(kind="widget", group="fl_privsim.test_none")
    reg.register("dummy")(Dummy)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("dummy")(type("Other", (), {}))
    assert reg.create("dummy", k=2).k == 2
    with pytest.raises(ConfigError, match="unknown parameter.*bogus.*allowed: k, scale"):
        reg.create("dummy", k=1, bogus=3)
    with pytest.raises(ConfigError, match="missing parameter.*k"):
        reg.create("dummy")
    with pytest.raises(ConfigError, match="k must be >= 0"):
        reg.create("dummy", k=-1)
    with pytest.raises(ConfigError, match="unknown widget 'nope'; known: dummy"):
        reg.get("nope")


def test_registry_loads_entry_points(monkeypatch):
    class EP:
        name, value = "plugin", "pkg:Plugin"

        def load(self):
            return Dummy

    monkeypatch.setattr(
        "fl_privsim.core.registry.entry_points", lambda group: [EP()] if group == "g" else []
    )
    reg: Registry[Dummy] = Registry(kind="widget", group="g")
    assert reg.names() == ["plugin"] and reg.create("plugin", k=1).k == 1


def test_seeding_is_deterministic_and_keyed():
    assert seed_int(0, 1, 2, "batch") == seed_int(0, 1, 2, "batch")
    assert seed_int(0, 1, 2, "batch") != seed_int(0, 1, 3, "batch")
    assert seed_int(0, 1, 2, "batch") != seed_int(1, 1, 2, "batch")
    a = torch.rand(3, generator=torch_generator(5, -1, "attack"))
    assert torch.equal(a, torch.rand(3, generator=torch_generator(5, -1, "attack")))
    with pytest.raises(KeyError):
        seed_int(0, "nonsense")


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_models_fit_the_data(name, shape):
    model = build_model(name, shape, 10)
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10)


def test_lenet_matches_dlg_on_32px():
    model = build_model("lenet", (3, 32, 32), 100)
    assert model.fc.in_features == 768
    assert all(
        isinstance(m, torch.nn.Sigmoid) for m in model.body if not isinstance(m, torch.nn.Conv2d)
    )


def test_unknown_model():
    with pytest.raises(ConfigError, match="model.name.*allowed: mlp, linear, lenet, convnet"):
        build_model("vgg", (1, 8, 8), 10)


def test_init_schemes_are_seeded_and_distinct():
    g = lambda: torch.Generator().manual_seed(3)
    a = build_model("lenet", (1, 8, 8), 10, init="uniform", generator=g())
    b = build_model("lenet", (1, 8, 8), 10, init="uniform", generator=g())
    w = a.body[0].weight
    assert torch.equal(w, b.body[0].weight)
    assert float(w.min()) >= -0.5 and float(w.max()) <= 0.5 and float(w.abs().max()) > 0.4
    k = build_model("mlp", (1, 8, 8), 10, init="kaiming", generator=g())
    assert float(k[1].bias.abs().sum()) == 0.0
    assert abs(float(k[1].weight.std()) - (2 / 64) ** 0.5) < 0.03
    with pytest.raises(ConfigError, match="model.init.*allowed: default, uniform"):
        build_model("mlp", (1, 8, 8), 10, init="zeros")


def _batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_fedsgd_update_is_the_batch_gradient():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    x, y = _batch()
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    res = local_update(model, [(x, y)], protocol="fedsgd", lr=0.1)
    for (name, _), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(res.update[name], g)
    assert res.num_examples == 4 and abs(res.loss - float(loss)) < 1e-6


def test_fedavg_update_is_the_sgd_delta():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _batch()
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    one = local_update(model, [(x, y)], protocol="fedavg", lr=0.05)
    assert set(one.update) == set(start)
    for (name, _), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(one.update[name], -0.05 * g)
    model.load_state_dict(start)
    two = local_update(model, [(x, y), _batch(1)], protocol="fedavg", lr=0.05)
    assert two.num_examples == 8
    for name, p in model.named_parameters():
        torch.testing.assert_close(two.update[name], p.detach() - start[name])


def test_buffers_travel_as_deltas():
    model = build_model("resnet18", (3, 8, 8), 10)
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 10, (4,))
    res = local_update(model, [(x, y)], protocol="fedsgd", lr=0.1)
    bn = "bn1.running_mean"
    assert bn in res.update and res.update[bn].abs().sum() > 0
    assert "bn1.num_batches_tracked" not in res.update


def test_local_update_rejects_bad_input():
    model = build_model("mlp", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="protocol"):
        local_update(model, [_batch()], protocol="fedprox", lr=0.1)
    with pytest.raises(ValueError, match="one batch"):
        local_update(model, [_batch(), _batch(1)], protocol="fedsgd", lr=0.1)


def test_backend_config_local_vs_existing_cluster():
    from fl_privsim.app.simulation import backend_config
    from fl_privsim.core import config as c

    local = backend_config(
        c.load(None, ["federation.num_cpus_per_client=0.5", 'federation.device="cpu"'])
    )
    assert local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert local["init_args"]["address"] == "local"  # never joins a cluster by accident
    joined = backend_config(
        c.load(None, ['federation.ray_address="10.0.0.5:6379"', 'federation.device="cpu"'])
    )
    assert joined["init_args"]["address"] == "10.0.0.5:6379"
    assert "object_store_memory" not in joined["init_args"]  # Ray refuses it when joining
