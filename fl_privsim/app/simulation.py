"""The in-process launcher: one function that starts a Flower simulation on Ray.

``flwr.simulation.run_simulation`` is deprecated upstream in favour of ``flwr run``, but it
is Flower's in-process launcher; it is called in exactly one place, :func:`launch`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from adversaries.base import ATTACKS, Setup
from adversaries.malicious import MODIFICATIONS
from clients.defenses import build_defenses
from fl_privsim.app.ray_cluster import OWN_RAY_TMPDIR_NAME, reach_cluster, recorded
from fl_privsim.app.report import write_run_report
from fl_privsim.core.config import Config
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.errors import ConfigError, UserError
from fl_privsim.core.models import MODELS, build_model
from fl_privsim.core.progress import Progress
from fl_privsim.core.results import make_run_dir, start_run_folder
from fl_privsim.engine.federated_data import client_batch_indices, federated_data

log = logging.getLogger(__name__)


def prepare_environment() -> None:
    """Telemetry off; Ray's and Flower's temp/home folders out of the user's home."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    base = Path(tempfile.gettempdir())
    os.environ.setdefault("FLWR_HOME", str(base / "fl-privsim-flwr"))
    os.environ.setdefault("RAY_TMPDIR", str(base / OWN_RAY_TMPDIR_NAME))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


def backend_config(
    cfg: Config, *, verbose: bool = False, connect: str | None = None
) -> dict[str, Any]:
    """Ray backend config: client resources from the config; join ``ray_address`` if set.

    ``connect`` is the address :func:`fl_privsim.app.ray_cluster.reach_cluster` resolved
    (``"auto"`` made explicit); when joining, ``ray.init`` gets only arguments Ray accepts
    for an existing cluster (no CPU counts, object store size or temp folder: the
    cluster's own). Actor logs reach the driver only when ``verbose`` (client errors still
    come back in the reply messages and are counted by the strategy)."""
    fed = cfg.federation
    num_gpus = fed.num_gpus_per_client
    if num_gpus == 0 and resolve_device(fed.device).type == "cuda":
        num_gpus = 0.25  # Ray hides GPUs from actors that reserve none
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": verbose}
    if fed.ray_address:
        init_args["address"] = connect or fed.ray_address
    else:
        # "local" always starts a fresh Ray: a bare ray.init() would join any cluster this
        # machine already runs (or a stale one recorded in the temp folder).
        init_args["address"] = "local"
        init_args["include_dashboard"] = False
        init_args["_temp_dir"] = os.environ.get("RAY_TMPDIR")
        init_args["object_store_memory"] = 256 * 1024**2
    return {
        "client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": num_gpus},
        "init_args": init_args,
    }


def launch(
    server_app: Any,
    client_app: Any,
    *,
    num_supernodes: int,
    backend: dict[str, Any],
    verbose: bool = False,
    ray_record: dict[str, Any] | None = None,
    patch_flower: bool = True,
) -> None:
    """Run ``server_app`` against ``num_supernodes`` copies of ``client_app`` on Ray.

    ``ray_record`` (when given) receives which Ray cluster and nodes the client actors ran
    on (:func:`fl_privsim.app.ray_cluster.recorded`). ``patch_flower``: Flower's message
    dispatch in one pass per sweep and its node map kept for the server
    (:mod:`strategies.flower_dispatch`), so a round costs its sampled clients, not the
    federation's size."""
    import warnings

    from flwr.simulation import run_simulation

    from strategies.flower_dispatch import patched_simulation

    with (
        patched_simulation() if patch_flower else contextlib.nullcontext(),
        warnings.catch_warnings(),
        recorded({} if ray_record is None else ray_record),
    ):
        warnings.simplefilter("ignore", DeprecationWarning)
        # Ray's notice about a future default; we rely on today's (GPUs hidden from
        # actors that reserve none) and set num_gpus explicitly.
        warnings.filterwarnings(
            "ignore", message="Tip: In future versions of Ray", category=FutureWarning
        )
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_name="ray",
            backend_config=backend,
            verbose_logging=verbose,
        )


def validate_before_launch(cfg: Config) -> None:
    """Fail fast, before Ray starts: device, dataset, model and attack parameters
    (each attack is built once, so its own validation runs here)."""

    resolve_device(cfg.federation.device)
    fed = federated_data(cfg)
    model = build_model(cfg.model.name, fed.data.input_shape, fed.data.num_classes)
    if cfg.defenses:  # defenses that depend on the architecture (e.g. soteria's layer)
        for i, defense in enumerate(build_defenses(cfg.defenses)):
            try:
                defense.check_model(model)
            except UserError as exc:
                raise ConfigError(f"defenses[{i}]: {exc}") from None
    attacks = []
    for i, attack in enumerate(cfg.attacks):
        try:
            attacks.append(ATTACKS.create(attack.name, **attack.params))  # names, types and ranges
        except UserError as exc:
            raise type(exc)(f"attacks[{i}]: {exc}") from None
    check_server_role(cfg, model, fed.data.input_shape, fed.data.num_classes)
    check_attack_setups(cfg, fed, model, attacks)


def check_attack_setups(cfg: Config, fed: Any, model: Any, attacks: list[Any]) -> None:
    """Before launch: each ``[[attacks]]`` entry's threat model against what ``cfg`` fixes
    (:meth:`adversaries.base.Attack.check_setup`), for the clients it targets and for the
    round's aggregate if it targets that. A refusal is one :class:`ConfigError` line,
    ``attacks[i] (name): <assumption>; <what would satisfy it>``: the registered models that
    pass with the same data and settings, else the setting(s) to change.

    ``attacks`` are the built attacks, in ``cfg.attacks`` order; ``fed`` the run's
    :class:`~fl_privsim.engine.federated_data.FederatedData` and ``model`` the built model. A client's
    batch size and local steps are those of its first batches as the client draws them
    (:func:`~fl_privsim.engine.federated_data.client_batch_indices`: clamped to its partition); the
    aggregate gets the smallest over all clients (then a refusal holds for any sample)."""
    from dataclasses import replace

    shapes: dict[int, tuple[int, int]] = {}  # partition size -> (batch size, local steps)

    def batch_shape(client: int, server_round: int) -> tuple[int, int]:
        size = len(fed.train_parts[client])
        if size not in shapes:
            batches = client_batch_indices(cfg, fed, server_round, client)
            shapes[size] = (len(batches[0]), len(batches))
        return shapes[size]

    base = Setup(
        model=model,
        input_shape=tuple(fed.data.input_shape),
        num_classes=int(fed.data.num_classes),
        protocol=cfg.federation.protocol,
        batch_size=cfg.client.batch_size,  # type: ignore[arg-type]
        local_steps=cfg.client.local_steps if cfg.federation.protocol == "fedavg" else 1,
        lr=cfg.client.lr,
        loss=cfg.client.loss,
        data_name=cfg.data.name,
        model_name=cfg.model.name,
        clients_per_round=cfg.federation.clients_per_round,
        data_mean=tuple(fed.data.mean),
        data_std=tuple(fed.data.std),
    )
    built: dict[str, Any] = {}
    for i, (spec, attack) in enumerate(zip(cfg.attacks, attacks, strict=True)):
        first_round = min(spec.targets.rounds, default=1)
        setups = [
            replace(base, batch_size=bs, local_steps=steps)
            for bs, steps in sorted({batch_shape(c, first_round) for c in spec.targets.clients})
        ]
        if spec.targets.aggregate:
            every = [batch_shape(c, first_round) for c in range(cfg.federation.num_clients)]
            setups.append(
                replace(
                    base,
                    aggregate=True,
                    batch_size=min(bs for bs, _ in every),
                    local_steps=min(steps for _, steps in every),
                )
            )
        for setup in setups:
            try:
                attack.check_setup(setup)
            except UserError as exc:
                reason = " ".join(str(exc).split())
                reason = reason.removeprefix(f"{spec.name}: ")
                where = "on the round's aggregate, " if setup.aggregate else ""
                hint = _attack_remedy(attack, setup, i, built)
                raise ConfigError(f"attacks[{i}] ({spec.name}): {where}{reason}; {hint}") from None


def _attack_remedy(attack: Any, setup: Any, index: int, built: dict[str, Any]) -> str:
    """What would let ``attack`` pass :meth:`check_setup` on ``setup``: the registered models
    (:data:`fl_privsim.core.models.MODELS`, no VIB variants) that pass with the same data and
    settings; else single setting changes that let the configured model pass; else models
    that pass with all those changes together. ``built`` caches models by name."""
    from dataclasses import replace

    def passes(candidate: Any) -> bool:
        try:
            attack.check_setup(candidate)
        except Exception:  # noqa: BLE001 - a model or setting the attack cannot even probe fails
            return False
        return True

    def models_passing(with_setup: Any) -> list[str]:
        names = []
        for name in MODELS:
            if name not in built:
                try:
                    built[name] = build_model(name, with_setup.input_shape, with_setup.num_classes)
                except Exception:  # noqa: BLE001 - a model that cannot take this data shape
                    built[name] = None
            if built[name] is not None and passes(
                replace(with_setup, model=built[name], model_name=name)
            ):
                names.append(name)
        return names

    names = models_passing(setup)
    if names:
        return f"models that meet it: {', '.join(names)} (model.name)"
    fixes: list[tuple[str, dict[str, Any]]] = []
    if setup.loss not in (None, "cross_entropy"):
        fixes.append(('client.loss = "cross_entropy"', {"loss": "cross_entropy"}))
    if setup.batch_size != 1:
        fixes.append(("client.batch_size = 1", {"batch_size": 1}))
    if setup.protocol == "fedavg":
        if setup.local_steps != 1:
            fixes.append(("client.local_steps = 1", {"local_steps": 1}))
        if not setup.lr > 0:
            fixes.append(("client.lr > 0", {"lr": 0.1}))
    else:
        fixes.append(('federation.protocol = "fedavg"', {"protocol": "fedavg"}))
    if setup.aggregate:
        if setup.clients_per_round != 1:
            fixes.append(("federation.clients_per_round = 1", {"clients_per_round": 1}))
        fixes.append((f"attacks[{index}].targets.aggregate = false", {"aggregate": False}))
    single = [text for text, change in fixes if passes(replace(setup, **change))]
    if single:
        return "set " + " or ".join(single)
    together = [(text, change) for text, change in fixes if "protocol" not in change]
    combined = replace(setup, **{k: v for _, change in together for k, v in change.items()})
    texts = " and ".join(text for text, _ in together)
    if together and passes(combined):
        return f"set {texts}"
    names = models_passing(combined) if together else []
    if names:
        return f"models that meet it with {texts}: {', '.join(names)} (model.name)"
    return "no registered model meets it with this data and these settings"


def check_server_role(
    cfg: Config, model: Any, input_shape: tuple[int, int, int], num_classes: int
) -> None:
    """Before launch: every modification fits the model, and every attack that reads a
    modification's secrets has that modification in each round it attacks (and, per client,
    for each client it attacks)."""

    mods = cfg.server.modifications
    for i, spec in enumerate(mods):
        try:
            MODIFICATIONS.create(spec.name, **spec.params).check_model(
                model, input_shape, num_classes
            )
        except UserError as exc:
            raise ConfigError(f"server.modifications[{i}] ({spec.name}): {exc}") from None
    for i, attack in enumerate(cfg.attacks):
        need = getattr(ATTACKS.get(attack.name), "modification", None)
        if need is None:
            continue
        mine = [m for m in mods if m.name == need]
        how = f'add [[server.modifications]] name = {need!r} covering them (with [server] role = "malicious")'
        covered = set().union(*(set(m.targets.rounds) for m in mine)) if mine else set()
        missing = sorted(set(attack.targets.rounds) - covered)
        if missing:
            raise ConfigError(
                f"attacks[{i}] ({attack.name}): needs the server modification {need!r} in "
                f"round(s) {missing}; {how}"
            )
        if attack.targets.clients and all(m.targets.clients for m in mine):
            crafted = set().union(*(set(m.targets.clients) for m in mine))
            outside = sorted(set(attack.targets.clients) - crafted)
            if outside:
                raise ConfigError(
                    f"attacks[{i}] ({attack.name}): client(s) {outside} do not get the {need!r} "
                    f"model (server.modifications targets.clients = {sorted(crafted)})"
                )


def install_interrupt_handlers(sink: dict[str, Any]) -> dict[int, Any]:
    """Make SIGINT and SIGTERM both end a run the same way: mark ``sink["interrupted"]`` (the
    server stops at its next exchange) and raise :class:`KeyboardInterrupt` in the main thread
    (the launcher then writes the interrupted summary, the CLI exits 130). Returns the previous
    handlers; nothing changes outside the main thread (signals only reach it), nor for a signal
    the process ignores."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum: int, frame: Any) -> None:
        sink["interrupted"] = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is signal.SIG_IGN:  # e.g. a sweep worker: Ctrl-C is the sweep's
            continue
        previous[signum] = signal.signal(signum, interrupt)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_interrupt_handlers` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def write_interrupted_summary(
    folder: Any, sink: dict[str, Any], ray: dict[str, Any] | None = None
) -> None:
    """Leave the run folder readable after an interrupt: ``summary.json`` with
    ``"status": "interrupted"`` and every metric so far (the server's ``sink["partial"]``;
    just the status when training had not started), the ``ray`` record as far as it got,
    ``metrics.jsonl`` fsync'd."""
    sink["interrupted"] = True
    partial = sink.get("partial")
    summary: dict[str, Any] = {"status": "interrupted"}
    for _ in range(3):  # the server's thread may be adding to what it summarises
        try:
            summary = partial("interrupted") if partial is not None else summary
            break
        except Exception as exc:  # noqa: BLE001 - a summary of what is there, whatever it is
            log.warning("could not summarise the interrupted run: %s", exc)
            time.sleep(0.2)
    summary.setdefault("run_dir", str(folder.path))
    if ray is not None:
        summary.setdefault("ray", ray)
    folder.flush_round()
    folder.write_summary(summary)


def run(
    cfg: Config, *, out: str | Path | None = None, show_progress: bool = True, verbose: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Run one federation described by ``cfg``; returns the run folder and the summary.

    SIGINT or SIGTERM ends the run with :class:`KeyboardInterrupt` after writing
    ``summary.json`` with ``"status": "interrupted"`` (:func:`write_interrupted_summary`)."""
    prepare_environment()
    validate_before_launch(cfg)
    # an existing cluster must answer before anything is written (ConfigError otherwise)
    ray_info: dict[str, Any] = (
        reach_cluster(cfg.federation.ray_address)
        if cfg.federation.ray_address
        else {"address": "local"}
    )
    if cfg.federation.secure_aggregation.mode == "secagg+":  # Flower's workflow path, SecAgg+
        from clients.secagg_client import app as client_app
        from strategies.secure_aggregation import make_secagg_server_app as make_server_app
    else:
        from clients.client_app import app as client_app
        from strategies.server_app import make_server_app

    folder = start_run_folder(cfg, make_run_dir(cfg.output.dir, cfg.name, out))
    progress = Progress(rounds=cfg.federation.rounds, attacks=0, enabled=show_progress)
    sink: dict[str, Any] = {}
    server_app = make_server_app(cfg, folder, progress, sink)
    if not verbose:
        # run_simulation's deprecation notice and Flower's round logs: shown with --verbose only
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.ERROR)
        flwr_log.propagate = False
    previous = install_interrupt_handlers(sink)
    try:
        launch(
            server_app,
            client_app,
            num_supernodes=cfg.federation.num_clients,
            backend=backend_config(cfg, verbose=verbose, connect=ray_info.get("connect")),
            verbose=verbose,
            ray_record=ray_info,
        )
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray's driver SIGTERM handler, which
        # ray.init puts in place of ours, exits with sys.exit
        write_interrupted_summary(folder, sink, ray_info)
        raise KeyboardInterrupt(f"run folder {folder.path} (summary.json: interrupted)") from None
    finally:
        restore_handlers(previous)
        progress.close()
    if "summary" not in sink and sink.get("interrupted"):  # the simulation swallowed the signal
        raise KeyboardInterrupt(f"run folder {folder.path} (summary.json: interrupted)")
    if "summary" not in sink:
        raise RuntimeError(
            f"the simulation ended without a summary; see {folder.path / 'metrics.jsonl'}"
        )
    summary = sink["summary"]
    summary["ray"] = ray_info  # which cluster, and the nodes the client actors ran on
    folder.write_summary(summary)
    try:
        write_run_report(folder.path)
    except Exception as exc:  # noqa: BLE001 - the report is a view of the folder: never lose the run
        log.warning("could not write %s: %s", folder.path / "report.html", exc)
    return folder.path, summary
