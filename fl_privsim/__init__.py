"""fl-privsim: a federated-learning simulator with pluggable privacy attacks.

The package shows its layers in its folders (imports only point down; the contracts in
``pyproject.toml`` ``[tool.importlinter]`` hold them in CI):

- :mod:`fl_privsim.app` — the commands: CLI, simulation launcher, measure, game, reproduce.
- :mod:`strategies` and the ClientApp in :mod:`clients` — the Flower glue.
- :mod:`fl_privsim.engine` — pure-torch pieces of a run that combine plugins: the clients'
  data of a run, the scorer, the analyses, offline rounds.
- :mod:`adversaries`, then :mod:`clients.defenses` and :mod:`clients.local_update` — the
  pure-torch plugins (no Flower, no Ray).
- :mod:`fl_privsim.core` — the foundation: errors, registry, seeding, config schema, data,
  models, metrics, run folders. It imports no other project package.
"""

__version__ = "0.1.0"
