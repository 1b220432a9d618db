"""Device selection for client training and attacks."""

from __future__ import annotations

import torch

from fl_privsim.core.errors import ConfigError


def resolve_device(name: str, key: str = "federation.device") -> torch.device:
    """``auto`` → CUDA when a GPU is visible, else CPU; ``cuda`` without a GPU is an error
    (naming the config ``key`` it came from)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{key}: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: {name!r} is not allowed; allowed: auto, cpu, cuda")
    return torch.device(name)
