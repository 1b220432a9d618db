"""fl-privsim: a federated-learning simulator with pluggable privacy attacks.

The core package holds what every other part uses: the typed config, datasets and
partitioners, the model zoo, metrics, the plugin registry, run folders, the simulation
launcher and the CLI. It never imports Flower or Ray at module level except in
``fl_privsim.simulation`` and ``fl_privsim.cli``.
"""

__version__ = "0.1.0"
