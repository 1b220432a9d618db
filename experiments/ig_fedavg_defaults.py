"""Inverting Gradients with its default parameters on FedAvg: PSNR against the mean image.

Issue 16 asks every attack's defaults to beat the mean image on the settings its docs show,
FedAvg included, and IG on ``lenet``/digits with 4 local steps × batch 2 to reach 15 dB.
Each case is one client: a ``lenet`` at PyTorch's default initialisation (seed = case),
8 distinct train images of scikit-learn's digits drawn with the case's seed, trained by
:func:`clients.local_update.local_update` (plain SGD, the default ``client.lr`` 0.1), as a
curious server would observe it (:func:`fl_privsim.engine.offline.client_observation`).
The attack gets only the observation; the script scores its output against the true images
(Hungarian matching, PSNR in [0, 1] pixels) and against two baselines that need no update:
the per-pixel mean image of the train split and the flat mean colour.

Run (about 10 s CPU per case)::

    PYTHONPATH=. python experiments/ig_fedavg_defaults.py --cases 16
    PYTHONPATH=. python experiments/ig_fedavg_defaults.py --params '{"restarts": 1, "label_screen": false}'

The second line is the pre-issue behaviour (sign-rule labels in their own order, one restart).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from adversaries import ATTACKS
from adversaries.base import Observation
from fl_privsim.core.data import load_dataset
from fl_privsim.core.metrics import match_reconstructions, psnr
from fl_privsim.core.models import build_model
from fl_privsim.engine.offline import client_observation


def make_case(
    case: int,
    *,
    model: str = "lenet",
    steps: int = 4,
    batch: int = 2,
    lr: float = 0.1,
    protocol: str = "fedavg",
) -> tuple[Observation, torch.Tensor, torch.Tensor]:
    """Client ``case``: the server's observation, and (for scoring only) the client's images
    in [0, 1] and labels, in the order of its mini-batches.

    ``protocol="fedsgd"`` sends the gradient of one batch of ``batch`` images (``steps`` is
    then 1)."""
    steps = steps if protocol == "fedavg" else 1
    data = load_dataset("digits")
    gen = torch.Generator().manual_seed(1000 + case)
    idx = torch.randperm(len(data), generator=gen)[: steps * batch]
    raw, labels = data.images("train", idx), data.labels("train", idx)
    x = data.normalize(raw)
    batches = [
        (x[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch]) for i in range(steps)
    ]
    torch.manual_seed(case)
    net = build_model(model, data.input_shape, data.num_classes).train()
    obs = client_observation(
        net,
        batches,
        protocol=protocol,
        lr=lr,
        mean=data.mean,
        std=data.std,
        num_classes=data.num_classes,
        client_id=case,
    )
    return obs, raw, labels


def run_case(
    case: int,
    *,
    model: str = "lenet",
    steps: int = 4,
    batch: int = 2,
    lr: float = 0.1,
    params: dict[str, object] | None = None,
    attack_name: str = "inverting_gradients",
    protocol: str = "fedavg",
) -> dict[str, float]:
    """Attack client ``case`` (:func:`make_case`); return PSNRs (attack, mean image, mean
    colour), whether the labels (and their steps) are right, restarts and CPU seconds."""
    obs, raw, labels = make_case(
        case, model=model, steps=steps, batch=batch, lr=lr, protocol=protocol
    )
    data = load_dataset("digits")
    attack = ATTACKS.create(attack_name, **(params or {}))
    start = time.process_time()
    res = attack(obs, generator=torch.Generator().manual_seed(case))
    cpu = time.process_time() - start
    rec = data.denormalize(res.inputs.detach().cpu()).clamp(0, 1).double()
    truth = raw.double()
    perm = match_reconstructions(truth, rec)
    mean_image = data.images("train", slice(None)).double().mean(0, keepdim=True)
    flat = torch.tensor(data.mean, dtype=torch.float64).view(1, -1, 1, 1)
    return {
        "psnr": float(psnr(truth, rec[torch.as_tensor(perm)]).mean()),
        "mean_image": float(psnr(truth, mean_image.expand_as(truth)).mean()),
        "mean_colour": float(psnr(truth, flat.expand_as(truth)).mean()),
        "labels_ok": float(sorted(res.labels.tolist()) == sorted(labels.tolist())),
        # the same labels in the same mini-batches as the client's (order inside a batch free)
        "steps_ok": float(
            len(res.labels) == len(labels)
            and all(
                sorted(res.labels[i : i + batch].tolist()) == sorted(labels[i : i + batch].tolist())
                for i in range(0, len(labels), batch)
            )
        ),
        "restarts": res.metrics.get("restarts", 1.0),
        "cpu_s": cpu,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=16, help="clients (seeds 0..cases-1)")
    p.add_argument("--model", default="lenet")
    p.add_argument("--steps", type=int, default=4, help="local steps")
    p.add_argument("--batch", type=int, default=2, help="batch size")
    p.add_argument("--lr", type=float, default=0.1, help="client learning rate")
    p.add_argument("--params", default="{}", help="attack parameters as JSON (default: none)")
    p.add_argument("--attack", default="inverting_gradients", help="also: dlg, idlg")
    p.add_argument("--protocol", default="fedavg", choices=("fedavg", "fedsgd"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = json.loads(args.params)
    rows = []
    for case in range(args.cases):
        r = run_case(
            case,
            model=args.model,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            params=params,
            attack_name=args.attack,
            protocol=args.protocol,
        )
        rows.append(r)
        print(
            f"case {case:2d}: psnr {r['psnr']:6.2f} dB  mean image {r['mean_image']:5.2f}  "
            f"mean colour {r['mean_colour']:5.2f}  labels {'ok' if r['labels_ok'] else 'WRONG'}  "
            f"per step {'ok' if r['steps_ok'] else 'WRONG'}  "
            f"restarts {r['restarts']:.0f}  cpu {r['cpu_s']:.1f} s",
            flush=True,
        )
    ps = np.array([r["psnr"] for r in rows])
    gap = ps - np.array([r["mean_image"] for r in rows])
    print(
        f"{args.attack}, {args.model}, digits, {args.protocol} "
        f"{args.steps if args.protocol == 'fedavg' else 1} steps x batch {args.batch}, "
        f"lr {args.lr}, params {params or 'defaults'}, {len(rows)} cases:\n"
        f"  attack PSNR mean {ps.mean():.2f} dB (std {ps.std():.2f}, min {ps.min():.2f}, "
        f"max {ps.max():.2f})\n"
        f"  mean image {np.mean([r['mean_image'] for r in rows]):.2f} dB, mean colour "
        f"{np.mean([r['mean_colour'] for r in rows]):.2f} dB\n"
        f"  attack - mean image: mean {gap.mean():.2f} dB, min {gap.min():.2f} dB; "
        f"labels right {int(sum(r['labels_ok'] for r in rows))}/{len(rows)}, "
        f"in the right steps {int(sum(r['steps_ok'] for r in rows))}/{len(rows)}; "
        f"CPU {np.mean([r['cpu_s'] for r in rows]):.1f} s per attack"
    )


if __name__ == "__main__":
    main()
