"""One dataset × seed of the ``defenses`` reproduction: calibrate, train and attack each row.

Split out of :mod:`fl_privsim.app.reproduce.defenses` (which documents the method); every
function here takes the resolved settings ``s`` of one dataset and the ``seed`` of one
repetition; every generator is ``torch_generator(seed, *keys)`` with the keys the
single-seed reproduction used, so seed 0 repeats its numbers.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adversaries import ATTACKS
from adversaries.base import Observation
from clients.defenses import build_defenses
from clients.defenses.accounting import PrivacyAccountant
from clients.defenses.schedules import resolve_schedule
from clients.defenses.stack import batch_sampler, draw_batches
from clients.local_update import local_update
from fl_privsim.core.data import ImageData
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.metrics import (
    attack_success_rate,
    avd_matched,
    match_reconstructions,
    mse,
    psnr,
    ssim,
)
from fl_privsim.core.models import build_model
from fl_privsim.core.seeding import seed_int, torch_generator

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "staircase", "exponential", "cyclic")
#: Every row the reproduction knows, in table order (``rows`` picks among them).
ROWS = (
    "none",
    "dp_fixed",
    *(f"dynamic_{s}" for s in SCHEDULES),
    "pruning",
    "signsgd",
    "quantization",
    "noise",
    "identical_labels",
)
#: Integer ids of the rows in seed keys (never renumber).
ROW_ID = {name: i + 1 for i, name in enumerate(ROWS)}


def epsilon(sigmas: list[float], q: float, steps_per_round: int, delta: float) -> float:
    """ε(δ) of ``steps_per_round`` steps at each σ of ``sigmas``, by the defenses' accountant."""
    acc = PrivacyAccountant()
    acc.accountant.history = [(float(s), float(q), int(steps_per_round)) for s in sigmas]
    with warnings.catch_warnings():  # "optimal order is the smallest alpha" far from the target
        warnings.filterwarnings("ignore", message="Optimal order")
        return acc.epsilon(delta)


def bisect_scale(base: list[float], q: float, steps: int, delta: float, target: float) -> float:
    """The factor a with ε(a·base) = target (ε falls as a grows), to 1e-4 relative in ε:
    a bracket by doubling, then regula falsi (Illinois) on log ε against log a."""

    def g(log_a: float) -> float:
        return math.log(epsilon([math.exp(log_a) * s for s in base], q, steps, delta)) - math.log(
            target
        )

    lo, hi = 0.0, 0.0
    g_lo = g_hi = g(0.0)
    while g_lo < 0:  # ε too small: lower a
        hi, g_hi = lo, g_lo
        lo -= math.log(4.0)
        g_lo = g(lo)
    while g_hi > 0:  # ε too large: raise a
        lo, g_lo = hi, g_hi
        hi += math.log(4.0)
        g_hi = g(hi)
    if g_lo == 0:
        return math.exp(lo)
    side = 0
    mid = hi
    for _ in range(60):
        mid = (lo * g_hi - hi * g_lo) / (g_hi - g_lo)
        g_mid = g(mid)
        if abs(g_mid) < 1e-4 or hi - lo < 1e-9:
            break
        if g_mid > 0:
            lo, g_lo = mid, g_mid
            if side == 1:
                g_hi /= 2
            side = 1
        else:
            hi, g_hi = mid, g_mid
            if side == -1:
                g_lo /= 2
            side = -1
    return math.exp(mid)


def specs(row: str, s: dict[str, Any], sigma_fixed: float) -> list[dict[str, Any]]:
    """The ``[[defenses]]`` entries of ``row``."""
    if row == "none":
        return []
    if row == "dp_fixed":
        return [
            {
                "name": "dp_sgd",
                "params": {
                    "noise_multiplier": sigma_fixed,
                    "max_grad_norm": s["clip_norm"],
                    "delta": s["delta"],
                },
            }
        ]
    if row.startswith("dynamic_"):
        return [
            {
                "name": "dynamic_dp",
                "params": {
                    "schedule": row.removeprefix("dynamic_"),
                    "horizon": max(1, s["rounds"] - 1),
                    "clipping": "fixed",
                    "clip_norm": s["clip_norm"],
                    "delta": s["delta"],
                },
            }
        ]
    if row == "pruning":
        return [{"name": "pruning", "params": {"ratio": s["pruning_ratio"]}}]
    if row == "signsgd":
        return [{"name": "signsgd", "params": {"scale": "l1"}}]
    if row == "quantization":
        return [
            {"name": "quantization", "params": {"dtype": "int", "bits": s["quantization_bits"]}}
        ]
    if row == "noise":
        return [{"name": "noise", "params": {"scale": s["noise_scale"]}}]
    if row == "identical_labels":
        return [{"name": "identical_labels", "params": {}}]
    raise ConfigError(f"defenses.rows: unknown row {row!r}; allowed: {', '.join(ROWS)}")


@dataclass
class Setup:
    """What every row of one dataset × seed shares."""

    data: ImageData
    labels: np.ndarray
    parts: list[np.ndarray]
    x_test: torch.Tensor
    y_test: torch.Tensor
    q: float
    sigma_fixed: float
    scales: dict[str, float]


def calibrate(s: dict[str, Any]) -> tuple[float, float, dict[str, float]]:
    """q, the fixed σ and the schedule factors giving final ε = ``target_epsilon``."""
    q = s["batch_size"] / s["examples_per_client"]
    horizon = max(1, s["rounds"] - 1)
    sigma_fixed = bisect_scale(
        [1.0] * s["rounds"], q, s["local_steps"], s["delta"], s["target_epsilon"]
    )
    scales: dict[str, float] = {}
    for sched in SCHEDULES:
        fn = resolve_schedule(sched)
        base = [fn(t, horizon) for t in range(s["rounds"])]
        scales[f"dynamic_{sched}"] = bisect_scale(
            base, q, s["local_steps"], s["delta"], s["target_epsilon"]
        )
    return q, sigma_fixed, scales


def prepare(
    s: dict[str, Any],
    data: ImageData,
    seed: int,
    calibration: tuple[float, float, dict[str, float]],
) -> Setup:
    """IID client shares and the test subset of ``data`` for one seed."""
    labels = data.labels("train", slice(None)).numpy()
    n_train = s["clients"] * s["examples_per_client"]
    if len(labels) < n_train:
        raise ConfigError(
            f"defenses: {data.name} has {len(labels)} train images, need {n_train} "
            "(clients × examples_per_client)"
        )
    order = torch.randperm(len(labels), generator=torch_generator(seed, "partition")).numpy()
    per = s["examples_per_client"]
    parts = [order[c * per : (c + 1) * per] for c in range(s["clients"])]
    n_all = data.labels("test", slice(None)).numel()
    test_idx = torch.randperm(n_all, generator=torch_generator(seed, "split"))[
        : min(s["test_examples"], n_all)
    ]
    q, sigma_fixed, scales = calibration
    return Setup(
        data,
        labels,
        parts,
        data.normalize(data.images("test", test_idx)),
        data.labels("test", test_idx),
        q,
        sigma_fixed,
        scales,
    )


def build(row: str, s: dict[str, Any], setup: Setup) -> list[Any]:
    """The defense stack of ``row`` (dynamic rows with the calibrated σ_t = a·s(t, T))."""
    stack = build_defenses(specs(row, s, setup.sigma_fixed))
    if row.startswith("dynamic_"):
        base = resolve_schedule(row.removeprefix("dynamic_"))
        a = setup.scales[row]
        stack[0].schedule = lambda t, T, _f=base, _a=a: (
            _a * _f(t, T)
        )  # the calibrated σ_t = a·s(t, T)
    return stack


def draw(
    stack: list[Any], part: np.ndarray, labels: np.ndarray, bs: int, n: int, gen: torch.Generator
) -> list[np.ndarray]:
    """``n`` batches of ``bs`` indices from ``part`` (the stack's sampler, else uniform)."""
    sampler = batch_sampler(stack)
    if sampler is not None:
        return draw_batches(
            sampler, part, labels[part], batch_size=bs, num_batches=n, generator=gen
        )
    return [part[torch.randperm(len(part), generator=gen)[:bs].numpy()] for _ in range(n)]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(c).argmax(1) for c in x.split(512)])
    model.train()
    return float((pred == y).double().mean())


def observation(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    stack: list[Any],
    data: ImageData,
    gen: torch.Generator,
    rnd: int,
    dataset_size: int,
    loss: str = "cross_entropy",
) -> Observation:
    """A defended FedSGD observation, built as :func:`fl_privsim.engine.offline.client_observation`."""
    global_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = local_update(
        copy.deepcopy(model),
        [(x, y)],
        protocol="fedsgd",
        lr=0.1,
        defenses=stack,
        generator=gen,
        server_round=rnd,
        dataset_size=dataset_size,
        expected_batch_size=int(x.shape[0]),
        loss=loss,
    )
    return Observation(
        round=rnd,
        client_id=0,
        protocol="fedsgd",
        model=copy.deepcopy(model),
        global_params=global_params,
        update=res.update,
        batch_size=int(x.shape[0]),
        local_steps=1,
        lr=0.1,
        num_examples=res.num_examples,
        input_shape=tuple(int(v) for v in x.shape[1:]),  # type: ignore[arg-type]
        num_classes=data.num_classes,
        data_mean=tuple(float(m) for m in data.mean),
        data_std=tuple(float(v) for v in data.std),
    )


def score(
    raw: torch.Tensor, rec: torch.Tensor, threshold: float
) -> tuple[float, float, float, float]:
    """ASR, mean PSNR, mean SSIM (after matching) and mean AVD (Eloul et al.'s matching)."""
    perm = match_reconstructions(raw, rec)
    ok = perm >= 0
    o = raw[torch.from_numpy(ok)]
    m = rec[torch.from_numpy(perm[ok])]
    if o.shape[0] == 0:
        return 0.0, float("nan"), float("nan"), float("nan")
    asr = attack_success_rate(mse(o, m), threshold, raw.shape[0])
    return (
        asr,
        float(psnr(o, m).mean()),
        float(ssim(o, m).mean()),
        float(avd_matched(raw, rec).mean()),
    )


def train_row(
    row: str, s: dict[str, Any], setup: Setup, seed: int, *, loss: str = "cross_entropy"
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Offline FedAvg with ``row``'s stacks; the cell's training metrics and the global model
    of round ``attack_round`` (before that round's updates)."""
    t0 = time.perf_counter()
    rid, data = ROW_ID[row], setup.data
    gen = functools.partial(torch_generator, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(seed, "model_init"))
        model = build_model(s["model"], data.input_shape, data.num_classes).train()
    stacks = [build(row, s, setup) for _ in setup.parts]
    attack_model = model
    losses: list[float] = []
    eps: list[float] = []
    sigmas: list[float] = []
    for rnd in range(1, s["rounds"] + 1):
        if rnd == s["attack_round"]:
            attack_model = copy.deepcopy(model)
        updates = []
        for c, part in enumerate(setup.parts):
            idx = draw(
                stacks[c],
                part,
                setup.labels,
                s["batch_size"],
                s["local_steps"],
                gen("batch", rid, rnd, c),
            )
            batches = [
                (
                    data.normalize(data.images("train", torch.as_tensor(i))),
                    data.labels("train", torch.as_tensor(i)),
                )
                for i in idx
            ]
            res = local_update(
                copy.deepcopy(model),
                batches,
                protocol="fedavg",
                lr=s["lr"],
                defenses=stacks[c],
                generator=gen("defense", rid, rnd, c),
                server_round=rnd,
                dataset_size=len(part),
                expected_batch_size=s["batch_size"],
                loss=loss,
            )
            updates.append(res.update)
            losses.append(res.loss)
            if rnd == s["rounds"]:
                eps += [v for k, v in res.metrics.items() if k.endswith(".epsilon")]
            sigmas += [
                v for k, v in res.metrics.items() if k.endswith((".sigma", ".noise_multiplier"))
            ]
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.add_(sum(u[name] for u in updates) / len(updates))
    cell = {
        "accuracy": accuracy(model, setup.x_test, setup.y_test),
        "epsilon": max(eps) if eps else None,
        "final_loss": float(np.mean(losses[-len(setup.parts) :])),
        "train_seconds": time.perf_counter() - t0,
        "sigma_mean": float(np.mean(sigmas)) if sigmas else None,
    }
    return cell, attack_model


def attack_row(
    row: str,
    s: dict[str, Any],
    setup: Setup,
    seed: int,
    attack_model: torch.nn.Module,
    device: torch.device,
) -> dict[str, float | None]:
    """iDLG (batch 1) and analytic (batch ``analytic_batch``) on client 0's defended FedSGD
    gradient at ``attack_round``; ``attack_trials`` each; ASR, PSNR, SSIM per attack."""
    rid, data, part = ROW_ID[row], setup.data, setup.parts[0]
    gen = functools.partial(torch_generator, seed)
    attacks = (
        # iDLG's own loop (no line search), as in the defense papers' evaluations
        ("idlg", ATTACKS.create("idlg", iterations=s["idlg_iterations"], line_search="none"), 1),
        ("analytic", ATTACKS.create("analytic"), s["analytic_batch"]),
    )
    scores: dict[str, list[tuple[float, float, float, float]]] = {"idlg": [], "analytic": []}
    for trial in range(s["attack_trials"]):
        for name, attack, bs in attacks:
            stack = build(row, s, setup)
            idx = torch.as_tensor(
                draw(stack, part, setup.labels, bs, 1, gen("attack", rid, trial, bs))[0]
            )
            raw = data.images("train", idx)
            obs = observation(
                attack_model,
                data.normalize(raw),
                data.labels("train", idx),
                stack,
                data,
                gen("defense", rid, trial, bs),
                s["attack_round"],
                len(part),
            )
            try:
                out = attack(obs, device=device, generator=gen("attack", rid, trial, bs, 1))
                rec = data.denormalize(out.inputs.detach().cpu()).clamp(0, 1)
                scores[name].append(score(raw, rec, s["asr_mse"]))
            except Exception as exc:  # noqa: BLE001 - a refused defended update counts as a failure
                log.info("defenses: %s on %s failed: %s", name, row, exc)
                scores[name].append((0.0, float("nan"), float("nan"), float("nan")))
    cell: dict[str, float | None] = {}
    for name, vals in scores.items():
        arr = np.asarray(vals, dtype=np.float64)
        cell[f"{name}_asr"] = float(arr[:, 0].mean())
        for j, key in ((1, "psnr"), (2, "ssim")):
            cell[f"{name}_{key}"] = (
                float(np.nanmean(arr[:, j])) if np.isfinite(arr[:, j]).any() else None
            )
    return cell
