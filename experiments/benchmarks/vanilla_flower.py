"""Vanilla Flower doing fl-privsim's local work, for the scale and overhead benchmarks.

A minimal ServerApp (``flwr.serverapp.strategy.FedAvg`` with a central ``evaluate_fn``) and a
minimal ClientApp (``@app.train()`` / ``@app.evaluate()``) that train the same registered
model with the same local work as an fl-privsim FedAvg client: ``local_steps`` SGD steps on
batches of ``batch_size`` drawn from an iid partition of the same size, replying with the
weights. No config text, no wrappers, no metrics sink, no per-client state.

The work travels in the train ConfigRecord (``data``, ``root``, ``model``, ``batch-size``,
``local-steps``, ``lr``); each client process loads the dataset and cuts the partitions
once (cached), as a typical Flower user's ``load_data`` does.

    python experiments/benchmarks/vanilla_flower.py --clients 100 --per-round 10 --rounds 3
prints one JSON line: ``round_seconds`` (between consecutive central evaluations) and ``wall``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.models import build_model

client_app = ClientApp()


@functools.lru_cache(maxsize=2)
def _data(name: str, root: str) -> ImageData:
    return load_dataset(name, root=root or None)


@functools.lru_cache(maxsize=4)
def _parts(name: str, root: str, split: str, n: int) -> list[np.ndarray]:
    data = _data(name, root)
    size = len(data.train_y if split == "train" else data.test_y)
    perm = np.random.default_rng(0 if split == "train" else 1).permutation(size)
    return [np.sort(p) for p in np.array_split(perm, min(n, size))]


def _model(cfg: Any, arrays: ArrayRecord) -> torch.nn.Module:
    data = _data(str(cfg["data"]), str(cfg["root"]))
    torch.set_num_threads(1)
    model = build_model(str(cfg["model"]), data.input_shape, data.num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """``local-steps`` SGD steps on batches of this client's partition; reply with weights."""
    cfg = msg.content["config"]
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    name, root = str(cfg["data"]), str(cfg["root"])
    data = _data(name, root)
    part = _parts(name, root, "train", n)[pid]
    model = _model(cfg, msg.content["arrays"])
    gen = torch.Generator().manual_seed(int(cfg["server-round"]) * 100003 + pid)
    bs = min(int(cfg["batch-size"]), len(part))
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    model.train()
    seen = 0
    for _ in range(int(cfg["local-steps"])):
        idx = part[torch.randperm(len(part), generator=gen)[:bs].numpy()]
        x, y = data.normalize(data.images("train", idx)), data.labels("train", idx)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        seen += len(idx)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": seen, "loss": float(loss)}),
        }
    )
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
@torch.no_grad()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy and loss on this client's iid test shard."""
    cfg = msg.content["config"]
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    name, root = str(cfg["data"]), str(cfg["root"])
    data = _data(name, root)
    parts = _parts(name, root, "test", n)
    idx = parts[pid % len(parts)]
    model = _model(cfg, msg.content["arrays"]).eval()
    logits = model(data.normalize(data.images("test", idx)))
    y = data.labels("test", idx)
    metrics = {
        "num-examples": len(idx),
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "loss": float(F.cross_entropy(logits, y)),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_server_app(args: argparse.Namespace, out: dict[str, Any]) -> Any:
    """FedAvg over ``args.per_round`` of ``args.clients``, evaluation on as many, plus a
    central evaluation each round; ``out["round_seconds"]`` gets the time between them.
    (Flower's server side is imported here, not by the module the client actors import, as
    a Flower app keeps its ServerApp and ClientApp in separate modules.)"""
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    server = ServerApp()
    data = _data(args.data, args.root)
    x_test = data.normalize(data.images("test", range(len(data.test_y))))

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        model = build_model(args.model, data.input_shape, data.num_classes)
        k = min(args.per_round, args.clients)
        share = k / args.clients
        strategy = FedAvg(
            fraction_train=share,
            fraction_evaluate=share if args.evaluate else 0.0,
            min_train_nodes=k,
            min_evaluate_nodes=k if args.evaluate else 0,
            min_available_nodes=args.clients,
        )
        stamps: list[float] = []

        @torch.no_grad()
        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            model.eval()
            acc = float((model(x_test).argmax(1) == data.test_y).float().mean())
            stamps.append(time.perf_counter())
            out["accuracy"] = acc
            return MetricRecord({"accuracy": acc})

        cfg = {
            "data": args.data,
            "root": args.root,
            "model": args.model,
            "batch-size": args.batch_size,
            "local-steps": args.local_steps,
            "lr": args.lr,
        }
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=args.rounds,
            train_config=ConfigRecord(cfg),
            evaluate_config=ConfigRecord(cfg),
            evaluate_fn=central,
        )
        out["round_seconds"] = [b - a for a, b in itertools.pairwise(stamps)]
        trained = len(result.train_metrics_clientapp)
        if trained != args.rounds:  # FedAvg skips a round whose replies are all errors
            raise RuntimeError(f"only {trained} of {args.rounds} rounds got client updates")

    return server


def backend(args: argparse.Namespace) -> dict[str, Any]:
    """fl-privsim's Ray backend config for the same federation (the same launcher settings)."""
    from fl_privsim.app.simulation import backend_config, prepare_environment
    from fl_privsim.core.config import load

    prepare_environment()
    cfg = load(
        None,
        overrides=[
            f"federation.num_clients={args.clients}",
            f"federation.clients_per_round={min(args.per_round, args.clients)}",
        ],
    )
    return backend_config(cfg)


def main(argv: list[str]) -> int:
    """Run one vanilla Flower federation and print its timings as one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default="digits")
    p.add_argument("--root", default="")
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false")
    args = p.parse_args(argv)
    import logging
    import warnings

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    # The ClientApp of the importable module, not of __main__: Ray pickles __main__'s
    # functions by value, without the module globals they call.
    import vanilla_flower

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(  # Flower as it ships: no fl-privsim patch (strategies.flower_dispatch)
            server_app=make_server_app(args, out),
            client_app=vanilla_flower.client_app,
            num_supernodes=args.clients,
            backend_name="ray",
            backend_config=backend(args),
        )
    out["wall"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
