"""Inference games from gradients (pure torch + scikit-learn; no Flower, no Ray).

Attribute, property, distributional and user inference (Li et al., "Analyzing Inference
Privacy Risks Through Gradients in Machine Learning", arXiv:2408.16913, CCS 2024) and
membership inference, as games in the style of Salem et al. ("SoK: Let the Privacy Games
Begin", S&P 2023), with meta-classifier adversaries trained on shadow updates (Melis et al.,
S&P 2019). See :mod:`adversaries.inference.games` for the games,
:mod:`adversaries.inference.release` for the release mechanism (the real client update),
:mod:`adversaries.inference.adversary` for the adversaries and
:mod:`adversaries.inference.metrics` for the metrics.
"""

from adversaries.inference.adversary import LossBaseline, MetaClassifier
from adversaries.inference.games import GAMES, Game, Observations, Pool, sample_secrets
from adversaries.inference.metrics import clopper_pearson, game_metrics
from adversaries.inference.release import Release, flat_per_sample_gradients

__all__ = [
    "GAMES",
    "Game",
    "LossBaseline",
    "MetaClassifier",
    "Observations",
    "Pool",
    "Release",
    "clopper_pearson",
    "flat_per_sample_gradients",
    "game_metrics",
    "sample_secrets",
]
