"""What the server knows about the agreed model and the data format (no Flower import)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows about the model and the data format (public knowledge)."""

    model: torch.nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    data_mean: tuple[float, ...]
    data_std: tuple[float, ...]
    protocol: str
    batch_size: int
    local_steps: int
    lr: float
