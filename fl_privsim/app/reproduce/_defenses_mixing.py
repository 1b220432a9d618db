"""The ``mixing_loss`` table of the ``defenses`` reproduction: does the loss choice increase mixing?

Eloul et al. (arXiv:2204.12495; methods.md §5) maximise mixing in the dense layer with
identical-label batches *and* a choice of loss instead of cross-entropy (methods.md does not
name the paper's alternative; the simulator offers the softmax squared error ``mse``,
:mod:`clients.defenses.losses`). For each loss × batch kind (``random``: distinct labels;
``identical``: one class, the defense) × batch size N, on MNIST through the ``linear`` model
(softmax regression, the dense layer of the paper):

* **test accuracy** after the short offline FedAvg run of the MNIST rows (same clients,
  rounds, steps), the clients training with that loss and batch size N, drawing ordinary
  (``random``) or identical-label (``identical``) batches;
* the **analytic** attack (Eloul et al.'s de-mixing, told the loss: the threat model's
  server knows it) on ``mixing_trials`` FedSGD batches of MNIST test images of that kind, at
  a fresh model (``init``) and at the global model of ``attack_round`` of that training run
  (``trained``): PSNR, AVD (Eloul et al.'s metric), share of images recovered (PSNR ≥ 40 dB),
  label accuracy, log10 condition number of the true coefficient matrix A; for ``mse`` also
  the PSNR of an attacker that wrongly assumes cross-entropy.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adversaries import ATTACKS
from adversaries.reconstruction._dense_demix import coefficients, condition_number
from fl_privsim.app.reproduce._defenses_rows import Setup, observation, score, train_row
from fl_privsim.app.reproduce.demixing import _draw_batch, _model
from fl_privsim.core.data import ImageData
from fl_privsim.core.metrics import label_accuracy, match_reconstructions, psnr
from fl_privsim.core.results import markdown_table
from fl_privsim.core.seeding import seed_int, torch_generator

log = logging.getLogger(__name__)

KINDS = {"random": "none", "identical": "identical_labels"}
_LOSS_ID = {"cross_entropy": 1, "mse": 2}
RECOVERED_DB = 40.0


def _attack_cells(
    model: torch.nn.Module,
    data: ImageData,
    kind: str,
    n: int,
    loss: str,
    s: dict[str, Any],
    seed: int,
    device: torch.device,
    stage: int,
) -> dict[str, list[float]]:
    """Scores of the analytic attack on ``mixing_trials`` batches of ``kind`` through ``model``."""
    attack = ATTACKS.create("analytic", loss=loss)
    naive = ATTACKS.create("analytic") if loss != "cross_entropy" else None
    out: dict[str, list[float]] = {}
    for t in range(s["mixing_trials"]):
        gen = torch_generator(seed, "batch", _LOSS_ID[loss], n, t, stage, len(kind))
        idx = _draw_batch(data, "test", kind, n, gen)
        raw, y = data.images("test", idx), data.labels("test", idx)
        x = data.normalize(raw)
        obs = observation(
            model, x, y, [], data, torch_generator(seed, "defense", n, t), 1, 0, loss=loss
        )
        res = attack(obs, device=device, generator=torch_generator(seed, "attack", n, t))
        rec = data.denormalize(res.inputs.detach().cpu()).clamp(0, 1)
        _, mean_psnr, _, avd = score(raw, rec, 0.01)
        per = psnr(raw, rec[torch.as_tensor(match_reconstructions(raw, rec))])
        with torch.no_grad():
            p_true = F.softmax(model(x).double(), dim=1)
        vals = {
            "psnr": mean_psnr,
            "avd": avd,
            "recovered": float((per >= RECOVERED_DB).double().mean()),
            "label_acc": label_accuracy(y, res.labels),
            "log10_cond_true": math.log10(condition_number(coefficients(p_true, y, n, loss))),
        }
        if naive is not None:
            wrong = naive(obs, device=device, generator=torch_generator(seed, "attack", n, t))
            vals["psnr_assume_ce"] = score(
                raw, data.denormalize(wrong.inputs.detach().cpu()).clamp(0, 1), 0.01
            )[1]
        for k, v in vals.items():
            out.setdefault(k, []).append(v)
    return out


def mixing_loss_table(
    s: dict[str, Any], setup: Setup, seed: int, device: torch.device
) -> tuple[dict[str, Any], str]:
    """Run the loss × kind × N grid (module docstring); summary entries and a markdown table."""
    data = setup.data
    summary: dict[str, Any] = {}
    rows = []
    for loss in s["mixing_losses"]:
        for kind, row in KINDS.items():
            for n in s["mixing_batch_sizes"]:
                ts = {**s, "model": s["mixing_model"], "batch_size": int(n)}
                cell, trained = train_row(row, ts, setup, seed, loss=loss)
                init = _model(s["mixing_model"], data, seed_int(seed, "model_init", n))
                stats: dict[str, tuple[float, float]] = {}
                for stage, model in (("init", init), ("trained", trained)):
                    vals = _attack_cells(
                        model,
                        data,
                        kind,
                        int(n),
                        loss,
                        s,
                        seed,
                        device,
                        1 if stage == "init" else 2,
                    )
                    for k, v in vals.items():
                        arr = np.asarray(v, dtype=np.float64)
                        stats[f"{stage}_{k}"] = (float(np.nanmean(arr)), float(np.nanstd(arr)))
                key = f"{loss}_{kind}_b{n}"
                summary[f"mixing_accuracy_{key}"] = cell["accuracy"]
                for k, (m, sd) in stats.items():
                    summary[f"mixing_{k}_{key}"] = m
                    summary[f"mixing_{k}_std_{key}"] = sd
                log.info("defenses mixing_loss: %s done (acc %.3f)", key, cell["accuracy"])

                def pm(k: str, fmt: str = ".1f", stats: dict = stats) -> str:
                    m, sd = stats.get(k, (float("nan"), float("nan")))
                    return "-" if not math.isfinite(m) else f"{m:{fmt}} ± {sd:{fmt}}"

                rows.append(
                    [
                        loss,
                        kind,
                        n,
                        f"{cell['accuracy']:.3f}",
                        pm("init_psnr"),
                        pm("init_avd", ".3f"),
                        f"{stats['init_recovered'][0]:.2f}",
                        pm("trained_psnr"),
                        pm("trained_avd", ".3f"),
                        f"{stats['trained_recovered'][0]:.2f}",
                        f"{stats['trained_label_acc'][0]:.2f}",
                        f"{stats['trained_log10_cond_true'][0]:.2f}",
                        pm("trained_psnr_assume_ce"),
                    ]
                )
    header = [
        "loss",
        "batch labels",
        "N",
        "test acc",
        "PSNR init",
        "AVD init",
        "recovered init",
        "PSNR trained",
        "AVD trained",
        "recovered trained",
        "label acc trained",
        "log10 cond(A_true) trained",
        "PSNR trained, attacker assumes CE",
    ]
    table = markdown_table(header, rows)
    table += (
        f"\n\nMNIST, model `{s['mixing_model']}` (softmax regression), seed {seed}. Accuracy: offline FedAvg "
        f"{s['clients']} clients × {s['examples_per_client']} images, {s['rounds']} rounds × {s['local_steps']} "
        f"local steps, lr {s['lr']}, batch N, ordinary batches (random) or identical_labels (identical). Attack: "
        f"analytic de-mixing told the loss, on {s['mixing_trials']} FedSGD batches of MNIST test images per cell "
        f"(random = distinct labels), at a fresh init and at the round-{s['attack_round']} global model of that "
        f"training run; mean ± std over the batches; recovered = PSNR ≥ {RECOVERED_DB:.0f} dB."
    )
    return summary, table
