"""Keep one Ray instance and its client actors alive across simulations of one process.

Flower 1.41's Ray backend starts Ray (if it is not running), builds a pool of client actors
for every ``run_simulation`` call, and at the end terminates the actors and calls
``ray.shutdown()``. A sweep runs many small federations one after another in one process;
starting Ray and the actors (each actor imports torch and loads the data) costs more than a
small federation's rounds. :func:`kept_alive` keeps both for the next call: within it, the
backend Flower builds (it looks ``RayBackend`` up in its module at each call) is a subclass
that hands the same actor pool to the next simulation when the client resources and Ray
settings are the same, and leaves Ray running; on leaving the context, the actors and Ray
stop. A simulation that ends with actors still busy (a crash) gives its pool up, so the next
one starts clean.

With ``federation.ray_address`` set, "Ray" here is the driver's connection to that
cluster: stopping means terminating this process's client actors and ``ray.shutdown()``,
which disconnects the driver and leaves the cluster (which fl-privsim did not start) running;
``num_cpus`` only ever caps a local Ray.

The actors are Flower's own (``ClientAppActor``): they run whatever ``ClientApp`` each message
brings, so reusing them changes no result; their per-process caches (datasets, partitions,
the client's parsed config) survive between cells, which is the point.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_LOCK = threading.Lock()


class _Kept:
    """The pool and Ray settings carried from one simulation to the next."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.pool: Any = None
        self.reused = 0  # simulations that found a live pool (for tests and benchmarks)

    def healthy(self) -> bool:
        pool = self.pool
        return pool is not None and len(pool.pool) == pool.num_actors and not pool._future_to_actor

    def stop(self) -> None:
        """Terminate the kept actors and shut Ray down (a local Ray stops; from an existing
        cluster the driver only disconnects)."""
        import ray

        if self.pool is not None:
            try:
                self.pool.terminate_all_actors()
            except Exception as exc:  # noqa: BLE001 - stopping: a dead actor is fine
                log.debug("terminating kept actors: %s", exc)
        self.pool = None
        self.key = None
        if ray.is_initialized():
            ray.shutdown()


_KEPT = _Kept()


def reused_simulations() -> int:
    """How many simulations so far found a kept actor pool (0 outside :func:`kept_alive`)."""
    return _KEPT.reused


@contextmanager
def kept_alive(num_cpus: int | None = None) -> Iterator[None]:
    """Within the block, Flower simulations share one Ray instance and one client actor pool;
    ``num_cpus`` caps the CPUs of the local Ray instance it starts (a ``--jobs`` worker's
    share), which also caps the client actors (one per ``federation.num_cpus_per_client``)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend

    class KeptRayBackend(original):  # type: ignore[misc, valid-type]
        """Flower's Ray backend that keeps Ray and its actors for the next simulation."""

        def __init__(self, backend_config: Any) -> None:
            init_args = backend_config.get("init_args") or {}
            if num_cpus is not None and init_args.get("address") == "local":
                backend_config = {
                    **backend_config,
                    "init_args": {**init_args, "num_cpus": num_cpus},
                }
            key = json.dumps(backend_config, sort_keys=True, default=str)
            with _LOCK:
                if _KEPT.key is not None and _KEPT.key != key:
                    _KEPT.stop()  # other resources or Ray settings: start afresh
                _KEPT.key = key
            super().__init__(backend_config)

        def build(self, app_fn: Any) -> None:
            with _LOCK:
                if _KEPT.healthy():
                    self.pool = _KEPT.pool
                    self.app_fn = app_fn
                    _KEPT.reused += 1
                    return
                if _KEPT.pool is not None:
                    _KEPT.stop()
            super().build(app_fn)
            _KEPT.pool = self.pool

        def terminate(self) -> None:
            with _LOCK:
                if _KEPT.healthy() and self.pool is _KEPT.pool:
                    return  # keep Ray and the actors for the next simulation
                _KEPT.stop()

    raybackend.RayBackend = KeptRayBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original
        with _LOCK:
            _KEPT.stop()
            _KEPT.reused = 0
