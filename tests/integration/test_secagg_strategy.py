"""The SecAgg+ strategy without Ray: fake client proxies, the clients' real local updates, and
the exact weighted mean of their full models standing in for what SecAgg+ unmasks (the e2e test
covers the real protocol and its rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common import (
    Code,
    FitRes,
    GetPropertiesRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from clients.client_app import CONFIG_KEY, train_client
from clients.secagg_client import full_weights, state_from_arrays
from fl_privsim.core import config as config_mod
from fl_privsim.core.client_config import client_config_text
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.results import RunFolder
from fl_privsim.engine.secure_aggregation import resolve
from strategies.fedupdates import FedUpdates, weighted_mean_update
from strategies.secure_aggregation import SecAggStrategy
from strategies.server_app import initial_model, model_info, run_server

SA = [
    'federation.secure_aggregation.mode="secagg+"',
    'attacks=[{name="analytic", targets={clients=[], aggregate=true}}]',
    "federation.num_clients=5",
    "federation.clients_per_round=3",
    'federation.device="cpu"',
    "federation.server_lr=0.7",
]


class FakeProxy(ClientProxy):
    """A node that only answers the partition-id query."""

    def __init__(self, node_id: int, pid: int) -> None:
        super().__init__(str(node_id))
        self.node_id, self.pid = node_id, pid

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(Status(Code.OK, ""), {"partition_id": self.pid})

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class Seen:
    def __init__(self):
        self.observations = []

    def targets(self, server_round):
        return set(), True

    def observe(self, server_round, observations):
        self.observations.extend(observations)


def _strategy(cfg, observer):
    model = initial_model(cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    metrics: list = []

    def make(mapping):
        return FedUpdates(
            protocol=cfg.federation.protocol,
            server_lr=cfg.federation.server_lr,
            param_names=names,
            clients_per_round=cfg.federation.clients_per_round,
            seed=cfg.seed,
            node_to_client=mapping,
        )

    strategy = SecAggStrategy(
        initial_state=model.state_dict(),
        make_updates=make,
        toml=client_config_text(cfg),
        num_clients=cfg.federation.num_clients,
        clients_per_round=cfg.federation.clients_per_round,
        info=model_info(cfg),
        observer=observer,
        evaluate_round=lambda r, a: {"accuracy": 0.0, "loss": 0.0},
        sink=lambda *row: metrics.append(row),
        settings=resolve(cfg),
    )
    manager = SimpleClientManager()
    for pid in range(cfg.federation.num_clients):
        manager.register(FakeProxy(100 + 7 * pid, pid))  # node ids unrelated to partition ids
    return strategy, manager, metrics


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_one_round_matches_the_plain_update_rule_and_observes_one_aggregate(protocol):
    cfg = config_mod.load(None, [*SA, f'federation.protocol="{protocol}"', "client.local_steps=2"])
    seen = Seen()
    strategy, manager, metrics = _strategy(cfg, seen)
    params = strategy.initialize_parameters(manager)
    instructions = strategy.configure_fit(1, params, manager)
    sampled = sorted(p.pid for p, _ in instructions)
    assert sampled == strategy.updates.sample_clients(1, 3)  # the plain path's deterministic sample
    assert all(ins.config[CONFIG_KEY] == client_config_text(cfg) for _, ins in instructions)

    global_state = initial_model(cfg).state_dict()
    results, updates, counts, fulls = [], [], [], []
    for proxy, ins in instructions:  # each client, as clients/secagg_client.py computes it
        state = state_from_arrays(cfg, parameters_to_ndarrays(ins.parameters))
        model = initial_model(cfg)
        model.load_state_dict(state)
        reply = train_client(cfg, proxy.pid, model, 1, RecordDict(), torch.device("cpu"))
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        fulls.append(full_weights(state, reply.update, protocol, names))
        updates.append(reply.update)
        counts.append(reply.num_examples)
        results.append(
            (proxy, {"loss": reply.metrics["loss"], "meta.batch-size": reply.meta["batch-size"]})
        )
    mean = [
        sum(n * f[i] for n, f in zip(counts, fulls, strict=True)) / sum(counts)
        for i in range(len(fulls[0]))
    ]
    fit_results = [
        (p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), n, m))
        for (p, m), n in zip(results, counts, strict=True)
    ]
    new_params, _ = strategy.aggregate_fit(1, fit_results, [])

    plain = FedUpdates(
        protocol=protocol,
        server_lr=0.7,
        param_names=names,
        clients_per_round=3,
        seed=cfg.seed,
        node_to_client={i: i for i in range(5)},
    )
    avg = weighted_mean_update(updates, [float(n) for n in counts])
    expected = plain.apply_update(ArrayRecord(global_state), ArrayRecord(avg)).to_torch_state_dict()
    got = strategy.to_state(new_params)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=2e-7, rtol=1e-6)

    (obs,) = seen.observations
    assert obs.is_aggregate and obs.members == tuple(sampled) and obs.num_examples == sum(counts)
    assert obs.num_clients == 3 and obs.batch_size == reply.meta["batch-size"]
    for k, v in avg.items():
        torch.testing.assert_close(obs.update[k], v.to(obs.update[k].dtype), atol=2e-7, rtol=1e-6)
    report = strategy.report()
    assert report["rounds_aggregated"] == [1] and report["halted_rounds"] == []
    assert [row["client"] for row in report["side_channels"]["1"]] == sampled
    assert {row[2] for row in metrics} == {"client_train"}  # the plaintext metrics were logged


def test_a_round_that_secagg_halts_is_reported_and_leaves_the_model():
    cfg = config_mod.load(None, SA)
    strategy, manager, _ = _strategy(cfg, None)
    params = strategy.initialize_parameters(manager)
    strategy.configure_fit(1, params, manager)  # SecAgg+ halts: aggregate_fit is never called
    strategy.configure_fit(2, params, manager)
    assert strategy.report()["halted_rounds"] == [1, 2]
    before = [a.copy() for a in parameters_to_ndarrays(params)]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            before, parameters_to_ndarrays(strategy.to_parameters(strategy.state)), strict=True
        )
    )


def test_the_plain_server_refuses_a_secagg_config(tmp_path):
    """``flwr run`` and run_server are the Message path: they must not train in the clear."""
    cfg = config_mod.load(None, SA)
    with pytest.raises(ConfigError, match="workflow path"):
        run_server(None, cfg, RunFolder(tmp_path / "run"))  # type: ignore[arg-type]
