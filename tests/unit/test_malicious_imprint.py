"""Imprint ("Robbing the Fed", Fowl et al., ICLR 2022): the block and the attack.

Hand-built rounds on the real CIFAR-10 subset: the server crafts the model with
:meth:`Imprint.craft` (public inputs: the test split), clients run
:func:`clients.local_update.local_update` on train images, the server attacks the (mean)
update. Only the scoring here uses ground truth (pixels, true measurements); the attack sees
the :class:`Observation`.

Score (asr): share of originals whose one-to-one matched reconstruction (denormalised, clamped
to [0, 1]) has MSE <= 0.001 (30 dB).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from adversaries.base import ATTACKS, Observation
from adversaries.malicious import MODIFICATIONS, ServerView
from adversaries.malicious.imprint import Imprint, ImprintAttack, alone_share, expected_alone_share
from clients.local_update import local_update
from fl_privsim.core.architecture import build_architecture
from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.models import build_model

ASR_MSE = 1e-3
CLASSES = 10


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar(shared_data: Path) -> ImageData:
    return load_dataset("cifar10_npz", root=shared_data / "cifar10", seed=0)


def _view(
    ds: ImageData,
    *,
    clients: int,
    batch: int,
    steps: int = 1,
    protocol: str = "fedsgd",
    lr: float = 0.1,
    seed: int = 0,
) -> ServerView:
    return ServerView(
        round=1,
        clients=tuple(range(clients)),
        targets=tuple(range(clients)),
        input_shape=ds.input_shape,
        num_classes=CLASSES,
        data_mean=ds.mean,
        data_std=ds.std,
        protocol=protocol,
        batch_size=batch,
        local_steps=steps,
        lr=lr,
        public_inputs=ds.normalize(ds.images("test", slice(None))),
        public_labels=ds.labels("test", slice(None)),
        generator=torch.Generator().manual_seed(seed),
    )


def _round(ds: ImageData, crafted, view: ServerView, idx: np.ndarray) -> tuple[Observation, bool]:
    """Every client trains a copy of the crafted model on its part of ``idx`` (client c,
    step t: the next ``batch`` indices); the observation holds the example-weighted mean."""
    per_client = view.batch_size * view.local_steps
    updates, weights = [], []
    for c in range(len(view.clients)):
        own = idx[c * per_client : (c + 1) * per_client]
        b = view.batch_size
        steps = [own[t * b : (t + 1) * b] for t in range(view.local_steps)]
        batches = [(ds.normalize(ds.images("train", i)), ds.labels("train", i)) for i in steps]
        model = copy.deepcopy(crafted.model).train()
        out = local_update(model, batches, protocol=view.protocol, lr=view.lr)
        updates.append(out.update)
        weights.append(out.num_examples)
    total = float(sum(weights))
    update = {
        k: sum(w * u[k] for w, u in zip(weights, updates, strict=True)) / total for k in updates[0]
    }
    trainable = {n for n, p in crafted.model.named_parameters() if p.requires_grad}
    finite = all(bool(torch.isfinite(update[n]).all()) for n in trainable)
    obs = Observation(
        round=1,
        client_id=0 if len(view.clients) == 1 else None,
        protocol=view.protocol,
        model=crafted.model,
        global_params={k: v.detach().clone() for k, v in crafted.model.state_dict().items()},
        update=update,
        batch_size=view.batch_size,
        local_steps=view.local_steps,
        lr=view.lr,
        num_examples=int(total),
        input_shape=ds.input_shape,
        num_classes=CLASSES,
        data_mean=ds.mean,
        data_std=ds.std,
        num_clients=len(view.clients),
        members=tuple(view.clients),
        server_secrets={"imprint": crafted.secrets},
    )
    return obs, finite


def _asr(ds: ImageData, originals01: torch.Tensor, recons: torch.Tensor) -> float:
    """One-to-one MSE matching (Hungarian) on an (N, M) cost matrix from a Gram product."""
    if recons.shape[0] == 0:
        return 0.0
    o = originals01.flatten(1).double()
    r = ds.denormalize(recons.detach().cpu()).clamp(0, 1).flatten(1).double()
    sq = (o * o).sum(1, keepdim=True) + (r * r).sum(1)[None] - 2 * o @ r.T
    cost = sq.clamp_min(0) / o.shape[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    return float((cost[rows, cols] <= ASR_MSE).sum()) / o.shape[0]


def _alone(ds: ImageData, idx: np.ndarray, secrets: dict) -> float:
    """Share of the records alone in their bin, from their true measurements (ground truth)."""
    h = ds.normalize(ds.images("train", idx)).flatten(1).double() @ secrets["direction"].double()
    t = secrets["boundaries"].double()
    binid = torch.bucketize(h, t[1:])  # t_i < h <= t_{i+1}  ->  i
    counts = torch.bincount(binid, minlength=t.numel())
    alone = (counts[binid] == 1) & (h > t[0])
    return float(alone.double().mean())


def _attack(obs: Observation):
    return ATTACKS.create("imprint")(obs)


# --------------------------------------------------------------------------- pure functions


def test_expected_alone_share_matches_formula_and_simulation() -> None:
    assert expected_alone_share(64, 256) == pytest.approx((1 - 1 / 256) ** 63)
    assert expected_alone_share(64, 256) == pytest.approx(0.7815, abs=1e-4)
    assert expected_alone_share(1, 2) == 1.0
    assert alone_share([1 / 256] * 256, 64) == pytest.approx(expected_alone_share(64, 256))
    assert alone_share([0.5, 0.5], 2) == pytest.approx(0.5)
    assert alone_share([0.9, 0.1], 3) == pytest.approx(0.9 * 0.1**2 + 0.1 * 0.9**2)
    rng = np.random.default_rng(0)
    masses = rng.dirichlet(np.ones(32))
    draws = rng.choice(32, size=(20000, 8), p=masses)
    counts = np.stack([np.bincount(d, minlength=32) for d in draws])
    simulated = float((np.take_along_axis(counts, draws, 1) == 1).mean())
    assert alone_share(masses, 8) == pytest.approx(simulated, abs=0.01)
    with pytest.raises(ValueError):
        alone_share([0.7, 0.7], 4)
    with pytest.raises(ValueError):
        expected_alone_share(0, 4)


def test_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="bins must be >= 2, got 1"):
        Imprint(bins=1)
    for bad in (
        {"measurement": "contrast"},
        {"variant": "dense"},
        {"distribution": "laplace"},
        {"drift": 0.0},
        {"ratio": -1.0},
        {"perturbation": 0.0},
    ):
        with pytest.raises(ValueError):
            Imprint(**bad)
    with pytest.raises(ValueError):
        ImprintAttack(tol=-1.0)
    assert isinstance(MODIFICATIONS.create("imprint", bins=8), Imprint)


def test_check_model_refuses_only_impossible_shapes() -> None:
    model = build_model("mlp", (1, 8, 8), CLASSES)
    Imprint().check_model(model, (1, 8, 8), CLASSES)
    Imprint(measurement="dct").check_model(model, (3, 1, 5), CLASSES)
    with pytest.raises(ConfigError):
        Imprint().check_model(model, (8, 8), CLASSES)
    with pytest.raises(ConfigError):
        Imprint(measurement="dct").check_model(model, (3, 1, 1), CLASSES)


def _synthetic_view(seed: int = 0) -> tuple[ServerView, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pub = torch.randn(200, 1, 8, 8, generator=g)
    view = ServerView(
        round=1,
        clients=(0,),
        targets=(0,),
        input_shape=(1, 8, 8),
        num_classes=CLASSES,
        data_mean=(0.5,),
        data_std=(0.25,),
        protocol="fedsgd",
        batch_size=4,
        local_steps=1,
        lr=0.1,
        public_inputs=pub,
        public_labels=torch.zeros(200, dtype=torch.int64),
        generator=g,
    )
    x = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.arange(4) % CLASSES
    return view, x, y


def test_attack_refuses_observation_without_imprint_secrets() -> None:
    view, x, y = _synthetic_view()
    torch.manual_seed(0)
    crafted = Imprint(bins=16).craft(build_model("mlp", (1, 8, 8), CLASSES), view)
    update = local_update(copy.deepcopy(crafted.model), [(x, y)], protocol="fedsgd", lr=0.1).update
    obs = Observation(
        round=1,
        client_id=0,
        protocol="fedsgd",
        model=crafted.model,
        global_params=crafted.model.state_dict(),
        update=update,
        batch_size=4,
        local_steps=1,
        lr=0.1,
        num_examples=4,
        input_shape=(1, 8, 8),
        num_classes=CLASSES,
        data_mean=(0.5,),
        data_std=(0.25,),
    )
    with pytest.raises(ThreatModelError, match="imprint"):
        _attack(obs)
    honest = build_model("mlp", (1, 8, 8), CLASSES)
    plain = local_update(honest, [(x, y)], protocol="fedsgd", lr=0.1).update
    no_block = dataclasses.replace(
        obs,
        model=honest,
        global_params=honest.state_dict(),
        update=plain,
        server_secrets={"imprint": crafted.secrets},
    )
    with pytest.raises(ThreatModelError, match="block.encoder.weight"):
        _attack(no_block)
    ok = dataclasses.replace(obs, server_secrets={"imprint": crafted.secrets})
    assert _attack(ok).inputs.shape[1:] == (1, 8, 8)


def test_craft_keeps_the_honest_model_and_the_client_can_build_it() -> None:
    view, x, _ = _synthetic_view()
    torch.manual_seed(0)
    honest = build_model("convnet", (1, 8, 8), CLASSES)
    before = {k: v.clone() for k, v in honest.state_dict().items()}
    crafted = Imprint(bins=16, variant="sparse").craft(honest, view)
    assert all(torch.equal(before[k], v) for k, v in honest.state_dict().items())
    assert crafted.arch == {"front_block": {"rows": 16, "activation": "clamp"}}
    assert {"variant", "rows", "boundaries", "direction"} <= set(crafted.secrets)
    assert crafted.secrets["direction"].shape == (64,)
    # the client: agreed model + the server's spec, then the weights it received
    base = build_model("convnet", (1, 8, 8), CLASSES)
    client = build_architecture(base, crafted.arch, (1, 8, 8))
    client.load_state_dict(crafted.model.state_dict())
    client.eval()
    crafted.model.eval()
    with torch.no_grad():
        assert torch.equal(client(x), crafted.model(x))
    assert bool(torch.isfinite(crafted.model.block.upper).all())  # its change must be finite


# --------------------------------------------------------------------------- CIFAR-10 rounds


@pytest.mark.shared_data
@pytest.mark.parametrize("model_name", ["convnet", "mlp", "resnet18"])
def test_fedsgd_batch64_256_bins_recovers_the_records_alone_in_their_bin(
    cifar: ImageData, model_name: str
) -> None:
    torch.manual_seed(0)
    view = _view(cifar, clients=1, batch=64)
    crafted = Imprint(bins=256).craft(build_model(model_name, cifar.input_shape, CLASSES), view)
    idx = np.random.default_rng(0).choice(len(cifar), 64, replace=False)
    obs, finite = _round(cifar, crafted, view, idx)
    result = _attack(obs)
    asr = _asr(cifar, cifar.images("train", idx), result.inputs)
    expected = _alone(cifar, idx, crafted.secrets)
    assert finite
    assert result.inputs.shape[0] <= 64 and result.metrics["bins"] == 256
    assert result.metrics["nonempty_bins"] == result.inputs.shape[0]
    assert abs(asr - expected) <= 0.10, (asr, expected)
    assert asr >= 0.55, (asr, expected)


@pytest.mark.shared_data
def test_fedsgd_aggregate_of_10_clients_512_bins(cifar: ImageData) -> None:
    torch.manual_seed(1)
    view = _view(cifar, clients=10, batch=8, seed=1)
    crafted = Imprint(bins=512).craft(build_model("convnet", cifar.input_shape, CLASSES), view)
    idx = np.random.default_rng(1).choice(len(cifar), 80, replace=False)
    obs, _ = _round(cifar, crafted, view, idx)
    result = _attack(obs)
    asr = _asr(cifar, cifar.images("train", idx), result.inputs)
    assert result.inputs.shape[0] <= 80
    assert asr >= 0.50, (asr, _alone(cifar, idx, crafted.secrets))


@pytest.mark.shared_data
@pytest.mark.parametrize("variant", ["cumulative", "sparse"])
@pytest.mark.parametrize("model_name", ["convnet", "mlp"])
def test_fedavg_four_local_steps_stays_finite_and_leaks(
    cifar: ImageData, model_name: str, variant: str
) -> None:
    torch.manual_seed(2)
    view = _view(cifar, clients=1, batch=16, steps=4, protocol="fedavg", lr=0.1, seed=2)
    honest = build_model(model_name, cifar.input_shape, CLASSES)
    crafted = Imprint(bins=256, variant=variant).craft(honest, view)
    idx = np.random.default_rng(2).choice(len(cifar), 64, replace=False)
    obs, finite = _round(cifar, crafted, view, idx)
    assert finite
    # the block's own training stayed small: every row's offset moved by < 0.5 std of the
    # measurement on the client's records (a row's pre-activation is s·(h - t_i)/σ), and the
    # decoder's columns by < 1 %
    x = cifar.normalize(cifar.images("train", idx)).flatten(1)
    dz = x @ obs.update["block.encoder.weight"].T + obs.update["block.encoder.bias"]
    assert float((dz / crafted.secrets["encoder_scale"]).abs().max()) < 0.5
    decoder = crafted.model.block.decoder.weight.detach()
    assert float(obs.update["block.decoder.weight"].norm() / decoder.norm()) < 0.01
    result = _attack(obs)
    asr = _asr(cifar, cifar.images("train", idx), result.inputs)
    assert result.inputs.shape[0] <= 64
    assert asr >= 0.30, (asr, _alone(cifar, idx, crafted.secrets))


@pytest.mark.shared_data
def test_sparse_fedsgd_matches_the_alone_share(cifar: ImageData) -> None:
    torch.manual_seed(3)
    view = _view(cifar, clients=1, batch=64, seed=3)
    honest = build_model("mlp", cifar.input_shape, CLASSES)
    crafted = Imprint(bins=256, variant="sparse").craft(honest, view)
    assert crafted.arch["front_block"]["activation"] == "clamp"
    idx = np.random.default_rng(3).choice(len(cifar), 64, replace=False)
    obs, _ = _round(cifar, crafted, view, idx)
    asr = _asr(cifar, cifar.images("train", idx), _attack(obs).inputs)
    expected = _alone(cifar, idx, crafted.secrets)
    assert abs(asr - expected) <= 0.10 and asr >= 0.55, (asr, expected)


@pytest.mark.shared_data
def test_one_shot_singles_out_the_one_record_of_a_large_aggregate(cifar: ImageData) -> None:
    torch.manual_seed(4)
    view = _view(cifar, clients=10, batch=64, seed=4)  # 640 records expected
    honest = build_model("mlp", cifar.input_shape, CLASSES)
    crafted = Imprint(variant="one_shot").craft(honest, view)
    assert crafted.secrets["rows"] == 2 and crafted.secrets["bins"] == 1
    t = crafted.secrets["boundaries"].double()
    x = cifar.normalize(cifar.images("train", slice(None))).flatten(1).double()
    h = x @ crafted.secrets["direction"].double()
    in_bin = (h > t[0]) & (h <= t[1])
    inside = torch.nonzero(in_bin).flatten().numpy()
    outside = torch.nonzero(~in_bin).flatten().numpy()
    assert inside.size >= 1
    rng = np.random.default_rng(4)
    idx = rng.permutation(np.concatenate([inside[:1], rng.choice(outside, 639, replace=False)]))
    obs, _ = _round(cifar, crafted, view, idx)
    result = _attack(obs)
    assert result.inputs.shape[0] == 1
    target = cifar.images("train", inside[:1])
    recon = cifar.denormalize(result.inputs).clamp(0, 1)
    assert float(((recon - target) ** 2).mean()) < 1e-6
    # no record in the bin: nothing is returned
    empty = rng.choice(outside, 640, replace=False)
    obs_empty, _ = _round(cifar, crafted, view, empty)
    assert _attack(obs_empty).inputs.shape[0] == 0


@pytest.mark.shared_data
@pytest.mark.parametrize("model_name", ["convnet", "mlp"])
def test_crafted_model_matches_the_honest_model(cifar: ImageData, model_name: str) -> None:
    torch.manual_seed(5)
    honest = build_model(model_name, cifar.input_shape, CLASSES).eval()
    crafted = Imprint(bins=256).craft(honest, _view(cifar, clients=1, batch=64)).model.eval()
    x = cifar.normalize(cifar.images("train", slice(0, 256)))
    with torch.no_grad():
        change = (crafted.block(x) - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).median()
        diff = (crafted(x) - honest(x)).abs().max()
    # the block moves an input by at most ~perturbation (1e-4) of the median input norm
    assert float(change.max()) <= 2e-4
    assert float(diff) <= 1e-4, float(diff)


@pytest.mark.shared_data
def test_fedsgd_batch64_256_bins_on_natural_face_photos(shared_data: Path) -> None:
    """The same acceptance on other natural photos: UTKFace faces (read from ../shared/data only,
    never shipped), 32x32; the server's public data are 500 other faces of the same subset."""
    if not (shared_data / "utkface").is_dir():
        pytest.skip(f"{shared_data / 'utkface'} not present")
    from adversaries.inference.utkface import load_utkface

    x, y, _ = load_utkface(shared_data / "utkface", image_size=32)
    mean = tuple(float(v) for v in x[:1000].mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in x[:1000].std(dim=(0, 2, 3)))
    faces = ImageData("utkface", x[:1000], y[:1000], x[1000:], y[1000:], CLASSES, mean, std, ())
    torch.manual_seed(0)
    view = _view(faces, clients=1, batch=64)
    crafted = Imprint(bins=256).craft(build_model("convnet", faces.input_shape, CLASSES), view)
    idx = np.random.default_rng(0).choice(1000, 64, replace=False)
    obs, finite = _round(faces, crafted, view, idx)
    asr = _asr(faces, faces.images("train", idx), _attack(obs).inputs)
    expected = _alone(faces, idx, crafted.secrets)
    assert finite
    assert abs(asr - expected) <= 0.10, (asr, expected)
    assert asr >= 0.55, (asr, expected)


def test_bins_sized_above_secure_aggregation_rounding_survive_it(cifar: ImageData) -> None:
    """SecAgg+ reveals the mean rounded to about its quantisation step (flwr 1.41 defaults:
    2·8/2^22 with max_weight = batch). An imprint block sized for exact floats drowns in that
    rounding; told the resolution (``ServerView.update_resolution``), the block lifts its
    bins above it and the records come back (10 clients x batch 8, 512 bins, FedSGD)."""
    step = 2 * 8.0 / 2**22
    idx = np.random.default_rng(0).choice(len(cifar.train_y), size=80, replace=False)
    originals = cifar.images("train", idx)
    shares = {}
    for resolution in (0.0, step):
        view = dataclasses.replace(_view(cifar, clients=10, batch=8), update_resolution=resolution)
        honest = build_model("convnet", cifar.input_shape, CLASSES)
        crafted = Imprint(bins=512).craft(honest, view)
        obs, _ = _round(cifar, crafted, view, idx)
        g = torch.Generator().manual_seed(1)
        rounded = {
            k: v + (torch.rand(v.shape, generator=g, dtype=v.dtype) * 2 - 1) * step
            for k, v in obs.update.items()
        }
        shares[resolution] = _asr(
            cifar, originals, _attack(dataclasses.replace(obs, update=rounded)).inputs
        )
    assert shares[step] >= 0.5, shares
    assert shares[0.0] < 0.5 * shares[step], shares
