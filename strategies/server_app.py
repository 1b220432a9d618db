"""The Flower ServerApp (Message API): FedSGD/FedAvg with an honest-but-curious server.

:func:`run_server` is the whole server side of a run; two entry points call it:

- ``app`` (``strategies.server_app:app``), used by ``flwr run .``: it reads the config
  from ``run_config["config-path"]`` and creates its own run folder under
  ``run_config["out-dir"]``;
- :func:`make_server_app`, used by the in-process launcher (``fl_privsim.app.simulation``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid import InMemoryGrid

import adversaries  # noqa: F401  (registers the built-in attacks)
from adversaries.base import ATTACKS
from adversaries.malicious import MODIFICATIONS
from clients.client_app import CONFIG_KEY
from clients.defenses import build_defenses
from fl_privsim.core import config as config_mod
from fl_privsim.core.client_config import client_config_text
from fl_privsim.core.config import Config
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.faults import injected_failures
from fl_privsim.core.models import build_model
from fl_privsim.core.progress import Progress
from fl_privsim.core.results import RunFolder, make_run_dir, start_run_folder
from fl_privsim.core.seeding import numpy_rng, seed_int
from fl_privsim.engine.analyses import build_analyses
from fl_privsim.engine.federated_data import federated_data
from fl_privsim.engine.scoring import Scorer
from strategies.attack_runner import AttackPlan, AttackRunner
from strategies.central_dp import CentralDP
from strategies.faults import FaultFilter
from strategies.fedupdates import FedUpdates, discover_clients
from strategies.flower_dispatch import registered_nodes
from strategies.honest_but_curious import HonestButCurious, ModelInfo
from strategies.malicious import MaliciousServer, ModificationPlan

log = logging.getLogger(__name__)


def initial_model(cfg: Config) -> torch.nn.Module:
    """The global model at round 0, initialised from the run seed."""
    fed = federated_data(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(cfg.seed, "model_init"))
        gen = torch.Generator().manual_seed(seed_int(cfg.seed, "model_init"))
        return build_model(
            cfg.model.name,
            fed.data.input_shape,
            fed.data.num_classes,
            init=cfg.model.init,
            generator=gen,
        )


def build_plans(cfg: Config) -> list[AttackPlan]:
    """Instantiate the configured attacks (bad names/params raise ``ConfigError``)."""
    return [
        AttackPlan(
            name=a.name,
            attack=ATTACKS.create(a.name, **a.params),
            rounds=set(a.targets.rounds),
            clients=set(a.targets.clients),
            aggregate=a.targets.aggregate,
        )
        for a in cfg.attacks
    ]


def build_modification_plans(cfg: Config) -> list[ModificationPlan]:
    """Instantiate the malicious server's modifications (bad names/params raise ``ConfigError``)."""
    return [
        ModificationPlan(
            name=m.name,
            modification=MODIFICATIONS.create(m.name, **m.params),
            rounds=set(m.targets.rounds),
            clients=set(m.targets.clients),
        )
        for m in cfg.server.modifications
    ]


def public_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's own data: a seeded subset of the test split (normalised inputs, labels),
    ``server.public_examples`` records at most. No client trains on the test split."""
    fed = federated_data(cfg)
    n = len(fed.data.test_y)
    rng = numpy_rng(cfg.seed, 0, "public_data")
    idx = np.sort(rng.choice(n, size=min(n, cfg.server.public_examples), replace=False))
    return fed.data.normalize(fed.data.images("test", idx)), fed.data.labels("test", idx)


def central_evaluator(
    cfg: Config, device: torch.device
) -> Callable[[ArrayRecord], dict[str, float]]:
    """Accuracy and loss of a global model on the whole test split."""
    fed = federated_data(cfg)
    x, y = fed.data.normalize(fed.data.images("test", range(len(fed.data.test_y)))), fed.data.test_y
    model = build_model(cfg.model.name, fed.data.input_shape, fed.data.num_classes).to(device)

    @torch.no_grad()
    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        correct, loss_sum = 0, 0.0
        for i in range(0, len(y), 1024):
            xb, yb = x[i : i + 1024].to(device), y[i : i + 1024].to(device)
            logits = model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        return {"accuracy": correct / len(y), "loss": loss_sum / len(y)}

    return evaluate


class RunSink:
    """Per-round metrics to ``metrics.jsonl``; keeps the client DP defenses' ε (the summary's max)."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.dp: dict[str, float] = {}

    def __call__(
        self, server_round: int, client: int | None, source: str, values: dict[str, float]
    ) -> None:
        """Log ``values`` of ``source`` (client_train, server_eval, ...) for a round and client."""
        for k, v in values.items():
            self.folder.log_metric(round=server_round, client=client, source=source, key=k, value=v)
            if source == "client_train" and k.endswith((".epsilon", ".epsilon_formal", ".delta")):
                key = k.rsplit(".", 1)[1]
                self.dp[key] = (
                    min(self.dp.get(key, 1.0), float(v))
                    if key == "epsilon_formal"
                    else max(self.dp.get(key, 0.0), float(v))
                )

    def dp_summary(self, cfg: Config) -> dict[str, Any]:
        """Client-side DP: ε(δ) = max over clients; formal only if every client's is (empty if off)."""
        if "epsilon" not in self.dp:
            return {}
        accounted = [d for d in build_defenses(cfg.defenses) if d.accounted]
        reasons = list(dict.fromkeys(r for d in accounted for r in d.not_formal_because))
        delta = self.dp.get("delta") or max((d.delta for d in accounted), default=None)
        return {
            "epsilon": self.dp["epsilon"],
            "epsilon_formal": bool(self.dp.get("epsilon_formal", 1.0)),
            "epsilon_delta": delta,
            "epsilon_not_formal_because": reasons,
        }


def build_runner(
    cfg: Config, folder: RunFolder, device: torch.device, progress: Progress | None
) -> AttackRunner:
    """The attack runner of a run: the configured attacks and analyses, scored by the scorer."""
    return AttackRunner(
        plans=build_plans(cfg),
        scorer=Scorer(cfg, federated_data(cfg)),
        folder=folder,
        device=device,
        seed=cfg.seed,
        save_images=cfg.output.save_images,
        on_attack_done=progress.attack_done if progress else None,
        analyses=build_analyses(cfg),
    )


def model_info(cfg: Config) -> ModelInfo:
    """What the server knows about the model and the data format."""
    fed = federated_data(cfg)
    return ModelInfo(
        model=build_model(cfg.model.name, fed.data.input_shape, fed.data.num_classes),
        input_shape=fed.data.input_shape,
        num_classes=fed.data.num_classes,
        data_mean=fed.data.mean,
        data_std=fed.data.std,
        protocol=cfg.federation.protocol,
        batch_size=cfg.client.batch_size,
        local_steps=cfg.client.local_steps if cfg.federation.protocol == "fedavg" else 1,
        lr=cfg.client.lr,
    )


def round_evaluator(
    cfg: Config,
    device: torch.device,
    sink: RunSink,
    progress: Progress | None,
    accuracy: dict[int, float],
) -> Callable[[int, ArrayRecord], dict[str, float]]:
    """Central evaluation of each round's global model: logs it, fills ``accuracy`` by round."""
    evaluate = central_evaluator(cfg, device)

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        res = evaluate(arrays)
        accuracy[server_round] = res["accuracy"]
        sink(server_round, None, "server_eval", res)
        if progress is not None and server_round > 0:
            progress.round_done(server_round, res["accuracy"])
        return res

    return evaluate_round


def summary_base(
    cfg: Config,
    runner: AttackRunner,
    accuracy: dict[int, float],
    federated: dict[int, float],
    folder: RunFolder,
) -> dict[str, Any]:
    """The summary keys every run has (both the Message-API and the SecAgg+ path)."""
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "protocol": cfg.federation.protocol,
        "rounds": cfg.federation.rounds,
        "attacks": runner.summary(),
        **({"analyses": runner.analysis_summary()} if runner.analyses else {}),
        "final_accuracy": accuracy.get(cfg.federation.rounds),
        "initial_accuracy": accuracy.get(0),
        "accuracy_by_round": {str(k): v for k, v in sorted(accuracy.items())},
        "federated_accuracy_by_round": {str(k): v for k, v in federated.items()},
        "run_dir": str(folder.path),
    }


class RunInterrupted(Exception):
    """The launcher was interrupted (SIGINT/SIGTERM): the server stops at its next exchange."""


class InterruptibleGrid:
    """``grid`` whose ``send_and_receive`` gives up as soon as ``stop()`` is true.

    Flower's ``send_and_receive`` waits for the replies up to its timeout (an hour in
    ``Strategy.start``), and the ServerApp's thread is not a daemon: after an interrupt the
    process would wait for it. Every other attribute is ``grid``'s."""

    def __init__(self, grid: Grid, stop: Callable[[], bool]) -> None:
        self._grid = grid
        self._stop = stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Push ``messages`` and pull their replies (as Flower's ``InMemoryGrid`` does) until
        all are in, ``timeout`` passes or ``stop()`` (then :class:`RunInterrupted`)."""
        msg_ids = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        out: list[Any] = []
        while timeout is None or time.time() < end:
            if self._stop():
                raise RunInterrupted("the run was interrupted")
            replies = list(self._grid.pull_messages(msg_ids))
            out.extend(replies)
            msg_ids.difference_update({m.metadata.reply_to_message_id for m in replies})
            if not msg_ids:
                break
            time.sleep(min(0.1, float(getattr(self._grid, "pull_interval", 0.1))))
        return out


def run_server(
    grid: Grid,
    cfg: Config,
    folder: RunFolder,
    progress: Progress | None = None,
    live: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole federation from the server side; returns the summary it writes
    (``"status": "completed"``).

    ``live`` (the launcher's): once training starts, ``live["partial"]`` is a function
    ``(status) -> summary`` of every metric so far, for a run interrupted midway
    (:func:`fl_privsim.app.simulation.run`); when ``live["interrupted"]`` is set, the summary
    of the interrupted run is the launcher's and this function does not overwrite it."""
    if (
        cfg.federation.secure_aggregation.mode != "off"
    ):  # never train in the clear what asked for SecAgg+
        raise ConfigError(
            "federation.secure_aggregation.mode: secagg+ runs on Flower's workflow path "
            "(strategies.secure_aggregation with clients.secagg_client); use fl-privsim run"
        )
    if live is not None:
        grid = cast(Grid, InterruptibleGrid(grid, lambda: bool(live.get("interrupted"))))
    device = resolve_device(cfg.federation.device)
    torch.set_num_threads(cfg.federation.server_threads)
    model = initial_model(cfg)
    node_to_client = discover_clients(
        grid, expected=cfg.federation.num_clients, known=registered_nodes
    )
    sink = RunSink(folder)
    inner = FedUpdates(
        protocol=cfg.federation.protocol,
        server_lr=cfg.federation.server_lr,
        param_names=[n for n, p in model.named_parameters() if p.requires_grad],
        clients_per_round=cfg.federation.clients_per_round,
        seed=cfg.seed,
        node_to_client=node_to_client,
        extra_config={CONFIG_KEY: client_config_text(cfg)},
        metric_sink=sink,
        fraction_evaluate=cfg.federation.fraction_evaluate,
        evaluation_clients=cfg.federation.evaluation_clients,
    )
    # Flower's central DP wrapper, inside the curious server: it sees the updates as sent.
    central = (
        CentralDP(
            inner,
            settings=cfg.federation.central_dp,
            num_clients=cfg.federation.num_clients,
            seed=cfg.seed,
        )
        if cfg.federation.central_dp.mode != "off"
        else None
    )
    trained = central if central is not None else inner
    runner = build_runner(cfg, folder, device, progress)
    if progress is not None:
        progress.attacks_total = runner.planned_runs(
            cfg.federation.rounds,
            lambda r: set(inner.sample_clients(r, cfg.federation.clients_per_round)),
        )
    info = model_info(cfg)
    strategy: Strategy
    if cfg.server.role == "malicious":
        public_x, public_y = public_data(cfg)
        strategy = MaliciousServer(
            trained,
            info=info,
            observer=runner,
            plans=build_modification_plans(cfg),
            node_to_client=node_to_client,
            public_inputs=public_x,
            public_labels=public_y,
            seed=cfg.seed,
        )
    else:
        strategy = (
            HonestButCurious(trained, info=info, observer=runner)
            if runner.plans or runner.analyses
            else trained
        )
    fed = cfg.federation
    faults = FaultFilter(
        strategy,
        expected=model.state_dict() if cfg.server.role != "malicious" else None,
        node_to_client=node_to_client,
        observer=runner,
        injected=(
            (
                lambda r: injected_failures(
                    cfg.seed,
                    fed.failure_rate,
                    fed.failure_mode,
                    {r: inner.sample_clients(r, fed.clients_per_round)},
                )[r]
            )
            if fed.failure_rate > 0
            else None
        ),
        timeout=fed.round_timeout,
    )
    accuracy: dict[int, float] = {}
    evaluate_round = round_evaluator(cfg, device, sink, progress, accuracy)

    evaluated_at: dict[int, float] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        res = MetricRecord(evaluate_round(server_round, arrays))
        folder.flush_round()  # metrics.jsonl on disk once per round
        evaluated_at[server_round] = time.perf_counter()
        return res

    federated: dict[int, float] = {}

    def build_summary(status: str) -> dict[str, Any]:
        summary = summary_base(cfg, runner, dict(accuracy), federated, folder)
        summary["status"] = status
        summary["fit_seconds_by_round"] = {str(r): t for r, t in sorted(inner.fit_seconds.items())}
        # whole rounds: from one central evaluation to the next (train, evaluate, attacks)
        summary["round_seconds_by_round"] = {
            str(r): evaluated_at[r] - evaluated_at[r - 1]
            for r in sorted(evaluated_at)
            if r - 1 in evaluated_at
        }
        summary.update(
            {
                "observer_failures": getattr(strategy, "failures", 0),
                "server": strategy.report()
                if isinstance(strategy, MaliciousServer)
                else {"role": cfg.server.role},
                "client_errors": inner.client_error_report(),
                "failures": faults.report(),
                "devices": {"server": device.type, "clients": sorted(inner.client_devices)},
            }
        )
        summary.update(sink.dp_summary(cfg))
        if central is not None:  # Flower's central DP: ε(δ) of the released models
            report = central.report()
            summary.update(central_epsilon=report["epsilon"], central_dp=report)
        return summary

    if live is not None:
        live["partial"] = build_summary
    result = faults.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.federation.rounds,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
        evaluate_fn=evaluate_fn,
        timeout=fed.round_timeout,
    )
    for rnd, rec in sorted(result.evaluate_metrics_clientapp.items()):
        if "accuracy" in rec:
            federated[rnd] = float(rec["accuracy"])
            sink(rnd, None, "federated_eval", dict(rec))
    summary = build_summary("completed")
    folder.flush_round()
    if live is None or not live.get("interrupted"):
        folder.write_summary(summary)
    return summary


def make_server_app(
    cfg: Config, folder: RunFolder, progress: Progress | None, sink: dict[str, Any]
) -> ServerApp:
    """A ServerApp bound to ``cfg`` and ``folder``; the summary lands in ``sink["summary"]``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        sink["summary"] = run_server(grid, cfg, folder, progress, live=sink)

    return server


def check_simulated_supernodes(
    grid: Grid, expected: int, *, settle: float = 1.0, timeout: float = 120.0
) -> None:
    """Fail fast when Flower's simulation runs other than ``expected`` SuperNodes.

    ``flwr run .`` takes the number of SuperNodes from the federation config (flwr 1.41:
    ``--federation-config "num-supernodes=N"``, default 2), not from the fl-privsim config.
    The simulation runtime registers all its SuperNodes at once, just after it starts the
    ServerApp, so the count is final once it has not changed for ``settle`` seconds. A
    mismatch is one :class:`ConfigError` line with both numbers and the fix. Other grids
    (SuperNodes of a deployment join over time) are left to :func:`discover_clients`.
    """
    if not isinstance(grid, InMemoryGrid):
        return
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while True:
        now, n = time.monotonic(), len(grid.get_node_ids())
        if n != count:
            count, since = n, now
        elif n > 0 and now - since >= settle:
            break
        if now > deadline:
            break
        time.sleep(0.1)
    if count != expected:
        raise ConfigError(
            f"flwr run: the simulation has {count} SuperNodes but the config has "
            f"federation.num_clients = {expected}; run with "
            f'--federation-config "num-supernodes={expected}" '
            f"(or set federation.num_clients = {count} in the config at config-path)"
        )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: config from ``config-path``, run folder under ``out-dir``."""
    cfg = config_mod.load(str(context.run_config.get("config-path", "")) or None)
    check_simulated_supernodes(grid, cfg.federation.num_clients)
    out_dir = Path(str(context.run_config.get("out-dir", "runs")))
    folder = start_run_folder(cfg, make_run_dir(out_dir, cfg.name))
    summary = run_server(grid, cfg, folder)
    log.info("run folder: %s; final accuracy %.3f", folder.path, summary["final_accuracy"] or 0.0)
