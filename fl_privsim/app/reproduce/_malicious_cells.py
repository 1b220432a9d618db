"""One cell of the malicious-server reproduction: craft, let real clients train, attack, score.

Every cell runs the same code a federation runs: the registered modification crafts the model
from the server's own data (the CIFAR-10 subset's test split), each client computes its update
with :func:`clients.local_update.local_update` on records of the train split, the updates are
averaged as a secure aggregator would (example-weighted mean), and the registered attack reads
the observation and the modification's secrets. Only the scoring here looks at the records.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adversaries.base import ATTACKS, Observation
from adversaries.malicious import MODIFICATIONS, ServerView
from fl_privsim.core.data import ImageData
from fl_privsim.core.metrics import match_reconstructions, mse, psnr
from fl_privsim.core.models import build_model
from fl_privsim.core.seeding import numpy_rng, seed_int, torch_generator
from fl_privsim.engine.offline import aggregate_observation, client_observation


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting: the modification and its attack, the model, the protocol and the sizes."""

    modification: str
    params: dict[str, Any]
    attack: str
    model: str
    protocol: str
    clients: int
    batch: int
    steps: int = 1
    lr: float = 0.1
    attack_params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def records(self) -> int:
        """Records behind the observed update (clients × batch × local steps)."""
        return self.clients * self.batch * self.steps


def honest_model(data: ImageData, name: str, seed: int) -> torch.nn.Module:
    """A freshly initialised model (the round-1 global model of a federation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(seed, "model_init"))
        return build_model(name, data.input_shape, data.num_classes)


def draw_records(data: ImageData, cell: Cell, seed: int) -> list[np.ndarray]:
    """Train-split indices per client: disjoint, ``batch × steps`` each (drawn without replacement)."""
    n = len(data.train_y)
    if cell.records > n:
        raise ValueError(f"{cell.records} records asked, the train split has {n}")
    order = numpy_rng(seed, 0, "batch").permutation(n)
    per = cell.batch * cell.steps
    return [np.sort(order[c * per : (c + 1) * per]) for c in range(cell.clients)]


def observe(
    data: ImageData,
    cell: Cell,
    seed: int,
    public: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
) -> tuple[Observation, list[np.ndarray], torch.nn.Module]:
    """Craft the model, let every client train on it, and return the server's observation."""
    model = honest_model(data, cell.model, seed)
    mod = MODIFICATIONS.create(cell.modification, **cell.params)
    mod.check_model(model, data.input_shape, data.num_classes)
    view = ServerView(
        round=1,
        clients=tuple(range(cell.clients)),
        targets=tuple(range(cell.clients)),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        data_mean=data.mean,
        data_std=data.std,
        protocol=cell.protocol,
        batch_size=cell.batch,
        local_steps=cell.steps,
        lr=cell.lr,
        public_inputs=public[0],
        public_labels=public[1],
        generator=torch_generator(seed, 1, 0, "modification"),
    )
    crafted = mod.craft(model, view)
    sent = crafted.model.to(device)
    parts = draw_records(data, cell, seed)
    observations = []
    for c, idx in enumerate(parts):
        x = data.normalize(data.images("train", idx)).to(device)
        y = data.labels("train", idx).to(device)
        batches = [
            (x[s * cell.batch : (s + 1) * cell.batch], y[s * cell.batch : (s + 1) * cell.batch])
            for s in range(cell.steps)
        ]
        observations.append(
            client_observation(
                copy.deepcopy(sent),
                batches,
                protocol=cell.protocol,
                lr=cell.lr,
                mean=data.mean,
                std=data.std,
                num_classes=data.num_classes,
                client_id=c,
            )
        )
    obs = observations[0] if cell.clients == 1 else aggregate_observation(observations)
    obs = dataclasses.replace(obs, server_secrets={cell.modification: crafted.secrets})
    return obs, parts, sent


def score(
    data: ImageData, parts: Sequence[np.ndarray], inputs: torch.Tensor | None, threshold: float
) -> dict[str, float]:
    """asr (share of records whose one-to-one matched reconstruction has MSE ≤ threshold),
    leakage rate (share of clients with at least one such record), mean PSNR of the matched
    records, and how many reconstructions the attack returned."""
    originals = data.images("train", np.concatenate(parts))
    owner = np.concatenate([np.full(len(p), c) for c, p in enumerate(parts)])
    if inputs is None or inputs.shape[0] == 0:
        return {"asr": 0.0, "leakage_rate": 0.0, "psnr": float("nan"), "reconstructions": 0.0}
    recon = data.denormalize(inputs.detach().float().cpu()).clamp(0, 1)
    perm = match_reconstructions(originals, recon)
    ok = perm >= 0
    per = torch.full((len(originals),), float("inf"), dtype=torch.float64)
    per[torch.from_numpy(ok)] = mse(
        originals[torch.from_numpy(ok)], recon[torch.from_numpy(perm[ok])]
    )
    hit = (per <= threshold).numpy()
    leaked = [bool(hit[owner == c].any()) for c in range(len(parts))]
    matched_psnr = psnr(originals[torch.from_numpy(ok)], recon[torch.from_numpy(perm[ok])])
    return {
        "asr": float(hit.mean()),
        "leakage_rate": float(np.mean(leaked)),
        "psnr": float(matched_psnr.mean()),
        "reconstructions": float(recon.shape[0]),
    }


def realised_alone_share(
    sent: torch.nn.Module, data: ImageData, parts: Sequence[np.ndarray], device: torch.device
) -> float:
    """Share of the observed records that were alone in their imprint bin (from the truth:
    the bin of a record is the number of the block's rows it activates, the rows' offsets
    being sorted)."""
    x = data.normalize(data.images("train", np.concatenate(parts))).to(device)
    with torch.no_grad():
        pre = sent.block.encoder(x.flatten(1))
    bins = (pre > 0).sum(1).cpu().numpy()
    _, inverse, counts = np.unique(bins, return_inverse=True, return_counts=True)
    return float((counts[inverse] == 1).mean())


def run_cell(
    data: ImageData,
    cell: Cell,
    seed: int,
    public: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    threshold: float,
) -> dict[str, Any]:
    """Observation, attack and scores of one cell and seed."""
    t0 = time.perf_counter()
    obs, parts, sent = observe(data, cell, seed, public, device)
    result = ATTACKS.create(cell.attack, **cell.attack_params)(
        obs, device=device, generator=torch_generator(seed, 1, -1, "attack")
    )
    row: dict[str, Any] = {**dataclasses.asdict(cell), "records": cell.records, "seed": seed}
    row.update(score(data, parts, result.inputs, threshold))
    if cell.modification == "imprint":
        row["alone_share"] = realised_alone_share(sent, data, parts, device)
    row.update({f"attack_{k}": float(v) for k, v in result.metrics.items()})
    row["seconds"] = time.perf_counter() - t0
    return row
