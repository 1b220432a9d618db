"""The dataset as the federation sees it: partitions and each client's seeded batches.

The ClientApp and the scorer both call :func:`client_batch_indices`, so the scorer
reproduces exactly the batch a client trained on (its generator is seeded from the run
seed, the round and the partition id) without the client ever sending it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clients.defenses import Defense, batch_sampler, build_defenses, draw_batches
from fl_privsim.core.config import Config, DataConfig
from fl_privsim.core.data import (
    ImageData,
    effective_batch_size,
    load_dataset,
    sample_batch,
)
from fl_privsim.core.partition import partitions
from fl_privsim.core.seeding import torch_generator


@dataclass(frozen=True)
class FederatedData:
    """A loaded dataset with its train and test partitions (one per client).

    The partitions are lazy (:class:`~fl_privsim.core.partition.Partitions`: one flat index
    array cut per client, a client's part made when asked for), so a federation of 10 000
    clients holds no per-client array in any process."""

    data: ImageData
    train_parts: Sequence[np.ndarray]
    test_parts: Sequence[np.ndarray]

    def tensors(
        self, split: str, idx: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised inputs and labels of examples ``idx`` of ``split``, on ``device``."""
        x = self.data.normalize(self.data.images(split, idx)).to(device)
        y = self.data.labels(split, idx).to(device)
        return x, y


@functools.lru_cache(maxsize=4)
def _federated_data(data_cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    data = load_dataset(
        data_cfg.name,
        root=data_cfg.root or None,
        image_size=data_cfg.image_size or None,
        download=data_cfg.download,
        test_fraction=data_cfg.test_fraction,
        seed=seed,
        max_examples=data_cfg.max_examples or None,
    )
    train_parts = partitions(
        data.train_y.numpy(),
        num_clients,
        scheme=data_cfg.partition,
        alpha=data_cfg.alpha,
        seed=seed,
    )
    # Local test shards are IID so federated accuracy measures the global model fairly;
    # with more clients than test examples, client i gets shard i % shards.
    n_test = max(1, min(num_clients, len(data.test_y)))
    test_parts = partitions(data.test_y.numpy(), n_test, scheme="iid", seed=seed + 1)
    return FederatedData(
        data=data, train_parts=train_parts, test_parts=test_parts.cycled(num_clients)
    )


def federated_data(cfg: Config) -> FederatedData:
    """Load (once per process) the dataset and partitions that ``cfg`` describes."""
    return _federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)


def num_local_batches(cfg: Config) -> int:
    """Batches a client draws in one round: 1 for FedSGD, ``local_steps`` for FedAvg."""
    return 1 if cfg.federation.protocol == "fedsgd" else cfg.client.local_steps


def client_batch_indices(
    cfg: Config,
    fed: FederatedData,
    server_round: int,
    client: int,
    defenses: Sequence[Defense] | None = None,
) -> list[np.ndarray]:
    """Indices (into the train split) of each batch client ``client`` uses in ``server_round``.

    One generator, seeded from ``(seed, round, client, "batch")``, draws every batch of
    the round in order; each batch is drawn without replacement from the client's partition,
    :func:`~fl_privsim.core.partition.effective_batch_size` examples each.
    A sampler defense in the stack (e.g. ``identical_labels``) draws them instead,
    from the same generator, so the scorer still reproduces the client's batches.
    ``defenses`` is the client's stack already built for the round (the ClientApp builds it
    once and passes it); ``None`` builds it from ``cfg.defenses`` (the scorer). Samplers hold
    no state, so both give the same batches.
    """
    gen = torch_generator(cfg.seed, server_round, client, "batch")
    part = fed.train_parts[client]
    bs = effective_batch_size(cfg.client.batch_size, len(part))
    if defenses is None and cfg.defenses:
        defenses = build_defenses(cfg.defenses)
    sampler = batch_sampler(defenses) if defenses else None
    if sampler is not None:
        labels = fed.data.train_y.numpy()[part]
        return draw_batches(
            sampler,
            part,
            labels,
            batch_size=bs,
            num_batches=num_local_batches(cfg),
            generator=gen,
        )
    return [sample_batch(part, bs, gen) for _ in range(num_local_batches(cfg))]
