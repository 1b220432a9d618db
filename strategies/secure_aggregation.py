"""The server behind Flower's SecAgg+ (workflow path): it sees only what Flower unmasks.

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020; Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017) runs in flwr 1.41 only on the workflow path:
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` over a ``LegacyContext`` and a
``flwr.server.strategy.Strategy``. :class:`SecAggStrategy` is that strategy; it trains the same
federation as the Message-API path (:mod:`strategies.server_app`):

- the same deterministic client sample (:meth:`strategies.fedupdates.FedUpdates.sample_clients`)
  and the same update rule (:meth:`~strategies.fedupdates.FedUpdates.apply_update`);
- clients return full models (:mod:`clients.secagg_client`); every ``FitRes`` that reaches
  :meth:`SecAggStrategy.aggregate_fit` holds the same unmasked weighted mean, from which the
  mean delta (FedAvg: aggregate − θ) or mean gradient (FedSGD: θ − aggregate) follows;
- that mean is ONE aggregate :class:`~adversaries.base.Observation` for the attack runner;
- ``num_examples`` and the metrics each client sends are plaintext in Flower's SecAgg+: they
  are recorded as observed side channels.

A round that SecAgg+ halts (too few clients left for the threshold) never calls
``aggregate_fit``; the next ``configure_fit`` (or :meth:`SecAggStrategy.report`) records it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from clients.client_app import CONFIG_KEY
from clients.secagg_client import META_PREFIX, ROUND_KEY, float_keys
from fl_privsim import config as config_mod
from fl_privsim.config import Config
from fl_privsim.devices import resolve_device
from fl_privsim.progress import Progress
from fl_privsim.results import RunFolder
from fl_privsim.secure_aggregation import SecAggSettings, quantization_error_bound, resolve
from strategies.fedupdates import FedUpdates, MetricSink
from strategies.honest_but_curious import ModelInfo, Observer, build_observation

log = logging.getLogger(__name__)


class SecAggStrategy(Strategy):
    """FedSGD/FedAvg behind SecAgg+, with an honest-but-curious observer of the aggregate.

    Parameters
    ----------
    initial_state:
        The round-0 model ``state_dict`` (only its floating-point entries travel).
    make_updates:
        Builds the :class:`FedUpdates` (sampling and update rule) from ``{node_id: client_id}``.
    toml:
        The resolved run config, sent to the clients under ``CONFIG_KEY``.
    num_clients, clients_per_round:
        Federation size and sample size.
    info, observer:
        The server's model knowledge and the attack runner (``None``: nobody observes).
    evaluate_round:
        Central evaluation ``(round, ArrayRecord) -> metrics``.
    sink:
        Per-client metric sink.
    settings:
        The SecAgg+ parameters (for the summary and the error bound).
    fraction_evaluate:
        Share of clients in (plaintext) federated evaluation; 0 turns it off.
    save_dir:
        When set, each round's unmasked aggregate update (what the server saw) is saved there.
    """

    def __init__(self, *, initial_state: dict[str, torch.Tensor], make_updates: Callable[[dict[int, int]], FedUpdates],
                 toml: str, num_clients: int, clients_per_round: int, info: ModelInfo, observer: Observer | None,
                 evaluate_round: Callable[[int, ArrayRecord], dict[str, float]], sink: MetricSink,
                 settings: SecAggSettings, fraction_evaluate: float = 0.0, save_dir: Path | None = None) -> None:
        self.state = {k: v.detach().cpu().clone() for k, v in initial_state.items()}
        self.keys = float_keys(self.state)
        self.make_updates = make_updates
        self.updates: FedUpdates | None = None
        self.toml = toml
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.info = info
        self.observer = observer
        self.evaluate_round = evaluate_round
        self.sink = sink
        self.settings = settings
        self.fraction_evaluate = fraction_evaluate
        self.save_dir = save_dir
        self.node_to_client: dict[int, int] = {}
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self.sampled: dict[int, list[int]] = {}
        self.aggregated: list[int] = []
        self.dropouts: dict[int, int] = {}
        self.side_channels: dict[int, list[dict[str, Any]]] = {}
        self.max_error_bound: dict[int, float] = {}
        self.failures = 0  # observer failures

    # ------------------------------------------------------------------ state <-> arrays
    def to_parameters(self, state: dict[str, torch.Tensor]) -> Parameters:
        """The floating-point entries of ``state``, in order, as Flower ``Parameters``."""
        return ndarrays_to_parameters([state[k].detach().cpu().numpy() for k in self.keys])

    def to_state(self, parameters: Parameters) -> dict[str, torch.Tensor]:
        """``parameters`` as a full ``state_dict`` (non-float entries from the current state)."""
        arrays = parameters_to_ndarrays(parameters)
        state = dict(self.state)
        for k, a in zip(self.keys, arrays, strict=True):
            state[k] = torch.as_tensor(np.asarray(a)).to(self.state[k].dtype)
        return state

    # ------------------------------------------------------------------ Strategy API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The round-0 model."""
        return self.to_parameters(self.state)

    def _discover(self, client_manager: ClientManager) -> FedUpdates:
        if self.updates is None:
            if not client_manager.wait_for(self.num_clients, timeout=600):
                raise RuntimeError(f"fewer than {self.num_clients} client nodes connected within 600 s")
            for proxy in client_manager.all().values():
                if proxy.node_id not in self.node_to_client:
                    res = proxy.get_properties(GetPropertiesIns({}), timeout=None, group_id=None)
                    self.node_to_client[proxy.node_id] = int(res.properties["partition_id"])
            self.updates = self.make_updates(dict(self.node_to_client))
        return self.updates

    def _proxies(self, client_manager: ClientManager) -> dict[int, ClientProxy]:
        by_node = {p.node_id: p for p in client_manager.all().values()}
        return {c: by_node[n] for n, c in self.node_to_client.items() if n in by_node}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Send the global model and the run config to this round's deterministic sample."""
        updates = self._discover(client_manager)
        self._note_halted(server_round)
        self.state = self.to_state(parameters)
        self._sent = {server_round: self.state}
        self.info.model.load_state_dict(self.state)
        clients = updates.sample_clients(server_round, self.clients_per_round)
        self.sampled[server_round] = clients
        log.info("round %d: SecAgg+ clients %s", server_round, clients)
        proxies = self._proxies(client_manager)
        config: dict[str, Scalar] = {CONFIG_KEY: self.toml, ROUND_KEY: server_round}
        return [(proxies[c], FitIns(parameters, dict(config))) for c in clients]

    def halted_rounds(self) -> list[int]:
        """Rounds whose clients were sampled but whose aggregate never reached the strategy."""
        return sorted(r for r in self.sampled if r not in self.aggregated)

    def _note_halted(self, server_round: int) -> None:
        if server_round - 1 in self.halted_rounds():
            log.warning("round %d: SecAgg+ halted; the model was not updated", server_round - 1)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None,
                                                                                          dict[str, Scalar]]:
        """Turn the unmasked mean into the update, observe it, apply it."""
        updates = self.updates
        if updates is None or not results:
            return None, {}
        self.aggregated.append(server_round)
        self.dropouts[server_round] = len(failures)
        for f in failures:
            reason = repr(f if isinstance(f, BaseException) else f[1].status)[:300]
            updates.client_errors.append({"round": server_round, "client": None, "kind": "failed", "reason": reason})
        mean = parameters_to_ndarrays(results[0][1].parameters)
        members, total, meta, channels = self._plaintext(server_round, results)
        self.side_channels[server_round] = channels
        self.max_error_bound[server_round] = quantization_error_bound(self.settings, len(results), total)
        update = self.update_from_mean(server_round, mean)
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"round": server_round, "global": self._sent[server_round], "update": update,
                        "members": members, "num_examples": total},
                       self.save_dir / f"round_{server_round:03d}.pt")
        self._observe(server_round, update, meta, total, members)
        new = updates.apply_update(ArrayRecord(self._sent[server_round]), ArrayRecord(update))
        self.state = new.to_torch_state_dict()
        return self.to_parameters(self.state), {}

    def _plaintext(self, server_round: int, results: list[tuple[ClientProxy, FitRes]]
                   ) -> tuple[tuple[int, ...], int, dict[str, Any], list[dict[str, Any]]]:
        """What reaches the server unmasked: example counts and metrics (logged as client_train)."""
        rows = sorted(((self.node_to_client[p.node_id], r) for p, r in results), key=lambda x: x[0])
        channels, meta = [], {}
        for cid, res in rows:
            metrics = dict(res.metrics)
            declared = {k.removeprefix(META_PREFIX): v for k, v in metrics.items() if k.startswith(META_PREFIX)}
            train = {k: v for k, v in metrics.items() if not k.startswith(META_PREFIX)}
            meta = meta or declared
            self.sink(server_round, cid, "client_train", train)  # type: ignore[arg-type]
            channels.append({"client": cid, "num_examples": int(res.num_examples), "metric_keys": sorted(metrics)})
        return tuple(c for c, _ in rows), sum(int(r.num_examples) for _, r in rows), meta, channels

    def update_from_mean(self, server_round: int, mean: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The averaged update behind the unmasked mean model: ``mean − θ`` (FedAvg, buffers), or
        ``θ − mean`` for FedSGD's trainable parameters (the clients took a unit step)."""
        assert self.updates is not None
        sent = self._sent[server_round]
        out: dict[str, torch.Tensor] = {}
        for k, m in zip(self.keys, mean, strict=True):
            g = sent[k].double()
            a = torch.as_tensor(np.asarray(m, dtype=np.float64))
            d = g - a if self.updates.protocol == "fedsgd" and k in self.updates.param_names else a - g
            out[k] = d.to(sent[k].dtype)
        return out

    def _observe(self, server_round: int, update: dict[str, torch.Tensor], meta: dict[str, Any], total: int,
                 members: tuple[int, ...]) -> None:
        if self.observer is None:
            return
        try:
            _, want_aggregate = self.observer.targets(server_round)
            if want_aggregate:
                obs = build_observation(self.info, server_round, self._sent[server_round], None, update, meta,
                                        total, len(members), members)
                self.observer.observe(server_round, [obs])
        except Exception:  # an attack must never stop training
            self.failures += 1
            log.exception("observation of round %d failed; training continues", server_round)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Federated evaluation (plaintext, not secure-aggregated) on the same share of clients
        as the Message path (:meth:`FedUpdates.configure_evaluate`)."""
        if self.fraction_evaluate == 0.0 or self.updates is None:
            return []
        k = max(1, round(self.fraction_evaluate * self.num_clients))
        proxies = self._proxies(client_manager)
        ins = EvaluateIns(parameters, {CONFIG_KEY: self.toml, ROUND_KEY: server_round})
        return [(proxies[c], ins) for c in self.updates.sample_clients(-server_round, k)]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        """Example-weighted mean loss and accuracy of the clients' evaluations."""
        n = sum(r.num_examples for _, r in results)
        if not n:
            return None, {}
        loss = sum(r.num_examples * r.loss for _, r in results) / n
        acc = sum(r.num_examples * float(r.metrics.get("accuracy", 0.0)) for _, r in results) / n
        return loss, {"accuracy": acc, "loss": loss}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Central evaluation of the global model (round 0 and after every round)."""
        res = self.evaluate_round(server_round, ArrayRecord(self.to_state(parameters)))
        return float(res["loss"]), dict(res)

    # ------------------------------------------------------------------ summary
    def report(self) -> dict[str, Any]:
        """The summary's ``secure_aggregation`` entry."""
        return {
            "mode": "secagg+",
            **self.settings.as_dict(),
            "rounds_aggregated": list(self.aggregated),
            "halted_rounds": self.halted_rounds(),
            "dropouts_by_round": {str(r): n for r, n in sorted(self.dropouts.items())},
            "error_bound_by_round": {str(r): b for r, b in sorted(self.max_error_bound.items())},
            "side_channels": {str(r): rows for r, rows in sorted(self.side_channels.items())},
        }


def run_secagg_server(grid: Grid, context: Context, cfg: Config, folder: RunFolder,
                      progress: Progress | None = None) -> dict[str, Any]:
    """The whole federation behind SecAgg+ (same data, model, attacks, scorer, evaluation and
    summary keys as :func:`strategies.server_app.run_server`); returns the summary it writes."""
    from strategies import server_app as plain

    device = resolve_device(cfg.federation.device)
    torch.set_num_threads(cfg.federation.server_threads)
    model = plain.initial_model(cfg)
    sink = plain.RunSink(folder)
    settings = resolve(cfg)
    runner = plain.build_runner(cfg, folder, device, progress)
    if progress is not None:
        progress.attacks_total = runner.planned_runs(cfg.federation.rounds, lambda r: set())
    accuracy: dict[int, float] = {}
    param_names = [n for n, p in model.named_parameters() if p.requires_grad]

    def make_updates(node_to_client: dict[int, int]) -> FedUpdates:
        return FedUpdates(protocol=cfg.federation.protocol, server_lr=cfg.federation.server_lr,
                          param_names=param_names, clients_per_round=cfg.federation.clients_per_round,
                          seed=cfg.seed, node_to_client=node_to_client, metric_sink=sink, fraction_evaluate=0.0)

    strategy = SecAggStrategy(
        initial_state=model.state_dict(), make_updates=make_updates, toml=config_mod.to_toml(cfg),
        num_clients=cfg.federation.num_clients, clients_per_round=cfg.federation.clients_per_round,
        info=plain.model_info(cfg), observer=runner if runner.plans else None,
        evaluate_round=plain.round_evaluator(cfg, device, sink, progress, accuracy), sink=sink, settings=settings,
        fraction_evaluate=cfg.federation.fraction_evaluate,
        save_dir=folder.path / "secagg_aggregates" if cfg.federation.secure_aggregation.save_aggregates else None,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.federation.rounds), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, timeout=settings.timeout))
    workflow(grid, legacy)
    federated: dict[int, float] = {}
    for rnd, metrics in legacy.history.metrics_distributed.get("accuracy", []):
        federated[int(rnd)] = float(metrics)
        sink(int(rnd), None, "federated_eval", {"accuracy": float(metrics)})
    summary = plain.summary_base(cfg, runner, accuracy, federated, folder)
    errors = strategy.updates.client_error_report() if strategy.updates is not None else {}
    summary.update({"observer_failures": strategy.failures, "server": {"role": cfg.server.role},
                    "client_errors": errors, "secure_aggregation": strategy.report()})
    summary.update(sink.dp_summary(cfg))
    folder.write_summary(summary)
    return summary


def make_secagg_server_app(cfg: Config, folder: RunFolder, progress: Progress | None,
                           sink: dict[str, Any]) -> ServerApp:
    """A workflow-path ServerApp bound to ``cfg`` and ``folder``; the summary lands in ``sink["summary"]``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        sink["summary"] = run_secagg_server(grid, context, cfg, folder, progress)

    return server
