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

Under ``[server] role = "malicious"`` the same :class:`~strategies.crafting.Crafter` as on the
Message path crafts per client, and Flower's per-node ``FitIns`` carry each client its model
(with its architecture spec). Every client of a round must send vectors of one shape, so an
architecture change reaches all of them (checked before launch); the weights may differ per
client (isolation's decoys, LOKI's customised rows). The update behind the unmasked mean is then
``mean − Σ r_i θ_i / Σ r_i`` over the models ``θ_i`` the members were sent (``r_i`` from their
plaintext example counts), read against the model :func:`strategies.crafting.observed_model`
picks, and mapped back to the agreed model's names before it is applied.

A round that SecAgg+ halts (too few clients left for the threshold) never calls
``aggregate_fit``; the next ``configure_fit`` (or :meth:`SecAggStrategy.report`) records it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

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
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

from clients.client_app import CONFIG_KEY
from clients.secagg_client import META_PREFIX, ROUND_KEY, float_keys
from fl_privsim.core.architecture import ARCH_KEY, honest_update, spec_to_text
from fl_privsim.core.client_config import client_config_text
from fl_privsim.core.config import Config
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.progress import Progress
from fl_privsim.core.results import RunFolder
from fl_privsim.engine.secure_aggregation import (
    SecAggSettings,
    max_examples_per_client,
    quantization_error_bound,
    resolve,
)
from strategies import server_app as plain
from strategies.crafting import MIXED, Crafter, SentModel, observed_model, undecoyed
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
        The client sections of the run config (:func:`fl_privsim.core.client_config.client_config_text`),
        sent to the clients under ``CONFIG_KEY``.
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
        Share of the evaluation pool in (plaintext) federated evaluation; 0 turns it off (the
        pool and the draw are :meth:`FedUpdates.evaluate_sample`'s).
    save_dir:
        When set, each round's unmasked aggregate update (what the server saw) is saved there.
    crafter:
        A malicious server's modifications (``None``: the server sends the honest model).
    """

    def __init__(
        self,
        *,
        initial_state: dict[str, torch.Tensor],
        make_updates: Callable[[dict[int, int]], FedUpdates],
        toml: str,
        num_clients: int,
        clients_per_round: int,
        info: ModelInfo,
        observer: Observer | None,
        evaluate_round: Callable[[int, ArrayRecord], dict[str, float]],
        sink: MetricSink,
        settings: SecAggSettings,
        fraction_evaluate: float = 0.0,
        save_dir: Path | None = None,
        crafter: Crafter | None = None,
    ) -> None:
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
        self.stage_dropouts: dict[int, dict[str, list[int]]] = {}
        self.crafter = crafter
        #: Seconds from sending a round's FitIns to the unmasked mean (training + SecAgg+).
        self.fit_seconds: dict[int, float] = {}
        self._fit_started: tuple[int, float] = (0, 0.0)
        self._sent_models: dict[int, dict[int, SentModel]] = {}

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
                raise RuntimeError(
                    f"fewer than {self.num_clients} client nodes connected within 600 s"
                )
            for proxy in client_manager.all().values():
                if proxy.node_id not in self.node_to_client:
                    res = proxy.get_properties(GetPropertiesIns({}), timeout=None, group_id=None)
                    self.node_to_client[proxy.node_id] = int(res.properties["partition_id"])
            self.updates = self.make_updates(dict(self.node_to_client))
        return self.updates

    def _proxies(self, client_manager: ClientManager) -> dict[int, ClientProxy]:
        by_node = {p.node_id: p for p in client_manager.all().values()}
        return {c: by_node[n] for n, c in self.node_to_client.items() if n in by_node}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send the global model and the run config to this round's deterministic sample."""
        updates = self._discover(client_manager)
        self._note_halted(server_round)
        self.state = self.to_state(parameters)
        self._sent = {server_round: self.state}
        self._fit_started = (server_round, time.perf_counter())
        self.info.model.load_state_dict(self.state)
        clients = updates.sample_clients(server_round, self.clients_per_round)
        self.sampled[server_round] = clients
        log.info("round %d: SecAgg+ clients %s", server_round, clients)
        proxies = self._proxies(client_manager)
        config: dict[str, Scalar] = {CONFIG_KEY: self.toml, ROUND_KEY: server_round}
        sent = self.crafter.craft(server_round, clients) if self.crafter is not None else {}
        self._sent_models = {server_round: sent}
        if sent:
            log.info("round %d: crafted models sent to clients %s", server_round, sorted(sent))
        out = []
        for c in clients:
            if c in sent:
                state = sent[c].state
                ins = FitIns(
                    ndarrays_to_parameters([state[k].numpy() for k in float_keys(state)]),
                    {**config, ARCH_KEY: spec_to_text(sent[c].arch)},
                )
                self._check_clipping(server_round, c, state)
            else:
                ins = FitIns(parameters, dict(config))
            out.append((proxies[c], ins))
        return out

    def _check_clipping(
        self, server_round: int, client: int, state: dict[str, torch.Tensor]
    ) -> None:
        """Warn when a crafted model holds parameters SecAgg+ would clip (the server chose them;
        buffers that never change, such as an open bin's bound, only lose their own update)."""
        params = {n for n, _ in self._sent_models[server_round][client].model.named_parameters()}
        big = max(
            (float(v.abs().max()) for k, v in state.items() if k in params and v.numel()),
            default=0.0,
        )
        if big > self.settings.clipping_range:
            log.warning(
                "round %d: the model crafted for client %d holds |w| = %.3g > clipping_range %g; "
                "SecAgg+ clips it",
                server_round,
                client,
                big,
                self.settings.clipping_range,
            )

    def record_stage(
        self,
        server_round: int,
        stage: str,
        before: set[int],
        after: set[int],
        errors: list[str],
        ok: bool,
    ) -> None:
        """One SecAgg+ stage's dropouts (from :class:`RecordingSecAggPlusWorkflow`): the clients
        that left, counted per round and listed with the errors they sent as client errors
        (``refused`` when a defense refused the model, else ``failed``)."""
        dropped = sorted(self.node_to_client.get(n, -1) for n in before - after)
        if not dropped and not errors:
            return
        self.stage_dropouts.setdefault(server_round, {})[stage] = dropped
        log.warning(
            "round %d: SecAgg+ stage %s lost clients %s%s",
            server_round,
            stage,
            dropped,
            "" if ok else "; the round halts",
        )
        if self.updates is None:
            return
        reasons = sorted({_short_reason(e) for e in errors}) or ["dropped without an error"]
        for i, client in enumerate(
            dropped
        ):  # Flower's errors do not name their node: pair by order
            reason = reasons[min(i, len(reasons) - 1)]
            kind = "refused" if reason.startswith("refused") else "failed"
            self.updates.client_errors.append(
                {"round": server_round, "client": client, "kind": kind, "reason": reason}
            )

    def halted_rounds(self) -> list[int]:
        """Rounds whose clients were sampled but whose aggregate never reached the strategy."""
        return sorted(r for r in self.sampled if r not in self.aggregated)

    def _note_halted(self, server_round: int) -> None:
        if server_round - 1 in self.halted_rounds():
            log.warning("round %d: SecAgg+ halted; the model was not updated", server_round - 1)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Turn the unmasked mean into the update, observe it, apply it."""
        updates = self.updates
        if updates is None or not results:
            return None, {}
        self.aggregated.append(server_round)
        if self._fit_started[0] == server_round:
            self.fit_seconds[server_round] = time.perf_counter() - self._fit_started[1]
        self.dropouts[server_round] = len(failures)
        # the failures themselves were recorded stage by stage (record_stage)
        mean = parameters_to_ndarrays(results[0][1].parameters)
        members, total, meta, channels = self._plaintext(server_round, results)
        self.side_channels[server_round] = channels
        self.max_error_bound[server_round] = quantization_error_bound(
            self.settings, len(results), total
        )
        sent = self._sent_models.get(server_round, {})
        counts = {self.node_to_client[p.node_id]: int(r.num_examples) for p, r in results}
        names = (
            {n for n, p in next(iter(sent.values())).model.named_parameters() if p.requires_grad}
            if sent
            else None
        )
        update = self.update_from_mean(
            server_round, mean, self._reference(server_round, counts, sent), names
        )
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "round": server_round,
                    "global": self._sent[server_round],
                    "update": update,
                    "members": members,
                    "num_examples": total,
                },
                self.save_dir / f"round_{server_round:03d}.pt",
            )
        arch = next((s.arch for s in sent.values()), {})
        chosen = observed_model([sent.get(c) for c in members]) if sent else None
        self._observe(server_round, update, meta, total, members, chosen, counts)
        honest = honest_update(update, arch) if arch else update
        new = updates.apply_update(ArrayRecord(self._sent[server_round]), ArrayRecord(honest))
        self.state = new.to_torch_state_dict()
        return self.to_parameters(self.state), {}

    def _reference(
        self, server_round: int, counts: dict[int, int], sent: dict[int, SentModel]
    ) -> dict[str, torch.Tensor]:
        """``Σ r_i θ_i / Σ r_i``: the weighted mean of the models the members were sent, with
        SecAgg+'s weights ``r_i = round(n_i / W · Q) / Q`` (the honest global model when
        nobody got a crafted one)."""
        honest = self._sent[server_round]
        if not sent:
            return honest
        q, w = self.settings.quantization_range, self.settings.max_weight
        ratios = {c: round(n / w * q) / q for c, n in counts.items()}
        norm = sum(ratios.values()) or 1.0
        out: dict[str, torch.Tensor] = {}
        for c, r in ratios.items():
            state = sent[c].state if c in sent else honest
            for k in float_keys(state):
                out[k] = out.get(k, 0.0) + state[k].double() * (r / norm)  # type: ignore[operator]
        return out

    def _plaintext(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[tuple[int, ...], int, dict[str, Any], list[dict[str, Any]]]:
        """What reaches the server unmasked: example counts and metrics (logged as client_train)."""
        rows = sorted(((self.node_to_client[p.node_id], r) for p, r in results), key=lambda x: x[0])
        channels, meta = [], {}
        for cid, res in rows:
            metrics = dict(res.metrics)
            declared = {
                k.removeprefix(META_PREFIX): v
                for k, v in metrics.items()
                if k.startswith(META_PREFIX)
            }
            train = {k: v for k, v in metrics.items() if not k.startswith(META_PREFIX)}
            meta = meta or declared
            self.sink(server_round, cid, "client_train", train)  # type: ignore[arg-type]
            channels.append(
                {
                    "client": cid,
                    "num_examples": int(res.num_examples),
                    "metric_keys": sorted(metrics),
                }
            )
        return tuple(c for c, _ in rows), sum(int(r.num_examples) for _, r in rows), meta, channels

    def update_from_mean(
        self,
        server_round: int,
        mean: list[np.ndarray],
        reference: dict[str, torch.Tensor] | None = None,
        param_names: set[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The averaged update behind the unmasked mean model: ``mean − θ`` (FedAvg, buffers), or
        ``θ − mean`` for FedSGD's trainable parameters (the clients took a unit step); ``θ`` is
        ``reference`` (the weighted mean of the models sent, :meth:`_reference`), by default
        the global model; ``param_names`` are the trainable names of the model sent (default:
        the agreed model's)."""
        assert self.updates is not None
        sent = reference if reference is not None else self._sent[server_round]
        params = param_names if param_names is not None else set(self.updates.param_names)
        out: dict[str, torch.Tensor] = {}
        for k, m in zip(float_keys(sent), mean, strict=True):
            g = sent[k].double()
            a = torch.as_tensor(np.asarray(m, dtype=np.float64))
            d = g - a if self.updates.protocol == "fedsgd" and k in params else a - g
            out[k] = d.to(self.state[k].dtype if k in self.state else torch.float32)
        return out

    def _observe(
        self,
        server_round: int,
        update: dict[str, torch.Tensor],
        meta: dict[str, Any],
        total: int,
        members: tuple[int, ...],
        chosen: SentModel | str | None = None,
        counts: dict[int, int] | None = None,
    ) -> None:
        """Hand the aggregate to the attacks (and to the modifications that crafted it). When
        decoys took part, the aggregate is read as the other members' update
        (:func:`strategies.crafting.undecoyed`): rescaled, with those members only."""
        try:
            sent = self._sent_models.get(server_round, {})
            if sent and counts is not None:
                members, total, scale = undecoyed(members, [counts[c] for c in members], sent)
                if scale != 1.0:
                    update = {k: v * scale for k, v in update.items()}
            obs = build_observation(
                self.info,
                server_round,
                self._sent[server_round],
                None,
                update,
                meta,
                total,
                len(members),
                members,
            )
            if isinstance(chosen, SentModel):
                obs = dataclasses.replace(
                    obs,
                    model=chosen.model,
                    global_params=chosen.state,
                    server_secrets=chosen.secrets,
                )
                if self.crafter is not None:
                    for i in chosen.plans:
                        self.crafter.plans[i].modification.observe(obs)
            elif chosen == MIXED:
                arch = next(iter(self._sent_models.get(server_round, {}).values())).arch
                obs = dataclasses.replace(
                    obs, update=honest_update(update, arch) if arch else update
                )
            if self.observer is None:
                return
            _, want_aggregate = self.observer.targets(server_round)
            if want_aggregate:
                self.observer.observe(server_round, [obs])
        except Exception:  # an attack must never stop training
            self.failures += 1
            log.exception("observation of round %d failed; training continues", server_round)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Federated evaluation (plaintext, not secure-aggregated) on the same share of clients
        as the Message path (:meth:`FedUpdates.configure_evaluate`)."""
        if self.fraction_evaluate == 0.0 or self.updates is None:
            return []
        proxies = self._proxies(client_manager)
        ins = EvaluateIns(parameters, {CONFIG_KEY: self.toml, ROUND_KEY: server_round})
        return [(proxies[c], ins) for c in self.updates.evaluate_sample(server_round)]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Example-weighted mean loss and accuracy of the clients' evaluations."""
        n = sum(r.num_examples for _, r in results)
        if not n:
            return None, {}
        loss = sum(r.num_examples * r.loss for _, r in results) / n
        acc = sum(r.num_examples * float(r.metrics.get("accuracy", 0.0)) for _, r in results) / n
        return loss, {"accuracy": acc, "loss": loss}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
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
            "dropouts_by_stage": {str(r): v for r, v in sorted(self.stage_dropouts.items())},
            "error_bound_by_round": {str(r): b for r, b in sorted(self.max_error_bound.items())},
            "side_channels": {str(r): rows for r, rows in sorted(self.side_channels.items())},
        }


def _short_reason(error: str) -> str:
    """The readable part of a client's error as Flower relays it (a Ray traceback): a
    defense's refusal as ``refused: <reason>``, else the error's last line (300 chars)."""
    found = re.search(r"ModelRefused: (.+?)(?:\\n|\n|'|$)", error)
    if found:
        return f"refused: {found.group(1).strip()}"[:300]
    lines = [ln.strip() for ln in error.replace("\\n", "\n").splitlines() if ln.strip()]
    return (lines[-1] if lines else error)[:300]


class RecordingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow``, unchanged, that tells ``on_stage`` after each of its
    stages which nodes were active before and after it and the errors the dropped ones sent
    (a client that refuses its model raises in ``fit``, which Flower returns as an error)."""

    def __init__(self, *, on_stage: Callable[..., None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_stage = on_stage

    def _recorded(
        self, name: str, stage: Callable[..., bool], grid: Grid, context: LegacyContext, state: Any
    ) -> bool:
        before = set(getattr(state, "active_node_ids", set()))
        seen = len(getattr(state, "failures", []))
        ok = stage(grid, context, state)
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        errors = [str(f) for f in getattr(state, "failures", [])[seen:]]
        self.on_stage(
            int(cfg[WorkflowKey.CURRENT_ROUND]),
            name,
            before,
            set(getattr(state, "active_node_ids", set())),
            errors,
            ok,
        )
        return ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return self._recorded("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return self._recorded(
            "collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state
        )

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return self._recorded("unmask", super().unmask_stage, grid, context, state)


def run_secagg_server(
    grid: Grid,
    context: Context,
    cfg: Config,
    folder: RunFolder,
    progress: Progress | None = None,
    live: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole federation behind SecAgg+ (same data, model, attacks, scorer, evaluation and
    summary keys as :func:`strategies.server_app.run_server`); returns the summary it writes.

    ``live`` (the launcher's): once the workflow starts, ``live["partial"]`` is a function
    ``status -> summary`` of everything so far, which an interrupted run writes."""

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
        return FedUpdates(
            protocol=cfg.federation.protocol,
            server_lr=cfg.federation.server_lr,
            param_names=param_names,
            clients_per_round=cfg.federation.clients_per_round,
            seed=cfg.seed,
            node_to_client=node_to_client,
            metric_sink=sink,
            fraction_evaluate=cfg.federation.fraction_evaluate,
            evaluation_clients=cfg.federation.evaluation_clients,
        )

    info = plain.model_info(cfg)  # the crafter reads the global model the strategy loads into it
    crafter = None
    if cfg.server.role == "malicious":
        public_x, public_y = plain.public_data(cfg)
        crafter = Crafter(
            plain.build_modification_plans(cfg),
            info=info,
            public_inputs=public_x,
            public_labels=public_y,
            seed=cfg.seed,
            update_resolution=quantization_error_bound(
                settings,
                cfg.federation.clients_per_round,
                cfg.federation.clients_per_round * max_examples_per_client(cfg),
            ),
            weight_bound=settings.clipping_range,
        )
    strategy = SecAggStrategy(
        initial_state=model.state_dict(),
        make_updates=make_updates,
        toml=client_config_text(cfg),
        num_clients=cfg.federation.num_clients,
        clients_per_round=cfg.federation.clients_per_round,
        info=info,
        observer=runner if runner.plans else None,
        evaluate_round=plain.round_evaluator(cfg, device, sink, progress, accuracy),
        sink=sink,
        settings=settings,
        fraction_evaluate=cfg.federation.fraction_evaluate,
        save_dir=folder.path / "secagg_aggregates"
        if cfg.federation.secure_aggregation.save_aggregates
        else None,
        crafter=crafter,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg.federation.rounds), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=RecordingSecAggPlusWorkflow(
            on_stage=strategy.record_stage,
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.reconstruction_threshold,
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            timeout=settings.timeout,
        )
    )
    federated: dict[int, float] = {}

    def build_summary(status: str) -> dict[str, Any]:
        for rnd, metrics in legacy.history.metrics_distributed.get("accuracy", []):
            federated[int(rnd)] = float(metrics)
        summary = plain.summary_base(cfg, runner, dict(accuracy), federated, folder)
        summary["status"] = status
        errors = strategy.updates.client_error_report() if strategy.updates is not None else {}
        summary.update(
            {
                "observer_failures": strategy.failures,
                "server": crafter.report() if crafter is not None else {"role": cfg.server.role},
                "client_errors": errors,
                "secure_aggregation": strategy.report(),
                "fit_seconds_by_round": {
                    str(r): t for r, t in sorted(strategy.fit_seconds.items())
                },
            }
        )
        summary.update(sink.dp_summary(cfg))
        return summary

    if live is not None:  # what an interrupted run's summary.json holds
        live["partial"] = build_summary
    workflow(grid, legacy)
    for rnd, metrics in legacy.history.metrics_distributed.get("accuracy", []):
        sink(int(rnd), None, "federated_eval", {"accuracy": float(metrics)})
    summary = build_summary("completed")
    folder.write_summary(summary)
    return summary


def make_secagg_server_app(
    cfg: Config, folder: RunFolder, progress: Progress | None, sink: dict[str, Any]
) -> ServerApp:
    """A workflow-path ServerApp bound to ``cfg`` and ``folder``; the summary lands in ``sink["summary"]``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        # after an interrupt, stop at the next exchange (simulation.run writes the summary)
        grid = cast(Grid, plain.InterruptibleGrid(grid, lambda: bool(sink.get("interrupted"))))
        sink["summary"] = run_secagg_server(grid, context, cfg, folder, progress, sink)

    return server
