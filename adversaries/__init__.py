"""Privacy attacks on federated-learning updates (pure torch; no Flower or Ray).

Importing this package registers the built-in attacks in :data:`ATTACKS`.
"""

from adversaries import reconstruction  # imported to register the attacks
from adversaries.base import ATTACKS, Attack, AttackResult, Observation

__all__ = ["ATTACKS", "Attack", "AttackResult", "Observation", "reconstruction"]
