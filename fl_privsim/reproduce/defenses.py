"""Client defenses against gradient leakage: accuracy, ε, attack success (issue 4's evaluation).

Wei & Liu, "Gradient Leakage Attack Resilient Deep Learning" (IEEE TIFS 2022; methods.md §3)
claim that DP-SGD with *dynamic* noise (σ_t falling over the rounds: linear, staircase,
exponential, cyclic) keeps accuracy higher than fixed-σ DP-SGD at the same privacy guarantee
while the gradient-leakage attacks still fail. This reproduction measures, for every defense,
seed 002's four metrics on an MNIST subset:

1. **test accuracy** after a short offline FedAvg run (``clients`` clients, all taking part in
   each of ``rounds`` rounds, ``local_steps`` SGD steps of ``batch_size`` each), every client
   computing its update with :func:`clients.local_update.local_update` and its own defense
   stack (the code the Flower ClientApp runs), the server averaging the updates;
2. **ε at δ** (the defense's own accountant, worst client, after the last round);
3. **attack success rate** (MSE ≤ ``asr_mse`` after matching, the scorer's rule) and
4. **PSNR / SSIM** of ``idlg`` (batch 1) and ``analytic`` (batch ``analytic_batch``) against
   the defended FedSGD gradient of a client at round ``attack_round`` (the defense's own
   global model of that round).

**Equal ε.** The fixed-σ row (``dp_sgd``) and the four dynamic rows (``dynamic_dp``, all with
the same fixed clipping bound ``clip_norm`` and σ_t per round) are calibrated to the same final
ε = ``target_epsilon`` after ``rounds × local_steps`` steps at q = batch / client examples: σ of
``dp_sgd`` and a factor ``a`` on the paper's schedule (σ_t = a·s(t, T), T = rounds − 1, so the
shape 15 → 4.85 is kept) are found by bisection with the simulator's accountant
(:class:`clients.defenses.accounting.PrivacyAccountant`). The factor is applied by replacing the
built defense's ``schedule`` function (``dynamic_dp`` has no scale parameter). The ε in the
table is what the defenses' accountants report after the run, not the target.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
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
from fl_privsim.data import ImageData, load_dataset
from fl_privsim.errors import ConfigError
from fl_privsim.metrics import attack_success_rate, match_reconstructions, mse, psnr, ssim
from fl_privsim.models import build_model
from fl_privsim.reproduce.base import (
    ReproContext,
    Reproduction,
    ReproResult,
    markdown_table,
    register,
)
from fl_privsim.seeding import seed_int

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "staircase", "exponential", "cyclic")
#: Every row the reproduction knows, in table order (``rows`` picks among them).
ROWS = ("none", "dp_fixed", *(f"dynamic_{s}" for s in SCHEDULES), "pruning", "signsgd",
        "quantization", "noise", "identical_labels")
#: Integer ids of the rows in seed keys (never renumber).
_ROW_ID = {name: i + 1 for i, name in enumerate(ROWS)}

PAPER = {
    "none": "attacks succeed",
    "dp_fixed": "loses accuracy; still vulnerable (fixed σ)",
    **{f"dynamic_{s}": "higher accuracy than fixed σ at equal ε; attacks fail" for s in SCHEDULES},
    "pruning": "-", "signsgd": "-", "quantization": "-", "noise": "-",
    "identical_labels": "analytic de-mixing fails (Eloul et al.)",
}

DEFAULTS: dict[str, Any] = {
    "rows": list(ROWS),
    "model": "mlp",
    "clients": 5,
    "examples_per_client": 500,
    "test_examples": 2000,
    "rounds": 20,
    "local_steps": 5,
    "batch_size": 32,
    "lr": 0.1,
    "target_epsilon": 3.0,
    "delta": 1e-5,
    "clip_norm": 1.0,
    "pruning_ratio": 0.9,
    "quantization_bits": 8,
    "noise_scale": 0.01,
    "attack_round": 10,
    "attack_trials": 3,
    "idlg_iterations": 100,
    "analytic_batch": 4,
    "asr_mse": 0.01,
}
QUICK: dict[str, Any] = {
    "rows": ["none", "dp_fixed", "dynamic_linear", "identical_labels"],
    "clients": 2,
    "examples_per_client": 128,
    "test_examples": 256,
    "rounds": 3,
    "local_steps": 2,
    "batch_size": 16,
    "attack_round": 2,
    "attack_trials": 1,
    "idlg_iterations": 5,
}


def _epsilon(sigmas: list[float], q: float, steps_per_round: int, delta: float) -> float:
    """ε(δ) of ``steps_per_round`` steps at each σ of ``sigmas``, by the defenses' accountant."""
    acc = PrivacyAccountant()
    acc.accountant.history = [(float(s), float(q), int(steps_per_round)) for s in sigmas]
    with warnings.catch_warnings():  # "optimal order is the smallest alpha" far from the target
        warnings.filterwarnings("ignore", message="Optimal order")
        return acc.epsilon(delta)


def _bisect_scale(base: list[float], q: float, steps: int, delta: float, target: float) -> float:
    """The factor a with ε(a·base) = target (ε falls as a grows), to 1e-4 relative in ε:
    a bracket by doubling, then regula falsi (Illinois) on log ε against log a."""
    def g(log_a: float) -> float:
        return math.log(_epsilon([math.exp(log_a) * s for s in base], q, steps, delta)) - math.log(target)

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


def _specs(row: str, s: dict[str, Any], sigma_fixed: float) -> list[dict[str, Any]]:
    if row == "none":
        return []
    if row == "dp_fixed":
        return [{"name": "dp_sgd", "params": {"noise_multiplier": sigma_fixed, "max_grad_norm": s["clip_norm"],
                                              "delta": s["delta"]}}]
    if row.startswith("dynamic_"):
        return [{"name": "dynamic_dp", "params": {"schedule": row.removeprefix("dynamic_"),
                                                  "horizon": max(1, s["rounds"] - 1), "clipping": "fixed",
                                                  "clip_norm": s["clip_norm"], "delta": s["delta"]}}]
    if row == "pruning":
        return [{"name": "pruning", "params": {"ratio": s["pruning_ratio"]}}]
    if row == "signsgd":
        return [{"name": "signsgd", "params": {"scale": "l1"}}]
    if row == "quantization":
        return [{"name": "quantization", "params": {"dtype": "int", "bits": s["quantization_bits"]}}]
    if row == "noise":
        return [{"name": "noise", "params": {"scale": s["noise_scale"]}}]
    if row == "identical_labels":
        return [{"name": "identical_labels", "params": {}}]
    raise ConfigError(f"defenses.rows: unknown row {row!r}; allowed: {', '.join(ROWS)}")


def _build(row: str, s: dict[str, Any], sigma_fixed: float, scales: dict[str, float]) -> list[Any]:
    stack = build_defenses(_specs(row, s, sigma_fixed))
    if row.startswith("dynamic_"):
        base = resolve_schedule(row.removeprefix("dynamic_"))
        a = scales[row]
        stack[0].schedule = lambda t, T, _f=base, _a=a: _a * _f(t, T)  # the calibrated σ_t = a·s(t, T)
    return stack


def _draw(stack: list[Any], part: np.ndarray, labels: np.ndarray, bs: int, n: int,
          gen: torch.Generator) -> list[np.ndarray]:
    sampler = batch_sampler(stack)
    if sampler is not None:
        return draw_batches(sampler, part, labels[part], batch_size=bs, num_batches=n, generator=gen)
    return [part[torch.randperm(len(part), generator=gen)[:bs].numpy()] for _ in range(n)]


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(c).argmax(1) for c in x.split(512)])
    model.train()
    return float((pred == y).double().mean())


def _observation(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, stack: list[Any],
                 data: ImageData, gen: torch.Generator, rnd: int, dataset_size: int) -> Observation:
    """A defended FedSGD observation, built as :func:`fl_privsim.offline.client_observation`."""
    global_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = local_update(copy.deepcopy(model), [(x, y)], protocol="fedsgd", lr=0.1, defenses=stack,
                       generator=gen, server_round=rnd, dataset_size=dataset_size,
                       expected_batch_size=int(x.shape[0]))
    return Observation(
        round=rnd, client_id=0, protocol="fedsgd", model=copy.deepcopy(model), global_params=global_params,
        update=res.update, batch_size=int(x.shape[0]), local_steps=1, lr=0.1,
        num_examples=res.num_examples, input_shape=tuple(int(v) for v in x.shape[1:]),  # type: ignore[arg-type]
        num_classes=data.num_classes, data_mean=tuple(float(m) for m in data.mean),
        data_std=tuple(float(v) for v in data.std),
    )


def _score(raw: torch.Tensor, rec: torch.Tensor, threshold: float) -> tuple[float, float, float]:
    perm = match_reconstructions(raw, rec)
    ok = perm >= 0
    o = raw[torch.from_numpy(ok)]
    m = rec[torch.from_numpy(perm[ok])]
    if o.shape[0] == 0:
        return 0.0, float("nan"), float("nan")
    asr = attack_success_rate(mse(o, m), threshold, raw.shape[0])
    return asr, float(psnr(o, m).mean()), float(ssim(o, m).mean())


def run(settings: dict[str, Any], ctx: ReproContext) -> ReproResult:
    """Train, account and attack every row (see the module docstring)."""
    s = settings
    rows = list(s["rows"])
    bad = sorted(set(rows) - set(ROWS))
    if bad:
        raise ConfigError(f"defenses.rows: unknown row(s) {bad}; allowed: {', '.join(ROWS)}")
    if not 1 <= s["attack_round"] <= s["rounds"]:
        raise ConfigError("defenses.attack_round must lie in 1..rounds")
    for key in ("clients", "examples_per_client", "rounds", "local_steps", "batch_size", "attack_trials",
                "analytic_batch", "test_examples"):
        if s[key] < 1:
            raise ConfigError(f"defenses.{key} must be >= 1")
    n_train = s["clients"] * s["examples_per_client"]
    data = load_dataset("mnist_idx", root=ctx.data("mnist"), max_examples=n_train, seed=ctx.seed)
    labels = data.labels("train", slice(None)).numpy()
    if len(labels) < n_train:
        raise ConfigError(f"defenses: MNIST has {len(labels)} train images, need {n_train}")
    order = torch.randperm(len(labels), generator=ctx.generator("partition")).numpy()
    parts = [order[c * s["examples_per_client"]:(c + 1) * s["examples_per_client"]] for c in range(s["clients"])]
    n_test = min(s["test_examples"], data.labels("test", slice(None)).numel())
    test_idx = torch.randperm(data.labels("test", slice(None)).numel(), generator=ctx.generator("split"))[:n_test]
    x_test, y_test = data.normalize(data.images("test", test_idx)), data.labels("test", test_idx)

    # Calibration to equal final ε.
    q = s["batch_size"] / s["examples_per_client"]
    horizon = max(1, s["rounds"] - 1)
    sigma_fixed = _bisect_scale([1.0] * s["rounds"], q, s["local_steps"], s["delta"], s["target_epsilon"])
    scales: dict[str, float] = {}
    for sched in SCHEDULES:
        fn = resolve_schedule(sched)
        base = [fn(t, horizon) for t in range(s["rounds"])]
        scales[f"dynamic_{sched}"] = _bisect_scale(base, q, s["local_steps"], s["delta"], s["target_epsilon"])
    log.info("defenses: q=%.4f, fixed σ=%.3f, schedule factors %s", q, sigma_fixed, scales)

    idlg = ATTACKS.create("idlg", iterations=s["idlg_iterations"])
    analytic = ATTACKS.create("analytic")
    summary: dict[str, Any] = {"sample_rate": q, "sigma_fixed": sigma_fixed,
                               **{f"schedule_factor_{k}": v for k, v in scales.items()}}
    table_rows = []
    start_all = time.perf_counter()
    for row in rows:
        t0 = time.perf_counter()
        rid = _ROW_ID[row]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_int(ctx.seed, "model_init"))
            model = build_model(s["model"], data.input_shape, data.num_classes).train()
        stacks = [_build(row, s, sigma_fixed, scales) for _ in range(s["clients"])]
        attack_model = None
        losses: list[float] = []
        eps: list[float] = []
        sigmas: list[float] = []
        for rnd in range(1, s["rounds"] + 1):
            if rnd == s["attack_round"]:
                attack_model = copy.deepcopy(model)
            updates = []
            for c, part in enumerate(parts):
                gen = ctx.generator("batch", rid, rnd, c)
                idx = _draw(stacks[c], part, labels, s["batch_size"], s["local_steps"], gen)
                batches = [(data.normalize(data.images("train", torch.as_tensor(i))),
                            data.labels("train", torch.as_tensor(i))) for i in idx]
                res = local_update(copy.deepcopy(model), batches, protocol="fedavg", lr=s["lr"],
                                   defenses=stacks[c], generator=ctx.generator("defense", rid, rnd, c),
                                   server_round=rnd, dataset_size=len(part),
                                   expected_batch_size=s["batch_size"])
                updates.append(res.update)
                losses.append(res.loss)
                if rnd == s["rounds"]:
                    eps += [v for k, v in res.metrics.items() if k.endswith(".epsilon")]
                sigmas += [v for k, v in res.metrics.items() if k.endswith((".sigma", ".noise_multiplier"))]
            with torch.no_grad():
                for name, p in model.state_dict().items():
                    p.add_(sum(u[name] for u in updates) / len(updates))
        acc = _accuracy(model, x_test, y_test)
        train_s = time.perf_counter() - t0

        # Attacks on the defended FedSGD gradient of client 0 at attack_round.
        assert attack_model is not None
        part = parts[0]
        scores: dict[str, list[tuple[float, float, float]]] = {"idlg": [], "analytic": []}
        for trial in range(s["attack_trials"]):
            for name, attack, bs in (("idlg", idlg, 1), ("analytic", analytic, s["analytic_batch"])):
                stack = _build(row, s, sigma_fixed, scales)
                gen = ctx.generator("attack", rid, trial, bs)
                idx = torch.as_tensor(_draw(stack, part, labels, bs, 1, gen)[0])
                raw = data.images("train", idx)
                obs = _observation(attack_model, data.normalize(raw), data.labels("train", idx), stack, data,
                                   ctx.generator("defense", rid, trial, bs), s["attack_round"], len(part))
                try:
                    out = attack(obs, device=ctx.device, generator=ctx.generator("attack", rid, trial, bs, 1))
                    rec = data.denormalize(out.inputs.detach().cpu()).clamp(0, 1)
                    scores[name].append(_score(raw, rec, s["asr_mse"]))
                except Exception as exc:  # a defended update the attack refuses counts as a failure
                    log.info("defenses: %s on %s failed: %s", name, row, exc)
                    scores[name].append((0.0, float("nan"), float("nan")))
        seconds = time.perf_counter() - t0
        epsilon = max(eps) if eps else None
        cell = {"accuracy": acc, "epsilon": epsilon, "final_loss": float(np.mean(losses[-s["clients"]:])),
                "train_seconds": train_s, "seconds": seconds,
                "sigma_mean": float(np.mean(sigmas)) if sigmas else None}
        for name, vals in scores.items():
            arr = np.asarray(vals, dtype=np.float64)
            cell[f"{name}_asr"] = float(arr[:, 0].mean())
            cell[f"{name}_psnr"] = float(np.nanmean(arr[:, 1])) if np.isfinite(arr[:, 1]).any() else None
            cell[f"{name}_ssim"] = float(np.nanmean(arr[:, 2])) if np.isfinite(arr[:, 2]).any() else None
        for k, v in cell.items():
            summary[f"{k}_{row}"] = v
        log.info("defenses: %s done in %.1f s (acc %.3f, eps %s)", row, seconds, acc, epsilon)

        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None or not math.isfinite(v) else format(v, fmt)

        table_rows.append([
            row, f(acc, ".3f"), "∞ (no DP)" if epsilon is None else f(epsilon, ".2f"),
            f(cell["sigma_mean"], ".2f"),
            f(cell["idlg_asr"], ".2f"), f(cell["idlg_psnr"], ".1f"), f(cell["idlg_ssim"], ".3f"),
            f(cell["analytic_asr"], ".2f"), f(cell["analytic_psnr"], ".1f"), f(cell["analytic_ssim"], ".3f"),
            PAPER[row],
        ])
    summary["seconds_total"] = time.perf_counter() - start_all
    header = ["defense", "test acc", f"ε (δ={s['delta']:g})", "mean σ_t", "iDLG ASR", "iDLG PSNR",
              "iDLG SSIM", f"analytic ASR (B={s['analytic_batch']})", "analytic PSNR", "analytic SSIM",
              "paper (qualitative)"]
    table = markdown_table(header, table_rows)
    table += (
        f"\n\nMNIST, {s['clients']} clients × {s['examples_per_client']} train images (IID), FedAvg "
        f"{s['rounds']} rounds × {s['local_steps']} local steps, batch {s['batch_size']}, lr {s['lr']}, "
        f"model `{s['model']}`; test accuracy on {n_test} test images. DP rows: clipping C = {s['clip_norm']} "
        f"(fixed), q = {q:.4f}, calibrated to ε = {s['target_epsilon']} at the end: fixed σ = "
        f"{sigma_fixed:.3f}; schedule factors "
        + ", ".join(f"{k.removeprefix('dynamic_')} ×{v:.3f}" for k, v in scales.items())
        + f" (σ_t = factor · the paper's 15 → 4.85 curve, T = {horizon}). Attacks: the defended FedSGD "
        f"gradient of client 0 at round {s['attack_round']}, {s['attack_trials']} trials each; iDLG batch 1 "
        f"({s['idlg_iterations']} iterations), analytic batch {s['analytic_batch']}; ASR = share of images "
        f"with matched MSE ≤ {s['asr_mse']} (PSNR ≥ {10 * math.log10(1 / s['asr_mse']):.0f} dB). signsgd uses "
        f"the l1 scale; noise is Gaussian σ = {s['noise_scale']} on the update (not DP)."
    )
    return ReproResult(summary=summary, table=table)


register(
    Reproduction(
        name="defenses",
        title="Wei & Liu / seed 002: defenses' accuracy, ε, and iDLG/analytic success (MNIST)",
        defaults=DEFAULTS,
        quick=QUICK,
        run=run,
    )
)
