"""Privacy attacks on federated-learning updates (pure torch; no Flower or Ray).

Importing this package registers the built-in attacks in :data:`ATTACKS`.
"""

from adversaries import (
    malicious,
    reconstruction,
)  # imported to register the modifications and attacks
from adversaries.base import ATTACKS, Attack, AttackResult, Observation
from adversaries.inference import federated  # registers the federated inference attacks

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "Observation",
    "federated",
    "malicious",
    "reconstruction",
]
