"""Joining an existing Ray cluster (``federation.ray_address``) and recording where a run ran.

Before launch, :func:`reach_cluster` turns the address into the ``host:port`` Ray connects
to (``"auto"``: ``RAY_ADDRESS``, else the address ``ray start`` recorded in Ray's temp
folder) and asks the cluster for its id over gRPC with a short deadline: an address nothing
answers at, or something that is not Ray, is one :class:`ConfigError` line within
:data:`CONNECT_TIMEOUT_S` (``ray.init`` itself retries an unreachable GCS for minutes).
Flower's Ray backend then joins with ``ray.init(address=...)`` and no local-only arguments,
and ends with ``ray.shutdown()``, which disconnects the driver and leaves the cluster running.

During the run, :func:`recorded` wraps Flower's backend so that the run's summary can say
which cluster and which nodes its client actors ran on (:func:`cluster_record`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fl_privsim.core.errors import ConfigError
from fl_privsim.core.ray_address import FORMS, RayAddress, parse_host_port

log = logging.getLogger(__name__)

#: Seconds to wait for a cluster to answer before the run is refused.
CONNECT_TIMEOUT_S = 5.0

#: The Ray temp folder :func:`fl_privsim.app.simulation.prepare_environment` sets for local
#: runs (``RAY_TMPDIR``); not where a user's ``ray start`` records its address.
OWN_RAY_TMPDIR_NAME = "fl-privsim-ray"

KEY = "federation.ray_address"


def recorded_address_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where ``ray start`` records the address of the cluster it started
    (``ray_current_cluster`` in Ray's temp folder: ``$RAY_TMPDIR/ray`` when the user set
    ``RAY_TMPDIR``, then ``$TMPDIR/ray`` or ``/tmp/ray``), in the order they are read."""
    env = os.environ if env is None else env
    dirs = []
    ray_tmp = env.get("RAY_TMPDIR")
    if ray_tmp and Path(ray_tmp).name != OWN_RAY_TMPDIR_NAME:
        dirs.append(Path(ray_tmp))
    dirs.append(Path(env.get("TMPDIR") or "/tmp"))
    return [d / "ray" / "ray_current_cluster" for d in dirs]


def resolve_address(text: str, env: Mapping[str, str] | None = None) -> RayAddress:
    """The cluster ``text`` names: ``host:port`` / ``ray://host:port`` as written; ``"auto"``
    the ``RAY_ADDRESS`` environment variable, else the address ``ray start`` recorded
    (:func:`recorded_address_files`). Unlike ``ray.init("auto")`` it never falls back to any
    Ray process it finds on the machine (another run's local Ray); nothing found is one
    :class:`ConfigError` line."""
    env = os.environ if env is None else env
    if text != "auto":
        return parse_host_port(text, key=KEY)
    if env.get("RAY_ADDRESS"):
        return parse_host_port(env["RAY_ADDRESS"], key=f'{KEY} = "auto": RAY_ADDRESS')
    files = recorded_address_files(env)
    for file in files:
        try:
            recorded = file.read_text().strip()
        except OSError:
            continue
        if recorded:
            return parse_host_port(recorded, key=f'{KEY} = "auto": {file}')
    raise ConfigError(
        f'{KEY} = "auto": no Ray cluster recorded on this machine (RAY_ADDRESS is not set and '
        f"{' / '.join(map(str, files))} does not exist); start one with `ray start --head` "
        f"or give its address ({FORMS})"
    )


def probe(address: RayAddress, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Ask the cluster at ``address`` who it is, within ``timeout`` seconds: its cluster id
    (hex) from the GCS, or ``""`` through Ray Client (which only answers a ping). Nothing
    answering, or a server that is not Ray's, is one :class:`ConfigError` line."""
    import grpc

    channel = grpc.insecure_channel(address.hostport)
    try:
        if address.client:
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=timeout)
            return ""
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=timeout
        )
        return bytes(reply.cluster_id).hex()
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:  # a cluster with token auth: ray.init's job
            return ""
        if code == grpc.StatusCode.UNIMPLEMENTED:
            what = "Ray Client server" if address.client else "Ray GCS"
            hint = (
                "the GCS port of `ray start --head` takes host:port"
                if address.client
                else "for Ray Client use ray://host:port"
            )
            raise ConfigError(f"{KEY}: {address} answers but is not a {what} ({hint})") from None
        reason = " ".join((exc.details() or code.name).split())
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise ConfigError(
            f"{KEY}: cannot reach a Ray cluster at {address} within {timeout:g} s ({reason}); "
            "start one with `ray start --head --port=PORT` or fix the address"
        ) from None
    finally:
        channel.close()


def reach_cluster(text: str, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """Before launch: the cluster ``text`` names answers (:func:`resolve_address`,
    :func:`probe`). Returns ``{"address": text, "connect": "host:port" or "ray://host:port",
    "cluster_id": hex}`` (no ``cluster_id`` through Ray Client); the ``connect`` address is
    what ``ray.init`` gets."""
    address = resolve_address(text)
    cluster_id = probe(address, timeout)
    log.info("Ray cluster at %s answers (cluster id %s)", address, cluster_id or "?")
    info = {"address": text, "connect": str(address)}
    if cluster_id:
        info["cluster_id"] = cluster_id
    return info


def _actor_nodes(pool: Any) -> dict[str, int]:
    """Node id -> number of the pool's client actors on it (Ray's actor table, read from
    the GCS; empty where it cannot be read, e.g. through Ray Client)."""
    from ray._private import state

    nodes: dict[str, int] = {}
    for actor in list(getattr(pool, "pool", [])):
        info = state.actors(actor_id=actor._actor_id.hex())
        node = (info.get("Address") or {}).get("NodeID") if info else None
        if node:
            nodes[node] = nodes.get(node, 0) + 1
    return nodes


def cluster_record(pool: Any) -> dict[str, Any]:
    """What the connected Ray is: its GCS address, the run's job id, the live nodes (id and
    IP), and the nodes the pool's client actors run on. Best effort: a field Ray cannot give
    is left out (and the reason logged)."""
    import ray

    record: dict[str, Any] = {}
    try:
        ctx = ray.get_runtime_context()
        record["gcs_address"] = ctx.gcs_address
        record["job_id"] = ctx.get_job_id()
        record["driver_node_id"] = ctx.get_node_id()
    except Exception as exc:  # noqa: BLE001 - Ray Client has no GCS address to give
        log.debug("Ray runtime context: %s", exc)
    try:
        record["nodes"] = [
            {"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress", "")}
            for n in ray.nodes()
            if n.get("Alive")
        ]
    except Exception as exc:  # noqa: BLE001 - a record, never a failure of the run
        log.debug("ray.nodes(): %s", exc)
    if pool is not None:
        try:
            record["client_actor_nodes"] = _actor_nodes(pool)
        except Exception as exc:  # noqa: BLE001 - a record, never a failure of the run
            log.debug("client actor nodes: %s", exc)
    return record


@contextmanager
def recorded(into: dict[str, Any]) -> Iterator[None]:
    """Within the block, Flower's Ray backend (whatever class its module holds then, e.g.
    :mod:`fl_privsim.app.ray_reuse`'s) fills ``into`` with :func:`cluster_record` once its
    client actors exist and again, with where they ran, before it terminates them."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend

    class RecordingRayBackend(original):  # type: ignore[misc, valid-type]
        """Flower's Ray backend that records the cluster its actors run on."""

        def build(self, app_fn: Any) -> None:
            super().build(app_fn)
            into.update(cluster_record(None))

        def terminate(self) -> None:
            into.update(cluster_record(self.pool))
            super().terminate()

    raybackend.RayBackend = RecordingRayBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original
