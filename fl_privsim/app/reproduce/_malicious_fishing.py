"""The fishing and inspection parts of ``reproduce robbing_the_fed``.

Fishing (Wen et al., ICML 2022): 10 clients × 2 records of digits on the sigmoid LeNet; the
server picks its target class at random (it does not know which classes the round holds).
Class fishing silences every record of another class, so the aggregate's gradient is that of
the target class's records, and Inverting Gradients runs on it for one record. The baseline is
Inverting Gradients on the unmodified aggregate of the same 20 records, with the same iteration
budget; both are scored on the same record (the target-class record the fished reconstruction
matches best; the baseline's PSNR for that record comes from its one-to-one match). Trials where
the round holds no record of the target class score nothing and are counted.

Inspection: :func:`fl_privsim.app.inspection_rates.measure` on digits (detection per modification
variant, false alarms on honest models over rounds of real FedAvg training).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from adversaries.base import ATTACKS
from adversaries.malicious import MODIFICATIONS, ServerView
from fl_privsim.app.inspection_rates import measure
from fl_privsim.app.reproduce.base import ReproContext
from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.metrics import match_reconstructions, mse, psnr
from fl_privsim.core.models import build_model
from fl_privsim.core.results import markdown_table
from fl_privsim.core.seeding import numpy_rng, seed_int, torch_generator
from fl_privsim.engine.offline import aggregate_observation, client_observation

CLIENTS, PER_CLIENT, ITERATIONS = 10, 2, 300


def _trial(data: ImageData, seed: int, public: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    rng = numpy_rng(seed, 0, "batch")
    idx = rng.choice(len(data.train_y), CLIENTS * PER_CLIENT, replace=False)
    x01, y = data.images("train", idx), data.labels("train", idx)
    x = data.normalize(x01)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(seed, "model_init"))
        honest = build_model("lenet", data.input_shape, data.num_classes)
    view = ServerView(
        round=1,
        clients=tuple(range(CLIENTS)),
        targets=tuple(range(CLIENTS)),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        data_mean=data.mean,
        data_std=data.std,
        protocol="fedsgd",
        batch_size=PER_CLIENT,
        local_steps=1,
        lr=0.1,
        public_inputs=public[0],
        public_labels=public[1],
        generator=torch_generator(seed, 1, 0, "modification"),
    )
    crafted = MODIFICATIONS.create("fishing").craft(honest, view)
    target = int(crafted.secrets["target_class"])

    def observe(model: torch.nn.Module) -> Any:
        parts = [
            client_observation(
                copy.deepcopy(model),
                [
                    (
                        x[c * PER_CLIENT : (c + 1) * PER_CLIENT],
                        y[c * PER_CLIENT : (c + 1) * PER_CLIENT],
                    )
                ],
                protocol="fedsgd",
                lr=0.1,
                mean=data.mean,
                std=data.std,
                num_classes=data.num_classes,
                client_id=c,
            )
            for c in range(CLIENTS)
        ]
        return aggregate_observation(parts)

    count = int((y == target).sum())
    row: dict[str, Any] = {"seed": seed, "target_class": target, "target_records": count}
    if count == 0:
        return row
    gen = torch_generator(seed, 1, -1, "attack")
    fished = ATTACKS.create("fishing", iterations=ITERATIONS)(
        dataclasses.replace(observe(crafted.model), server_secrets={"fishing": crafted.secrets}),
        generator=gen,
    )
    rec = data.denormalize(fished.inputs.detach().cpu()).clamp(0, 1)
    members = torch.nonzero(y == target).flatten()
    errs = mse(x01[members], rec.expand(len(members), *rec.shape[1:]))
    best = int(members[int(torch.argmin(errs))])
    row["fishing_psnr"] = float(psnr(x01[best : best + 1], rec)[0])
    row["estimated_records"] = float(fished.metrics.get("estimated_records", float("nan")))
    base = ATTACKS.create("inverting_gradients", iterations=ITERATIONS)(
        observe(honest), generator=gen
    )
    brec = data.denormalize(base.inputs.detach().cpu()).clamp(0, 1)
    perm = match_reconstructions(x01, brec)
    row["ig_psnr"] = (
        float(psnr(x01[best : best + 1], brec[int(perm[best]) : int(perm[best]) + 1])[0])
        if perm[best] >= 0
        else float("nan")
    )
    return row


def fishing_comparison(
    data_cifar: ImageData, settings: dict[str, Any], ctx: ReproContext
) -> dict[str, Any]:
    """Class fishing vs Inverting Gradients on the same aggregate, over ``max(5, 3·seeds)`` trials."""
    del data_cifar  # the comparison runs on digits (see the module docstring)
    data = load_dataset("digits", seed=0)
    public = (
        data.normalize(data.images("test", np.arange(len(data.test_y)))),
        data.labels("test", np.arange(len(data.test_y))),
    )
    trials = [_trial(data, ctx.seed + i, public) for i in range(max(5, 3 * settings["seeds"]))]
    scored = [t for t in trials if "fishing_psnr" in t]
    one = [t for t in scored if t["target_records"] == 1]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    header = [
        "trials",
        "target class held by",
        "fishing PSNR (target record)",
        "IG on the aggregate (same record)",
        "gain dB",
    ]
    rows = [
        [
            len(one),
            "exactly 1 record",
            mean(one, "fishing_psnr"),
            mean(one, "ig_psnr"),
            mean(one, "fishing_psnr") - mean(one, "ig_psnr"),
        ],
        [
            len(scored),
            ">= 1 record",
            mean(scored, "fishing_psnr"),
            mean(scored, "ig_psnr"),
            mean(scored, "fishing_psnr") - mean(scored, "ig_psnr"),
        ],
        [len(trials) - len(scored), "no record (nothing to fish)", None, None, None],
    ]
    table = (
        "Class fishing, digits / lenet, 10 clients × 2 records, FedSGD, "
        f"{ITERATIONS} IG iterations each\n\n" + markdown_table(header, rows)
    )
    return {
        "trials": trials,
        "gain_one_record_db": mean(one, "fishing_psnr") - mean(one, "ig_psnr"),
        "gain_db": mean(scored, "fishing_psnr") - mean(scored, "ig_psnr"),
        "table": table,
    }


def inspection_table(settings: dict[str, Any], ctx: ReproContext) -> dict[str, Any]:
    """model_inspection's detection rate per modification variant and its false-alarm rate."""

    result = measure(seeds=tuple(range(ctx.seed, ctx.seed + max(2, settings["seeds"]))))
    fa = result["false_alarms"]
    rows = [
        [
            label,
            d["n"],
            d["detected"],
            d["rate"],
            d["lower95"],
            ", ".join(sorted(d.get("by_check", {}))),
        ]
        for label, d in sorted(result["detection"].items())
    ]
    rows.append(
        [
            "honest models (false alarms)",
            fa["n"],
            fa["alarms"],
            fa["rate"],
            None,
            f"upper 95 %: {fa['upper95']:.3f}",
        ]
    )
    header = ["model sent", "inspected", "refused", "rate", "lower 95 %", "checks that fired"]
    table = (
        "model_inspection on digits: crafted models at rounds 0, middle and last of honest FedAvg "
        "training, and every honest model of those trajectories\n\n" + markdown_table(header, rows)
    )
    return {"false_alarms": fa, "detection": result["detection"], "table": table}
