"""The commands: ``fl-privsim run`` (:mod:`~fl_privsim.app.simulation`), ``measure``,
``game``, ``reproduce`` and the CLI that dispatches them. The top layer: it may import
every other one, and nothing imports it.
"""
