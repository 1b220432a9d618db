"""Trap weights (Boenisch et al., EuroS&P 2023) and fishing (Wen et al., ICML 2022).

Observations are built by hand the way the server sees them: the modification crafts the model
from the honest one, clients run :func:`clients.local_update.local_update` on real records, and
the server's secrets ride in :attr:`Observation.server_secrets`. Ground truth (the records,
which class occurs once) is used only to design the experiment and to score.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from adversaries.base import ATTACKS, Observation
from adversaries.malicious import MODIFICATIONS
from adversaries.malicious.base import ServerView
from adversaries.malicious.fishing import Fishing, FishingAttack
from adversaries.malicious.trap_weights import TrapWeights, TrapWeightsAttack
from adversaries.reconstruction.inverting_gradients import InvertingGradientsAttack
from clients.local_update import local_update
from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.models import build_model

log = logging.getLogger(__name__)

CLASSES = 10


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine this is the fastest setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits() -> ImageData:
    return load_dataset("digits")


def cifar(shared: Path) -> ImageData:
    return load_dataset("cifar10_npz", root=shared / "cifar10", seed=0)


def view_for(
    data: ImageData,
    *,
    batch_size: int,
    clients: int = 1,
    round_: int = 1,
    public: int = 500,
    seed: int = 0,
) -> ServerView:
    """The server's view; its public data is the start of the test split."""
    n = min(public, int(data.test_y.shape[0]))
    return ServerView(
        round=round_,
        clients=tuple(range(clients)),
        targets=tuple(range(clients)),
        input_shape=data.input_shape,
        num_classes=CLASSES,
        data_mean=data.mean,
        data_std=data.std,
        protocol="fedsgd",
        batch_size=batch_size,
        local_steps=1,
        lr=0.1,
        public_inputs=data.normalize(data.images("test", slice(0, n))),
        public_labels=data.labels("test", slice(0, n)),
        generator=torch.Generator().manual_seed(seed),
    )


def observe(
    model: nn.Module,
    data: ImageData,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clients: int = 1,
    secrets: dict | None = None,
    round_: int = 1,
) -> Observation:
    """FedSGD: each of ``clients`` equal shares of ``(x, y)`` is one client's batch; the server
    sees the num_examples-weighted mean of their updates (or the one update)."""
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    size = x.shape[0] // clients
    parts = [slice(c * size, (c + 1) * size) for c in range(clients)]
    ups = [
        local_update(copy.deepcopy(model), [(x[p], y[p])], protocol="fedsgd", lr=0.1) for p in parts
    ]
    total = sum(u.num_examples for u in ups)
    update = {k: sum(u.update[k] * u.num_examples for u in ups) / total for k in ups[0].update}
    return Observation(
        round=round_,
        client_id=0 if clients == 1 else None,
        protocol="fedsgd",
        model=model,
        global_params=params,
        update=update,
        batch_size=size,
        local_steps=1,
        lr=0.1,
        num_examples=total,
        input_shape=data.input_shape,
        num_classes=CLASSES,
        data_mean=data.mean,
        data_std=data.std,
        num_clients=clients,
        members=tuple(range(clients)) if clients > 1 else (),
        server_secrets=secrets or {},
    )


def matched_mse(originals: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-original MSE (pixels in [0, 1]) of the best one-to-one matching; inf if unmatched."""
    o, r = originals.double().flatten(1), recon.double().flatten(1).clamp(0, 1)
    cost = torch.cdist(o, r) ** 2 / o.shape[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.full((o.shape[0],), float("inf"), dtype=torch.float64)
    out[torch.as_tensor(rows)] = cost[torch.as_tensor(rows), torch.as_tensor(cols)]
    return out


def psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


# ---------------------------------------------------------------------------- trap weights


@pytest.mark.shared_data
def test_trap_weights_cifar_mlp_asr(shared_data: Path) -> None:
    """Acceptance: CIFAR-10, one client, batch 64, FedSGD, mlp: asr at 30 dB >= 0.30.

    Three batches (one seed each); the asr is the share of the 3 x 64 records whose matched
    reconstruction has MSE <= 0.001 (the mean over the three batches is asserted). Measured:
    0.484 / 0.484 / 0.422, mean 0.464 (torch 2.14 CPU); the log shows this run's values.
    """
    data = cifar(shared_data)
    asrs = []
    for seed in range(3):
        torch.manual_seed(seed)
        honest = build_model("mlp", data.input_shape, CLASSES)
        crafted = TrapWeights().craft(honest, view_for(data, batch_size=64, seed=seed))
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(100 + seed))[:64]
        x01, y = data.images("train", idx), data.labels("train", idx)
        obs = observe(
            crafted.model, data, data.normalize(x01), y, secrets={"trap_weights": crafted.secrets}
        )
        res = TrapWeightsAttack()(obs)
        assert res.labels is None and res.inputs.shape[1:] == data.input_shape
        mse = matched_mse(x01, data.denormalize(res.inputs))
        asrs.append(float((mse <= 1e-3).double().mean()))
        log.info("trap_weights cifar/mlp seed %d: asr %.3f, %s", seed, asrs[-1], res.metrics)
    log.info("trap_weights cifar/mlp asr per batch %s, mean %.3f", asrs, sum(asrs) / 3)
    assert sum(asrs) / len(asrs) >= 0.30, asrs


def test_trap_weights_rows_fold_normalisation_and_recover_digits() -> None:
    """The planted rows act on pixels as built (folding is exact), fire for about the chosen
    share of public inputs, and single records come back exactly (digits, mlp, batch 8)."""
    data = digits()
    torch.manual_seed(0)
    honest = build_model("mlp", data.input_shape, CLASSES)
    before = {k: v.clone() for k, v in honest.state_dict().items()}
    view = view_for(data, batch_size=8)
    mod = TrapWeights()
    crafted = mod.craft(honest, view)
    assert all(torch.equal(before[k], v) for k, v in honest.state_dict().items())  # untouched
    sec = crafted.secrets
    assert sec["layer"] == "1" and sec["rows"].tolist() == list(range(256))
    assert sec["activation_rate"] == pytest.approx(1 / 8)
    layer = crafted.model[1]
    # Every row: half its weights negative, the positive half scaled (in pixel space).
    pixel_w = layer.weight.detach().double() / torch.tensor(data.std, dtype=torch.float64)
    assert ((pixel_w < 0).sum(1) == pixel_w.shape[1] // 2).all()
    fired = (layer(view.public_inputs.flatten(1)) > 0).double().mean(0)
    assert float(fired.mean()) == pytest.approx(1 / 8, abs=0.01)
    idx = torch.arange(8) * 37
    x01, y = data.images("train", idx), data.labels("train", idx)
    obs = observe(crafted.model, data, data.normalize(x01), y, secrets={"trap_weights": sec})
    res = ATTACKS.create("trap_weights")(obs)
    mse = matched_mse(x01, data.denormalize(res.inputs))
    exact = int((mse < 1e-8).sum())
    log.info("trap_weights digits/mlp batch 8: %d exact, metrics %s", exact, res.metrics)
    assert exact >= 4
    assert res.metrics["returned"] == res.inputs.shape[0]
    assert res.metrics["distinct"] == res.inputs.shape[0] + res.metrics["dropped"]


def test_trap_weights_uncalibrated_keeps_zero_pixel_bias() -> None:
    """``calibrate=False`` is the paper's construction: bias zero in pixel space."""
    data = digits()
    honest = build_model("mlp", data.input_shape, CLASSES)
    crafted = TrapWeights(calibrate=False).craft(honest, view_for(data, batch_size=8))
    layer = crafted.model[1]
    mean = torch.full((layer.in_features,), data.mean[0], dtype=torch.float64)
    pixel_w = layer.weight.detach().double() / data.std[0]
    assert torch.allclose(layer.bias.detach().double(), pixel_w @ mean, atol=1e-4)
    assert crafted.secrets["activation_rate"] != crafted.secrets["activation_rate"]  # nan


# ---------------------------------------------------------------------------- refusals


def test_models_that_cannot_hold_the_modifications() -> None:
    shape = (3, 32, 32)
    with pytest.raises(ConfigError, match="trap_weights needs a first Linear.*mlp, linear"):
        TrapWeights().check_model(build_model("lenet", shape, CLASSES), shape, CLASSES)
    with pytest.raises(ConfigError, match="fishing needs the last Linear layer to be the"):
        Fishing().check_model(build_model("cnn6", shape, CLASSES), shape, CLASSES)
    with pytest.raises(ConfigError, match="mode 'feature'.*mlp, convnet"):
        Fishing(mode="feature").check_model(build_model("lenet", shape, CLASSES), shape, CLASSES)
    with pytest.raises(ConfigError, match="target_class 12"):
        Fishing(target_class=12).check_model(build_model("mlp", shape, CLASSES), shape, CLASSES)
    TrapWeights().check_model(build_model("mlp", shape, CLASSES), shape, CLASSES)
    Fishing(mode="feature").check_model(build_model("convnet", shape, CLASSES), shape, CLASSES)
    for name in ("lenet", "resnet18"):
        Fishing().check_model(build_model(name, shape, CLASSES), shape, CLASSES)


@pytest.mark.parametrize(
    ("cls", "params"),
    [
        (TrapWeights, {"sigma": 0.0}),
        (TrapWeights, {"scale_factor": 1.5}),
        (TrapWeights, {"activation_rate": 1.0}),
        (TrapWeights, {"calibrate": "yes"}),
        (TrapWeightsAttack, {"group_tol": 0.0}),
        (TrapWeightsAttack, {"tol": 1.0}),
        (TrapWeightsAttack, {"max_candidates": 0}),
        (TrapWeightsAttack, {"drop_out_of_box": 1}),
        (Fishing, {"target_class": -2}),
        (Fishing, {"mode": "both"}),
        (Fishing, {"bias_multiplier": -1.0}),
        (Fishing, {"feature_multiplier": float("inf")}),
        (Fishing, {"expected_records": 0}),
        (FishingAttack, {"iterations": 0}),
        (FishingAttack, {"tv_weight": -1.0}),
    ],
)
def test_bad_params(cls: type, params: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(params))):
        cls(**params)


def test_registries_and_bad_params_through_them() -> None:
    assert isinstance(MODIFICATIONS.create("trap_weights"), TrapWeights)
    assert isinstance(MODIFICATIONS.create("fishing", mode="feature"), Fishing)
    assert isinstance(ATTACKS.create("fishing", iterations=5), FishingAttack)
    assert TrapWeightsAttack.modification == "trap_weights"
    assert FishingAttack.modification == "fishing"
    with pytest.raises(ConfigError, match="unknown parameter"):
        MODIFICATIONS.create("fishing", multiplier=3)
    with pytest.raises(ConfigError, match="scale_factor"):
        MODIFICATIONS.create("trap_weights", scale_factor=0)


def test_attacks_refuse_observations_without_their_secrets() -> None:
    data = digits()
    model = build_model("mlp", data.input_shape, CLASSES)
    x, y = data.normalize(data.images("train", [0, 1])), data.labels("train", [0, 1])
    honest = observe(model, data, x, y)
    for attack in (TrapWeightsAttack(), FishingAttack(iterations=2)):
        with pytest.raises(ThreatModelError, match=attack.modification):
            attack(honest)
    other = observe(model, data, x, y, secrets={"imprint": {}})
    with pytest.raises(ThreatModelError, match="fishing"):
        FishingAttack(iterations=2)(other)


# ---------------------------------------------------------------------------- fishing


def _one_of_a_kind(data: ImageData, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """Experiment design (ground truth): ``n`` train records in which some class occurs
    exactly once, and that class."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randperm(len(data), generator=gen)[:n]
        counts = torch.bincount(data.labels("train", idx), minlength=CLASSES)
        once = torch.nonzero(counts == 1).flatten()
        if once.numel():
            return idx, int(once[0])


def test_class_fishing_on_aggregate_beats_inverting_gradients() -> None:
    """10 clients x 2 records (digits, lenet), one record of the fished class in the aggregate.

    Digits/lenet: 8x8 images keep both Inverting Gradients runs (one record; 20 records for
    the honest baseline) at a few seconds each with the same 300 iterations; lenet is the
    classic gradient-inversion target and has a biased classifier. Measured (seeds 0..3 of
    this design): fishing 23.4/23.8/22.9/26.3 dB against 4.7/3.7/4.7/3.8 dB for the honest
    aggregate. On CIFAR-10 with convnet (300 iterations) the same design gave 16.9 dB against
    7.7 dB, but the honest 20-record baseline alone takes ~40 s there.
    """
    data = digits()
    clients, per_client, iterations = 10, 2, 300
    idx, target = _one_of_a_kind(data, clients * per_client, seed=0)
    x01, y = data.images("train", idx), data.labels("train", idx)
    x = data.normalize(x01)
    where = int(torch.nonzero(y == target)[0])
    torch.manual_seed(0)
    honest = build_model("lenet", data.input_shape, CLASSES)
    view = view_for(data, batch_size=per_client, clients=clients)
    crafted = Fishing(target_class=target).craft(honest, view)
    assert crafted.secrets == {
        "mode": "class",
        "target_class": target,
        "classifier": "fc",
        "bias_multiplier": 1000.0,
    }
    obs = observe(crafted.model, data, x, y, clients=clients, secrets={"fishing": crafted.secrets})

    # The other 19 records are silent: the untouched parameters carry exactly the gradient of
    # the one target record (scaled by 1/20).
    single = observe(crafted.model, data, x[where : where + 1], y[where : where + 1])
    for name, g in obs.update.items():
        ref = single.update[name] / (clients * per_client)
        if name.startswith("fc."):
            g, ref = g[target], ref[target]
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-9), name

    res = FishingAttack(iterations=iterations)(obs)
    assert res.inputs.shape == (1, *data.input_shape)
    assert res.labels.tolist() == [target]
    assert res.metrics["estimated_records"] == pytest.approx(1.0, abs=1e-3)
    fished = float(psnr(matched_mse(x01[where : where + 1], data.denormalize(res.inputs)))[0])

    baseline = InvertingGradientsAttack(iterations=iterations)(
        observe(honest, data, x, y, clients=clients)
    )
    assert baseline.inputs.shape[0] == clients * per_client
    ig = float(psnr(matched_mse(x01, data.denormalize(baseline.inputs)))[where])
    log.info(
        "class fishing digits/lenet: target %d, fished %.2f dB, honest IG %.2f dB",
        target,
        fished,
        ig,
    )
    assert fished >= ig + 5.0, (fished, ig)


def test_fishing_picks_and_keeps_a_target_class() -> None:
    data = digits()
    model = build_model("mlp", data.input_shape, CLASSES)
    mod = Fishing()
    first = mod.craft(model, view_for(data, batch_size=4, seed=3)).secrets["target_class"]
    again = mod.craft(model, view_for(data, batch_size=4, seed=4, round_=2)).secrets["target_class"]
    assert 0 <= first < CLASSES and again == first
    crafted = Fishing(target_class=first).craft(model, view_for(data, batch_size=4)).model
    w, b = crafted[5].weight, crafted[5].bias
    others = [k for k in range(CLASSES) if k != first]
    assert torch.count_nonzero(w[others]) == 0 and torch.all(b[others] == 1000.0)
    assert torch.equal(w[first], model[5].weight[first])


def test_feature_fishing_counts_the_window_and_searches_over_rounds() -> None:
    """Feature fishing, digits/mlp, 10 clients x 8 records, fresh batches every round.

    The count read from the update equals the true number of target-class records in the
    window (the test looks at the unit with the records); ``observe`` moves the window's share
    ``q`` up after an empty window and down after a crowded one; a window holding exactly one
    record is reconstructed (the mlp's first-layer gradient of one record is exact). Rounds
    run until the window has held exactly one record twice (at most 20); the counts are
    logged.
    """
    data = digits()
    clients, per_client, target = 10, 8, 3
    torch.manual_seed(0)
    honest = build_model("mlp", data.input_shape, CLASSES)
    mod = Fishing(target_class=target, mode="feature")
    attack = FishingAttack(iterations=100)
    gen = torch.Generator().manual_seed(5)
    counts, singles = [], []
    for rnd in range(1, 21):
        view = view_for(data, batch_size=per_client, clients=clients, round_=rnd, seed=rnd)
        crafted = mod.craft(honest, view)
        sec = crafted.secrets
        q = sec["quantile"]
        idx = torch.randperm(len(data), generator=gen)[: clients * per_client]
        x01, y = data.images("train", idx), data.labels("train", idx)
        x = data.normalize(x01)
        obs = observe(
            crafted.model, data, x, y, clients=clients, secrets={"fishing": sec}, round_=rnd
        )
        pen = crafted.model.get_submodule(sec["feature_layer"])
        with torch.no_grad():
            s = pen(crafted.model[:3](x))[:, sec["feature"]]
        inside = (s > 0) & (y == target)
        mod.observe(obs)
        est = mod.history[-1]["count"]
        counts.append((int(inside.sum()), est))
        assert est == pytest.approx(float(inside.sum()), abs=1e-3)
        if round(est) == 0:
            assert mod._q > q
        elif round(est) > 1:
            assert mod._q < q
        else:
            assert mod._q == q
            res = attack(obs)
            assert res.metrics["estimated_records"] == pytest.approx(1.0, abs=1e-3)
            assert res.labels.tolist() == [target]
            where = int(torch.nonzero(inside)[0])
            singles.append(
                float(psnr(matched_mse(x01[where : where + 1], data.denormalize(res.inputs)))[0])
            )
            if len(singles) == 2:
                break
    log.info(
        "feature fishing digits/mlp: (true, estimated) counts %s, PSNR when one %s", counts, singles
    )
    assert singles, counts
    assert min(singles) >= 30.0, singles
