"""The scorer: it, not the attack, looks up the ground truth and measures leakage.

For an attacked update it reproduces the client's batch(es) with the same seeded sampler
the client used (:func:`fl_privsim.engine.federated_data.client_batch_indices`), maps the
reconstructions back to [0, 1] pixels, matches them to the originals by optimal assignment
(Hungarian algorithm on MSE) when there is more than one, and computes MSE, PSNR, SSIM and
label accuracy. It adds AVD (each reconstruction against the original that minimises it)
and the attack success rate: the fraction of originals reconstructed with an MSE at most
``scoring.asr_mse_threshold``. For batches ``label_accuracy`` is the label-count accuracy
(multiset overlap of recovered and true labels).

Two more shares describe who was hit: ``coverage`` is the share of originals that got a
matched reconstruction at all (not a success: any output covers an original), and
``leakage_rate`` the share of the update's clients with at least one record whose matched
reconstruction reaches the ASR threshold (0 or 1 for a single client's update).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fl_privsim.core import metrics
from fl_privsim.core.config import Config
from fl_privsim.engine.federated_data import FederatedData, client_batch_indices
from fl_privsim.engine.inference_scoring import InferenceScorer


@dataclass
class ReconstructionLike(Protocol):
    """What the scorer reads of an attack's result (``adversaries.AttackResult`` fits)."""

    inputs: torch.Tensor | None
    labels: torch.Tensor | None


@dataclass
class Score:
    """Scores of one attack on one observation, with the images to plot."""

    values: dict[str, float]
    originals: torch.Tensor
    matched: torch.Tensor | None = None
    extra: dict[str, float] = field(default_factory=dict)
    #: True labels of ``originals`` (for the image grid's captions).
    labels: torch.Tensor | None = None
    #: Which originals got a matched reconstruction (rows of ``matched`` that hold one).
    has_match: torch.Tensor | None = None
    #: The attack's label for each original's matched reconstruction (-1: none), when the attack
    #: returned one label per reconstruction (for the grid's captions).
    matched_labels: torch.Tensor | None = None


class Scorer:
    """Ground-truth lookup and metrics for attack results.

    Parameters
    ----------
    cfg:
        The run's config (seed, protocol, batch size, local steps).
    fed:
        The federation's data and partitions.
    """

    def __init__(self, cfg: Config, fed: FederatedData) -> None:
        self.cfg = cfg
        self.fed = fed

    @functools.cached_property
    def inference(self) -> InferenceScorer:
        """Server knowledge and ground truth of the inference attacks
        (:mod:`fl_privsim.engine.inference_scoring`)."""
        return InferenceScorer(self.cfg, self.fed)

    def ground_truth_parts(self, server_round: int, clients: Sequence[int]) -> list[np.ndarray]:
        """Per client, in the order of ``clients``: the sorted, distinct train-split indices it
        used in ``server_round`` (a record seen in several local steps counts once)."""
        parts = []
        for c in clients:
            batches = client_batch_indices(self.cfg, self.fed, server_round, int(c))
            parts.append(np.unique(np.concatenate(batches)))
        return parts

    def ground_truth_indices(self, server_round: int, clients: Sequence[int]) -> np.ndarray:
        """Train-split indices of every example the ``clients`` used in ``server_round``."""
        return np.concatenate(self.ground_truth_parts(server_round, clients))

    def ground_truth_owners(self, server_round: int, clients: Sequence[int]) -> np.ndarray:
        """For each row of :meth:`ground_truth_indices`: the position in ``clients`` of the
        client it belongs to."""
        sizes = [len(p) for p in self.ground_truth_parts(server_round, clients)]
        return np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)

    def ground_truth(
        self, server_round: int, clients: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] and labels of what ``clients`` trained on in ``server_round``."""
        idx = self.ground_truth_indices(server_round, clients)
        return self.fed.data.images("train", idx), self.fed.data.labels("train", idx)

    def score(self, result: ReconstructionLike, server_round: int, clients: Sequence[int]) -> Score:
        """Score ``result`` against the true batch of ``clients`` in ``server_round``."""
        parts = self.ground_truth_parts(server_round, clients)
        idx = np.concatenate(parts)
        owners = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
        originals, labels = self.fed.data.images("train", idx), self.fed.data.labels("train", idx)
        values: dict[str, float] = {"num_originals": float(originals.shape[0])}
        matched: torch.Tensor | None = None
        if result.inputs is not None:
            recon = self.fed.data.denormalize(result.inputs.detach().float().cpu()).clamp(0, 1)
            if recon.shape[1:] != originals.shape[1:]:
                raise ValueError(
                    f"reconstruction shape {tuple(recon.shape[1:])} != input shape {tuple(originals.shape[1:])}"
                )
            perm = metrics.match_reconstructions(originals, recon)
            ok = perm >= 0
            matched = torch.zeros_like(originals)
            matched[torch.from_numpy(ok)] = recon[torch.from_numpy(perm[ok])]
            o, m = originals[torch.from_numpy(ok)], matched[torch.from_numpy(ok)]
            per_mse = metrics.mse(o, m)
            values["mse"] = float(per_mse.mean())
            values["psnr"] = float(metrics.psnr(o, m).mean())
            values["ssim"] = float(metrics.ssim(o, m).mean())
            if min(originals.shape[2:]) >= 3:
                values["avd"] = float(metrics.avd_matched(originals, recon).mean())
            threshold = self.cfg.scoring.asr_mse_threshold
            values["asr"] = metrics.attack_success_rate(per_mse, threshold, originals.shape[0])
            success = np.zeros(originals.shape[0], dtype=bool)
            success[ok] = (per_mse <= threshold).numpy()
            values["coverage"] = metrics.coverage(perm)
            values["leakage_rate"] = metrics.leakage_rate(success, owners, len(parts))
            values["num_reconstructed"] = float(recon.shape[0])
        matched_labels: torch.Tensor | None = None
        if result.labels is not None:
            values["label_accuracy"] = metrics.label_accuracy(labels, result.labels)
            if (
                getattr(result, "labels_per_input", False)
                and result.inputs is not None
                and len(result.labels) == len(result.inputs)
            ):
                predicted = result.labels.detach().long().cpu()
                matched_labels = torch.full((originals.shape[0],), -1, dtype=torch.long)
                matched_labels[torch.from_numpy(ok)] = predicted[torch.from_numpy(perm[ok])]
        has_match = torch.from_numpy(ok) if result.inputs is not None else None
        return Score(
            values=values,
            originals=originals,
            matched=matched,
            labels=labels,
            has_match=has_match,
            matched_labels=matched_labels,
        )
