"""The foundation: errors, the plugin registry, seeding, the config schema, datasets and
partitioners, the model zoo, metrics, plots and run folders.

Nothing here imports another project package (``adversaries``, ``clients``, ``strategies``,
``fl_privsim.engine`` or ``fl_privsim.app``); the import-linter contracts hold that in CI.
"""
