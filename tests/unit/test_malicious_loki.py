"""LOKI (Zhao et al., IEEE S&P 2024): customised per-client imprint blocks and their attack.

Hand-built rounds on real MNIST (``../shared/data/mnist``; skipped where absent): the server
crafts one model per client with :meth:`Loki.craft` (public data: the test split), every client
trains *its own* model with :func:`clients.local_update.local_update` on train images, and the
server attacks the example-weighted mean of the updates (what secure aggregation reveals).
Only the scoring uses ground truth, through :mod:`fl_privsim.core.metrics` (Hungarian matching,
ASR at MSE <= 1e-3, i.e. 30 dB PSNR, coverage, leakage rate).

:func:`measure_loki` is the measurement helper (e.g. ``measure_loki(50, protocol="fedavg",
local_steps=4)``) for reporting leakage over 10/50/100 clients.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adversaries.base import ATTACKS, AttackResult, Observation
from adversaries.malicious import MODIFICATIONS, ServerView
from adversaries.malicious.imprint import recover_bins
from adversaries.malicious.loki import OFF_BIAS, Loki, LokiAttack, auto_bins, expected_alone_share
from clients.local_update import local_update
from fl_privsim.core import metrics
from fl_privsim.core.architecture import build_architecture
from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.models import build_model
from fl_privsim.core.paths import shared_data_dir

ASR_MSE = 1e-3  # 30 dB PSNR on [0, 1] pixels
CLASSES = 10
WEIGHT, BIAS = "block.encoder.weight", "block.encoder.bias"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_mnist(root: Path | None = None) -> ImageData:
    """MNIST from ``../shared/data/mnist`` (or ``$FL_PRIVSIM_SHARED_DATA/mnist``)."""
    return load_dataset("mnist_idx", root=(root or shared_data_dir()) / "mnist", seed=0)


@pytest.fixture(scope="module")
def mnist(shared_data: Path) -> ImageData:
    if not (shared_data / "mnist").is_dir():
        pytest.skip(f"{shared_data / 'mnist'} not present")
    return load_mnist(shared_data)


@dataclass
class LokiRound:
    """One simulated round: the crafted models, each client's update, the aggregate."""

    crafted: Any
    view: ServerView
    updates: list[dict[str, torch.Tensor]]
    obs: Observation
    idx: np.ndarray  # train indices, client by client
    owners: np.ndarray  # position of each record's client in view.targets


def simulate_loki_round(
    ds: ImageData,
    num_clients: int,
    *,
    protocol: str = "fedsgd",
    batch_size: int = 8,
    local_steps: int = 1,
    lr: float = 0.1,
    model_name: str = "mlp",
    seed: int = 0,
    **params: Any,
) -> LokiRound:
    """Craft LOKI's models for ``num_clients`` clients (ids 100, 101, ...), let each train its
    own model on distinct train records, and observe the example-weighted mean update."""
    steps = local_steps if protocol == "fedavg" else 1
    clients = tuple(range(100, 100 + num_clients))
    view = ServerView(
        round=1,
        clients=clients,
        targets=clients,
        input_shape=ds.input_shape,
        num_classes=CLASSES,
        data_mean=ds.mean,
        data_std=ds.std,
        protocol=protocol,
        batch_size=batch_size,
        local_steps=steps,
        lr=lr,
        public_inputs=ds.normalize(ds.images("test", slice(None))),
        public_labels=ds.labels("test", slice(None)),
        generator=torch.Generator().manual_seed(seed),
    )
    torch.manual_seed(seed)
    crafted = Loki(**params).craft(build_model(model_name, ds.input_shape, CLASSES), view)
    n = batch_size * steps
    idx = np.random.default_rng(seed).choice(len(ds), num_clients * n, replace=False)
    updates, weights = [], []
    for j, client in enumerate(clients):
        own = idx[j * n : (j + 1) * n]
        batches = [
            (ds.normalize(ds.images("train", b)), ds.labels("train", b))
            for b in np.split(own, steps)
        ]
        out = local_update(
            copy.deepcopy(crafted.per_client[client]), batches, protocol=protocol, lr=lr
        )
        updates.append(out.update)
        weights.append(out.num_examples)
    total = float(sum(weights))
    mean = {
        k: sum(w * u[k] for w, u in zip(weights, updates, strict=True)) / total for k in updates[0]
    }
    obs = Observation(
        round=1,
        client_id=None,
        protocol=protocol,
        model=crafted.model,  # type: ignore[arg-type]
        global_params={k: v.detach().clone() for k, v in crafted.model.state_dict().items()},
        update=mean,
        batch_size=batch_size,
        local_steps=steps,
        lr=lr,
        num_examples=int(total),
        input_shape=ds.input_shape,
        num_classes=CLASSES,
        data_mean=ds.mean,
        data_std=ds.std,
        num_clients=num_clients,
        members=clients,
        server_secrets={"loki": crafted.secrets},
    )
    return LokiRound(crafted, view, updates, obs, idx, np.repeat(np.arange(num_clients), n))


def score_round(ds: ImageData, rnd: LokiRound, result: AttackResult) -> dict[str, float]:
    """asr, coverage and leakage rate of ``result`` with the project's metrics (ground truth)."""
    originals = ds.images("train", rnd.idx)
    recon = ds.denormalize(result.inputs.detach().float().cpu()).clamp(0, 1)
    perm = metrics.match_reconstructions(originals, recon)
    ok = perm >= 0
    per_mse = metrics.mse(originals[ok], recon[perm[ok]])
    success = np.zeros(len(rnd.idx), dtype=bool)
    success[ok] = (per_mse <= ASR_MSE).numpy()
    return {
        "asr": metrics.attack_success_rate(per_mse, ASR_MSE, len(rnd.idx)),
        "coverage": metrics.coverage(perm),
        "leakage_rate": metrics.leakage_rate(success, rnd.owners, len(rnd.view.targets)),
    }


def measure_loki(
    num_clients: int, *, ds: ImageData | None = None, **kwargs: Any
) -> dict[str, float]:
    """Leakage of one LOKI round over ``num_clients`` clients on MNIST (default) or ``ds``.

    ``kwargs`` go to :func:`simulate_loki_round` (protocol, batch_size, local_steps, lr,
    model_name, seed, Loki's parameters). Returns asr, coverage, leakage_rate, the expected
    alone share, the attack's metrics and the seconds taken (craft, train, attack, score)."""
    start = time.perf_counter()
    ds = ds if ds is not None else load_mnist()
    rnd = simulate_loki_round(ds, num_clients, **kwargs)
    result = ATTACKS.create("loki")(rnd.obs)
    out = score_round(ds, rnd, result)
    out.update({f"attack.{k}": v for k, v in result.metrics.items()})
    out["expected_alone_share"] = float(rnd.crafted.secrets["expected_alone_share"])
    out["seconds"] = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------- synthetic checks


def _synthetic_view(clients: int = 3, protocol: str = "fedsgd", seed: int = 0) -> ServerView:
    g = torch.Generator().manual_seed(seed)
    ids = tuple(range(5, 5 + clients))
    return ServerView(
        round=1,
        clients=ids,
        targets=ids,
        input_shape=(1, 8, 8),
        num_classes=CLASSES,
        data_mean=(0.5,),
        data_std=(0.25,),
        protocol=protocol,
        batch_size=4,
        local_steps=2,
        lr=0.1,
        public_inputs=torch.randn(200, 1, 8, 8, generator=g),
        public_labels=torch.arange(200) % CLASSES,
        generator=g,
    )


def test_auto_bins_and_parameters_are_validated() -> None:
    assert auto_bins(8) == 32 and auto_bins(0) == 4
    assert expected_alone_share(8, auto_bins(8)) == pytest.approx((1 - 1 / 32) ** 7)
    assert isinstance(MODIFICATIONS.create("loki", bins_per_client=8), Loki)
    for bad in (
        {"bins_per_client": 1},
        {"bins_per_client": -3},
        {"bins_per_client": 2.5},
        {"bins_per_client": True},
        {"variant": "one_shot"},
        {"measurement": "contrast"},
        {"distribution": "laplace"},
        {"drift": 0.0},
        {"ratio": -1.0},
        {"perturbation": 0.0},
    ):
        with pytest.raises(ValueError) as err:
            Loki(**bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="tol"):
        LokiAttack(tol=-1.0)
    with pytest.raises(ConfigError, match="loki"):
        Loki().check_model(build_model("mlp", (1, 8, 8), CLASSES), (8, 8), CLASSES)  # type: ignore[arg-type]


def test_craft_gives_each_client_its_own_live_block_of_one_architecture() -> None:
    view = _synthetic_view(clients=3)
    torch.manual_seed(0)
    honest = build_model("convnet", (1, 8, 8), CLASSES)
    before = {k: v.clone() for k, v in honest.state_dict().items()}
    crafted = Loki(bins_per_client=6).craft(honest, view)
    assert all(torch.equal(before[k], v) for k, v in honest.state_dict().items())
    sec = crafted.secrets
    assert crafted.arch == {"front_block": {"rows": 18, "activation": "clamp"}}
    assert sec["clients"] == [5, 6, 7] and sec["blocks"] == {5: [0, 6], 6: [6, 12], 7: [12, 18]}
    assert sec["bins_per_client"] == 6 and sec["rows"] == 18 and sec["variant"] == "sparse"
    assert set(crafted.per_client) == {5, 6, 7}
    states = {c: m.state_dict() for c, m in crafted.per_client.items()}
    for c, (lo, hi) in sec["blocks"].items():
        w, b = states[c][WEIGHT], states[c][BIAS]
        off = torch.ones(18, dtype=torch.bool)
        off[lo:hi] = False
        assert bool((w[off] == 0).all()) and bool((b[off] == OFF_BIAS).all())
        assert bool((w[lo:hi].norm(dim=1) > 0).all())
        # the models differ only in which encoder rows are live
        other = states[5]
        assert all(
            torch.equal(v, other[k]) for k, v in states[c].items() if k not in (WEIGHT, BIAS)
        )
        client = build_architecture(
            build_model("convnet", (1, 8, 8), CLASSES), crafted.arch, (1, 8, 8)
        )
        client.load_state_dict(states[c])
    assert torch.equal(crafted.model.state_dict()[WEIGHT], states[5][WEIGHT])
    with pytest.raises(ConfigError, match="loki"):
        Loki().craft(honest, dataclasses.replace(view, targets=()))


def test_attack_refuses_missing_secrets_and_mismatched_shapes() -> None:
    view = _synthetic_view(clients=2)
    torch.manual_seed(0)
    crafted = Loki(bins_per_client=4).craft(build_model("mlp", (1, 8, 8), CLASSES), view)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.arange(4)
    update = local_update(
        copy.deepcopy(crafted.per_client[5]), [(x, y)], protocol="fedsgd", lr=0.1
    ).update
    obs = Observation(
        round=1,
        client_id=5,
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
    with pytest.raises(ThreatModelError, match="requires the server modification 'loki'"):
        ATTACKS.create("loki")(obs)
    with pytest.raises(ThreatModelError, match="loki"):  # imprint's secrets are not loki's
        ATTACKS.create("loki")(
            dataclasses.replace(obs, server_secrets={"imprint": crafted.secrets})
        )
    bad = {**crafted.secrets, "rows": 12}
    with pytest.raises(ThreatModelError, match="tile"):
        ATTACKS.create("loki")(dataclasses.replace(obs, server_secrets={"loki": bad}))
    cut = {k: v for k, v in update.items() if k != BIAS}
    with pytest.raises(ThreatModelError, match="block.encoder.bias"):
        ATTACKS.create("loki")(
            dataclasses.replace(obs, update=cut, server_secrets={"loki": crafted.secrets})
        )
    result = ATTACKS.create("loki")(
        dataclasses.replace(obs, server_secrets={"loki": crafted.secrets})
    )
    assert result.inputs.shape[1:] == (1, 8, 8) and result.metrics["blocks"] == 2.0
    assert result.metrics["leaking_blocks"] == 1.0  # only client 5 trained


# --------------------------------------------------------------------------- MNIST rounds


def _margin(p: float, records: int) -> float:
    """Allowed shortfall of the realised share below the expected alone share ``p``: three
    standard deviations of a mean of ``records`` Bernoulli(p) indicators (records of different
    clients are independent; those of one client nearly so, k = 4n bins), plus 0.05 for the
    bins' unequal masses (a normal fitted to MNIST's skewed brightness) and, over FedAvg's local
    steps, the bins' drift (imprint's own FedAvg tests see asr a few points below the alone
    share)."""
    return 3.0 * math.sqrt(p * (1.0 - p) / records) + 0.05


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("protocol", "steps", "variant"),
    [("fedsgd", 1, "sparse"), ("fedavg", 4, "sparse"), ("fedavg", 4, "cumulative")],
)
def test_aggregate_of_10_clients_leaks_each_clients_alone_records(
    mnist: ImageData, protocol: str, steps: int, variant: str
) -> None:
    rnd = simulate_loki_round(
        mnist,
        10,
        protocol=protocol,
        batch_size=8,
        local_steps=steps,
        lr=0.1,
        seed=1,
        variant=variant,
    )
    sec = rnd.crafted.secrets
    # (a) a client's update touches no encoder row (nor decoder column) outside its block
    for client, update in zip(rnd.view.targets, rnd.updates, strict=True):
        lo, hi = sec["blocks"][client]
        off = torch.ones(sec["rows"], dtype=torch.bool)
        off[lo:hi] = False
        assert bool((update[WEIGHT][off] == 0).all()) and bool((update[BIAS][off] == 0).all())
        assert bool((update["block.decoder.weight"][:, off] == 0).all())
        assert bool((update[BIAS][lo:hi] != 0).any())
    assert all(bool(torch.isfinite(v).all()) for v in rnd.obs.update.values())
    result = ATTACKS.create("loki")(rnd.obs)
    scores = score_round(mnist, rnd, result)
    n = 8 * steps
    p = expected_alone_share(n, auto_bins(n))
    assert sec["expected_alone_share"] == pytest.approx(p)
    # (b) the recovered share reaches the expected alone share up to sampling noise
    assert scores["asr"] >= p - _margin(p, 10 * n), (scores, p)
    assert result.inputs.shape[0] <= 10 * n and result.metrics["blocks"] == 10.0
    # (c) every client leaks: a client has no record alone only if its n records pair up in
    # at most n/2 of its 4n bins, probability <= C(4n, n/2) (1/8)^n (2e-3 for n = 8)
    assert scores["leakage_rate"] >= 0.9, scores
    assert result.metrics["leaking_blocks"] >= 9.0
    # each block's exact reconstructions are records of that block's client (attribution)
    originals = mnist.images("train", rnd.idx).flatten(1)
    for j, client in enumerate(rnd.view.targets):
        lo, hi = sec["blocks"][client]
        flat, _ = recover_bins(
            rnd.obs.update[WEIGHT][lo:hi],
            rnd.obs.update[BIAS][lo:hi],
            sec["variant"],
            tol=1e-6,
            cap=n,
        )
        recon = mnist.denormalize(flat.float().view(-1, *mnist.input_shape)).clamp(0, 1).flatten(1)
        cost = metrics.mse_cost_matrix(originals, recon)
        best, owner = cost.min(0).values, rnd.owners[cost.argmin(0).numpy()]
        assert bool((owner[(best <= ASR_MSE).numpy()] == j).all())


@pytest.mark.shared_data
def test_cumulative_variant_and_measurement_helper(mnist: ImageData) -> None:
    out = measure_loki(10, ds=mnist, protocol="fedsgd", batch_size=8, seed=2, variant="cumulative")
    p = out["expected_alone_share"]
    assert p == pytest.approx(expected_alone_share(8, 32))
    assert out["asr"] >= p - _margin(p, 80), out
    assert out["leakage_rate"] >= 0.9 and out["attack.blocks"] == 10.0
