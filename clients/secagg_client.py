"""The SecAgg+ client (Flower's workflow path): the same local update, masked by SecAgg+.

Flower 1.41 runs SecAgg+ only on its workflow path: a ``ClientApp`` built from a
``client_fn`` with ``flwr.client.mod.secaggplus_mod`` (Bell et al., CCS 2020). The training
itself is :func:`clients.client_app.train_client`, shared with the Message-API client: same
seeded batches, defenses and their state in the node's ``Context.state``; only the transport
differs.

SecAgg+ sums what the clients return, weighted by their example counts, so a client returns
its full model rather than its update:

- FedAvg: ``θ + Δ`` (the aggregate minus ``θ`` is the weighted mean delta);
- FedSGD: ``θ − g`` for the trainable parameters, a unit step (``θ`` minus the aggregate is
  the weighted mean gradient); floating-point buffers ``b + Δb`` in both protocols.

A malicious server may send another architecture (``fl-privsim-arch`` in the config, as on the
Message path); the client builds it and returns that model's weights. Only the
floating-point ``state_dict`` entries travel, in ``state_dict`` order (every client
must send the same shapes). ``num_examples`` and the metrics (the train metrics plus the
declared metadata under ``meta.<key>``) reach the server in plaintext, as Flower sends them.

Flower's stochastic rounding draws from numpy's global RNG; :meth:`SecAggClient.fit` seeds it
from (run seed, round, client) so that the same config and seed give the same run. A real
client would keep that randomness private; here the server knows the seed but no attack uses it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from clients.client_app import (
    CONFIG_KEY,
    build_client_model,
    client_config,
    evaluate_client,
    partition_id,
    train_client,
)
from clients.defenses.base import ModelRefused
from fl_privsim.core.architecture import ARCH_KEY, build_architecture
from fl_privsim.core.config import Config
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.models import build_model
from fl_privsim.core.seeding import seed_int
from fl_privsim.engine.federated_data import federated_data

log = logging.getLogger(__name__)

#: FitIns config keys: the client sections of the run config are under ``CONFIG_KEY`` as TOML
#: (as on the Message path, :mod:`fl_privsim.core.client_config`).
ROUND_KEY = "server-round"
META_PREFIX = "meta."


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The ``state_dict`` names that SecAgg+ carries (floating point), in order."""
    return [k for k, v in state.items() if v.is_floating_point()]


def full_weights(
    global_state: dict[str, torch.Tensor],
    update: dict[str, torch.Tensor],
    protocol: str,
    param_names: set[str],
) -> list[np.ndarray]:
    """What the client hands to SecAgg+: ``θ + Δ`` (FedAvg, buffers) or ``θ − g`` (FedSGD
    parameters), float64, one array per floating-point entry of ``global_state``."""
    out = []
    for k in float_keys(global_state):
        g = global_state[k].detach().cpu().double()
        u = update[k].detach().cpu().double() if k in update else torch.zeros_like(g)
        out.append((g - u if protocol == "fedsgd" and k in param_names else g + u).numpy())
    return out


def state_from_arrays(
    cfg: Config, arrays: list[np.ndarray], arch_spec: str | None = None
) -> dict[str, torch.Tensor]:
    """The model ``state_dict`` whose floating-point entries are ``arrays`` (in order); the other
    entries (integer counters) keep the freshly built model's values, as on the server. With
    ``arch_spec`` (a malicious server's ``fl-privsim-arch``) the template is that architecture."""
    fed = federated_data(cfg)
    model = build_model(cfg.model.name, fed.data.input_shape, fed.data.num_classes)
    if arch_spec:
        model = build_architecture(model, arch_spec, fed.data.input_shape)
    template = model.state_dict()
    keys = float_keys(template)
    if len(keys) != len(arrays):
        raise ValueError(f"expected {len(keys)} arrays, got {len(arrays)}")
    state = dict(template)
    state.update(
        {
            k: torch.as_tensor(np.asarray(a)).to(template[k].dtype)
            for k, a in zip(keys, arrays, strict=True)
        }
    )
    return state


class SecAggClient(NumPyClient):
    """One simulated client on the workflow path; its node's ``Context`` keeps defense state."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.pid = partition_id(context)

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        """Tell the server which client (partition) this node is."""
        return {"partition_id": self.pid}

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict]:
        """Train on the model in ``parameters``; return the full weights, the example count and
        the metrics plus the declared metadata (``meta.*``)."""
        cfg: Config = client_config(str(config[CONFIG_KEY]))
        server_round = int(config[ROUND_KEY])
        device = resolve_device(cfg.federation.device)
        spec = str(config[ARCH_KEY]) if ARCH_KEY in config else None
        state = state_from_arrays(cfg, parameters, spec)
        model = build_client_model(cfg, state, device, spec)
        param_names = {n for n, p in model.named_parameters() if p.requires_grad}
        try:
            reply = train_client(cfg, self.pid, model, server_round, self.context.state, device)
        except ModelRefused as exc:  # SecAgg+ then counts this client as dropped
            log.info("client %d refused the model of round %d: %s", self.pid, server_round, exc)
            raise
        weights = full_weights(state, reply.update, cfg.federation.protocol, param_names)
        # flwr 1.41's secaggplus_mod rounds stochastically with numpy's global RNG right after
        # fit returns, in this process: seed it from (seed, round, client) so a run repeats.
        np.random.seed(seed_int(cfg.seed, server_round, self.pid, "secagg_rounding") % 2**32)
        metrics: dict[str, Any] = {k: float(v) for k, v in reply.metrics.items()}
        metrics.update({META_PREFIX + k: v for k, v in reply.meta.items()})
        return weights, reply.num_examples, metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict]:
        """Federated evaluation on this client's local test shard (not secure-aggregated)."""
        cfg: Config = client_config(str(config[CONFIG_KEY]))
        device = resolve_device(cfg.federation.device)
        model = build_client_model(cfg, state_from_arrays(cfg, parameters), device)
        metrics = evaluate_client(cfg, self.pid, model, device)
        return (
            float(metrics["loss"]),
            int(metrics["num-examples"]),
            {"accuracy": metrics["accuracy"], META_PREFIX + "client-id": self.pid},
        )


def client_fn(context: Context) -> Any:
    """Flower's client factory: a :class:`SecAggClient` for this node."""
    return SecAggClient(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
