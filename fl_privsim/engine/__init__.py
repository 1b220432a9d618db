"""Pure-torch pieces of a run that combine plugins: the clients' data of a run
(:mod:`~fl_privsim.engine.federated_data`), the scorer that alone sees ground truth
(:mod:`~fl_privsim.engine.scoring`), analyses, secure-aggregation checks and offline rounds.

Above the plugins (``adversaries``, ``clients.defenses``), below the Flower glue; no Flower,
no Ray.
"""
