"""The identical-label batch sampler of Eloul et al. (arXiv:2204.12495; methods.md section 5).

With distinct labels in a batch, each present-label row of the dense layer's gradient is
dominated by one sample and the batch can be de-mixed analytically. When every sample of a
batch has the same label, every sample enters every row with a same-sign dominant coefficient,
the coefficient matrix is nearly rank 1 and de-mixing is ill-conditioned: the attacker gets a
weighted average image. Threat model: the server sees the update of one batch (FedSGD) or of
a few (FedAvg) and knows the batch size.
"""

from __future__ import annotations

import numpy as np
import torch

from clients.defenses.base import BatchSamplerDefense, register_defense
from fl_privsim.core.partition import effective_batch_size


@register_defense("identical_labels")
class IdenticalLabels(BatchSamplerDefense):
    """Draw each batch from one class where possible.

    For each batch, a class is drawn (probability proportional to its count) among the
    client's classes that have at least ``batch_size`` examples, and the batch is drawn from
    it without replacement. When no class is that large, the largest class is used whole and
    the batch is filled up with other examples drawn at random. All draws use the seeded
    ``generator`` (the client's batch generator), so the scorer reproduces the batch.

    Metric-free; no parameters (the batch size is ``client.batch_size``, itself a knob of
    this defense in Eloul et al.).
    """

    def sample_batches(
        self,
        partition: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        num_batches: int,
        generator: torch.Generator,
    ) -> list[np.ndarray]:
        partition = np.asarray(partition, dtype=np.int64)
        labels = np.asarray(labels)
        if len(partition) != len(labels):
            raise ValueError(f"labels ({len(labels)}) must align with partition ({len(partition)})")
        bs = effective_batch_size(batch_size, len(partition))
        classes, counts = np.unique(labels, return_counts=True)
        return [
            self._one(partition, labels, classes, counts, bs, generator) for _ in range(num_batches)
        ]

    @staticmethod
    def _one(
        partition: np.ndarray,
        labels: np.ndarray,
        classes: np.ndarray,
        counts: np.ndarray,
        bs: int,
        generator: torch.Generator,
    ) -> np.ndarray:
        full = counts >= bs
        if full.any():
            weights = torch.as_tensor(np.where(full, counts, 0), dtype=torch.float64)
            c = classes[int(torch.multinomial(weights, 1, generator=generator))]
            members = partition[labels == c]
            return members[torch.randperm(len(members), generator=generator)[:bs].numpy()]
        c = classes[int(np.argmax(counts))]  # first of the largest classes
        members = partition[labels == c]
        others = partition[labels != c]
        fill = others[torch.randperm(len(others), generator=generator)[: bs - len(members)].numpy()]
        return np.concatenate(
            [members[torch.randperm(len(members), generator=generator).numpy()], fill]
        )
