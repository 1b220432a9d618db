"""Flower's central DP wrappers on our update encoding, without Ray.

1. Hand-built replies through ``server_fixed``: every update is clipped to C, the mean is
   uniform, the noise on the released model has std σC/m, and the curious server still
   sees the raw updates.
2. The real ClientApp (with its mods) in-process: client-side clipping with Flower's mods
   gives exactly the model that server-side clipping gives (same seed), and the curious
   server sees clipped updates only in the client-side modes.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from adversaries.base import Observation
from clients.client_app import CONFIG_KEY, handle_train
from fl_privsim.core import config as config_mod
from fl_privsim.core.client_config import client_config_text
from fl_privsim.core.config import CentralDPConfig
from fl_privsim.core.models import build_model
from fl_privsim.engine.federated_data import federated_data
from strategies.central_dp import CentralDP
from strategies.fedupdates import FedUpdates, discover_clients
from strategies.honest_but_curious import HonestButCurious, ModelInfo
from strategies.server_app import initial_model
from tests.integration.inprocess import InProcessGrid


class RecordingObserver:
    """Targets every client; keeps what the curious server saw."""

    def __init__(self, clients) -> None:
        self.clients = set(clients)
        self.seen: list[Observation] = []

    def targets(self, server_round):
        return self.clients, False

    def observe(self, server_round, observations):
        self.seen.extend(observations)


def _norm(update: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in update.values())))


# --------------------------------------------------------------------------- hand-built replies

D = 200_000  # noise samples: the std estimate's relative standard error is 1/sqrt(2D) ≈ 0.0016
NORMS = (0.5, 3.0, 10.0)  # one update under C = 1, two clipped
NUM_EXAMPLES = (1, 50, 7)  # must not matter: central DP averages uniformly


def _hand_built_round(protocol: str, server_lr: float, sigma: float, clip: float = 1.0):
    gen = torch.Generator().manual_seed(0)
    theta = OrderedDict(w=torch.randn(D, generator=gen), b=torch.randn(10, generator=gen))
    updates = []
    for norm in NORMS:
        u = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
        scale = norm / _norm(u)
        updates.append({k: v * scale for k, v in u.items()})
    rows: list[tuple] = []
    inner = FedUpdates(
        protocol=protocol,
        server_lr=server_lr,
        param_names=["w", "b"],
        clients_per_round=3,
        seed=0,
        node_to_client={1000: 0, 1001: 1, 1002: 2},
        metric_sink=lambda r, c, s, v: rows.append((r, c, s, v)),
    )
    central = CentralDP(
        inner,
        settings=CentralDPConfig(mode="server_fixed", noise_multiplier=sigma, clipping_norm=clip),
        num_clients=3,
        seed=0,
    )
    model = torch.nn.Module()  # the curious server's copy of the model (no attack runs here)
    model.w, model.b = torch.nn.Parameter(torch.zeros(D)), torch.nn.Parameter(torch.zeros(10))
    info = ModelInfo(
        model=model,
        input_shape=(1, 1, 1),
        num_classes=2,
        data_mean=(0.0,),
        data_std=(1.0,),
        protocol=protocol,
        batch_size=1,
        local_steps=1,
        lr=0.1,
    )
    observer = RecordingObserver({0, 1, 2})
    strategy = HonestButCurious(central, info=info, observer=observer)
    sent = list(strategy.configure_train(1, ArrayRecord(theta), ConfigRecord({}), grid=None))
    assert sorted(m.metadata.dst_node_id for m in sent) == [1000, 1001, 1002]
    replies = []
    for msg in sent:
        cid = msg.metadata.dst_node_id - 1000
        content = RecordDict(
            {
                "arrays": ArrayRecord(OrderedDict(updates[cid])),
                "metrics": MetricRecord({"num-examples": NUM_EXAMPLES[cid], "loss": 0.0}),
                "meta": ConfigRecord({"client-id": cid}),
            }
        )
        replies.append(Message(content=content, reply_to=msg))
    new, _ = strategy.aggregate_train(1, replies)
    clipped = [{k: v * min(1.0, clip / _norm(u)) for k, v in u.items()} for u in updates]
    mean = {k: sum(c[k] for c in clipped) / 3 for k in theta}
    sign = -1.0 if protocol == "fedsgd" else 1.0
    step = {k: (new.to_torch_state_dict()[k] - theta[k]) * sign / server_lr for k in theta}
    return step, mean, observer, central, rows


@pytest.mark.parametrize(("protocol", "server_lr"), [("fedavg", 1.0), ("fedsgd", 0.5)])
def test_server_fixed_clips_each_update_and_averages_uniformly(protocol, server_lr) -> None:
    step, mean, observer, _, _ = _hand_built_round(protocol, server_lr, sigma=0.0)
    # No noise: the model moved by exactly the uniform mean of the updates clipped to C = 1.
    for k in mean:
        torch.testing.assert_close(step[k], mean[k], atol=2e-6, rtol=1e-5)
    assert _norm(mean) <= 1.0 + 1e-5
    # The honest-but-curious server saw every update as sent (raw, unclipped).
    assert sorted(round(_norm(o.update), 4) for o in observer.seen) == list(NORMS)


@pytest.mark.parametrize(("protocol", "server_lr"), [("fedavg", 1.0), ("fedsgd", 0.5)])
def test_server_fixed_noise_has_std_sigma_c_over_m(protocol, server_lr) -> None:
    sigma, clip, m = 2.0, 1.0, 3
    step, mean, observer, central, rows = _hand_built_round(
        protocol, server_lr, sigma=sigma, clip=clip
    )
    noise = torch.cat([(step[k] - mean[k]).flatten() for k in mean]).double()
    expected = sigma * clip / m  # Flower's compute_stdv: σ·C / num_sampled_clients
    # D + 10 ≈ 2e5 samples: the std estimate is within 1% (≈ 6 standard errors) and the mean
    # within 0.01 (≈ 6.7 standard errors of s/sqrt(D) = 0.0015) of N(0, s²).
    assert noise.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(noise.mean().item()) < 0.01
    # the noise is Gaussian-shaped: ~68.3% of entries within one std
    within = (noise.abs() < expected).double().mean().item()
    assert within == pytest.approx(0.6827, abs=0.005)
    # and it is reproducible (seeded per round) and accounted
    step2, _, _, _, _ = _hand_built_round(protocol, server_lr, sigma=sigma, clip=clip)
    torch.testing.assert_close(step2["w"], step["w"])
    dp_rows = {s_v[0]: s_v[1] for r, c, src, v in rows if src == "central_dp" for s_v in v.items()}
    assert dp_rows["noise_std"] == pytest.approx(expected)
    assert (
        dp_rows["epsilon"] == pytest.approx(central.accountant.epsilon()) and dp_rows["epsilon"] > 0
    )
    assert sorted(round(_norm(o.update), 4) for o in observer.seen) == list(NORMS)


# --------------------------------------------------------------------------- real ClientApp

SMALL = [
    "federation.num_clients=4",
    "federation.clients_per_round=3",
    "federation.rounds=1",
    'federation.device="cpu"',
    "federation.fraction_evaluate=0",
]


def _real_round(mode: str, **dp):
    cfg = config_mod.load(
        None,
        [
            *SMALL,
            f'federation.central_dp.mode="{mode}"',
            *(f"federation.central_dp.{k}={v}" for k, v in dp.items()),
        ],
    )
    model = initial_model(cfg)
    grid = InProcessGrid(4, use_client_app=True)
    mapping = discover_clients(grid, expected=4)
    inner = FedUpdates(
        protocol=cfg.federation.protocol,
        server_lr=cfg.federation.server_lr,
        param_names=[n for n, _ in model.named_parameters()],
        clients_per_round=3,
        seed=cfg.seed,
        node_to_client=mapping,
        extra_config={CONFIG_KEY: client_config_text(cfg)},
        fraction_evaluate=0,
    )
    trained = (
        inner
        if mode == "off"
        else CentralDP(inner, settings=cfg.federation.central_dp, num_clients=4, seed=cfg.seed)
    )
    fed = federated_data(cfg)
    info = ModelInfo(
        model=build_model(cfg.model.name, fed.data.input_shape, fed.data.num_classes),
        input_shape=fed.data.input_shape,
        num_classes=fed.data.num_classes,
        data_mean=fed.data.mean,
        data_std=fed.data.std,
        protocol=cfg.federation.protocol,
        batch_size=cfg.client.batch_size,
        local_steps=1,
        lr=cfg.client.lr,
    )
    observer = RecordingObserver(range(4))
    strategy = HonestButCurious(trained, info=info, observer=observer)
    sent = list(
        strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord({}), grid)
    )
    replies = grid.send_and_receive(sent)
    assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
    new, _ = strategy.aggregate_train(1, replies)
    return cfg, sent, replies, new.to_torch_state_dict(), observer


@pytest.mark.parametrize(
    ("server_mode", "client_mode", "dp"),
    [
        ("server_fixed", "client_fixed", {"clipping_norm": 0.05, "noise_multiplier": 0.5}),
        (
            "server_adaptive",
            "client_adaptive",
            {"initial_clipping_norm": 0.05, "noise_multiplier": 0.5, "clipped_count_stddev": 1.0},
        ),
    ],
)
def test_client_side_mods_clip_the_update_like_the_server_side(
    server_mode, client_mode, dp
) -> None:
    c = dp.get("clipping_norm", dp.get("initial_clipping_norm"))
    _, _, _, server_model, server_seen = _real_round(server_mode, **dp)
    _, sent, replies, client_model, client_seen = _real_round(client_mode, **dp)
    # Flower's wrapper told the clients C; Flower's mod clipped the update itself (a FedSGD
    # gradient), not "gradient - weights": same released model as server-side clipping.
    assert all(float(m.content["config"]["clipping_norm"]) == pytest.approx(c) for m in sent)
    for k in server_model:
        torch.testing.assert_close(client_model[k], server_model[k], atol=1e-6, rtol=1e-5)
    # Threat model: server-side modes show the curious server raw updates, client-side clipped ones.
    assert len(server_seen.seen) == len(client_seen.seen) == 3
    assert max(_norm(o.update) for o in server_seen.seen) > 2 * c
    assert all(_norm(o.update) <= c * (1 + 1e-4) for o in client_seen.seen)
    if client_mode == "client_adaptive":
        assert all(int(r.content["metrics"][KEY_NORM_BIT]) == 1 for r in replies)


def test_the_mod_is_inert_when_central_dp_is_off() -> None:
    _cfg, sent, replies, _, _ = _real_round("off")
    for msg, reply in zip(sent, replies, strict=True):
        assert "clipping_norm" not in msg.content["config"]
        assert KEY_NORM_BIT not in reply.content["metrics"]
        direct = handle_train(msg, InProcessGrid(4).contexts[msg.metadata.dst_node_id])
        for k, v in direct.content["arrays"].to_torch_state_dict().items():
            torch.testing.assert_close(reply.content["arrays"].to_torch_state_dict()[k], v)


def test_clipping_mod_answers_the_real_message_when_the_server_sent_no_norm() -> None:
    """A client_fixed run whose server did not use Flower's client-side wrapper: Flower's
    mod refuses, and the error is a reply to the message the client received."""
    cfg = config_mod.load(None, [*SMALL, 'federation.central_dp.mode="client_fixed"'])
    model = initial_model(cfg)
    grid = InProcessGrid(4, use_client_app=True)
    mapping = discover_clients(grid, expected=4)
    inner = FedUpdates(
        protocol="fedsgd",
        server_lr=0.5,
        param_names=[n for n, _ in model.named_parameters()],
        clients_per_round=3,
        seed=0,
        node_to_client=mapping,
        extra_config={CONFIG_KEY: client_config_text(cfg)},
    )
    sent = list(inner.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord({}), grid))
    replies = grid.send_and_receive(sent[:1])
    assert replies[0].has_error() and "clipping_norm" in replies[0].error.reason
    assert replies[0].metadata.reply_to_message_id == sent[0].metadata.message_id
    assert replies[0].metadata.dst_node_id == sent[0].metadata.src_node_id
