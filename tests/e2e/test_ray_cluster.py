"""A federation on an existing Ray cluster: a Ray head started here (loopback, its own ports and
temp folder), ``fl-privsim run`` (the CLI's entry point, in this process) with
``federation.ray_address`` pointing at it, and the cluster's own GCS asked afterwards where
the client actors ran. The head's processes (one session, started by this test) are stopped
by their process ids, whatever happens. An unreachable cluster: tests/unit/test_ray_address.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
SMALL = [
    'model.name="mlp"',
    "federation.num_clients=4",
    "federation.clients_per_round=4",
    "federation.rounds=2",
    'federation.device="cpu"',
    "federation.fraction_evaluate=0",
    "output.save_images=false",
    'attacks=[{name = "analytic", targets = { rounds = [1, 2], clients = [0, 1] }}]',
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _head_pids(sid: int, temp_dir: Path) -> list[int]:
    """Live processes of the head: those of session ``sid`` (``ray start`` in a new session,
    and every Ray process it and its raylet started) and any other whose command line names
    the head's temp folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if state != "Z" and (int(session) == sid or str(temp_dir) in cmdline):
            pids.append(int(entry.name))
    return pids


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _stop_head(proc: subprocess.Popen[bytes], temp_dir: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process of the head, by id; the ids still alive
    afterwards (none, normally)."""

    def alive() -> list[int]:
        proc.poll()  # reap ``ray start`` itself
        return _head_pids(proc.pid, temp_dir)

    _signal(alive(), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal(alive(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive()


def _gcs(address: str) -> dict[str, object]:
    """What the cluster's GCS says, asked directly over gRPC (no Ray driver): its id, its
    nodes and every actor it has seen."""
    import grpc
    from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        nodes = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        cluster_id = nodes.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10)
        node_info = nodes.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10)
        actors = gcs_service_pb2_grpc.ActorInfoGcsServiceStub(channel).GetAllActorInfo(
            gcs_service_pb2.GetAllActorInfoRequest(), timeout=10
        )
    return {
        "cluster_id": cluster_id.cluster_id.hex(),
        "alive_nodes": sorted(
            n.node_id.hex()
            for n in node_info.node_info_list
            if n.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE
        ),
        "actors": [
            {"class": a.class_name, "job": a.job_id.hex(), "node": a.address.node_id.hex()}
            for a in actors.actor_table_data
        ],
    }


@dataclass(frozen=True)
class Head:
    """A running Ray head: the address to give fl-privsim and its temp folder."""

    address: str
    temp_dir: Path


@pytest.fixture
def ray_head() -> Iterator[Head]:
    """A Ray head on loopback with 2 CPUs, its own GCS, Ray Client and agent ports and temp
    folder (another xdist worker may run a local Ray meanwhile); stopped by process id at the
    end, and no process of it may be left."""
    temp_dir = Path(tempfile.mkdtemp(prefix="flps-ray-", dir="/tmp"))  # short: unix sockets
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    log = (temp_dir / "ray_start.log").open("wb")
    proc = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",  # not Ray's fixed default
            "--include-log-monitor=false",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # every process of the head in one session: ours to stop
    )
    try:
        deadline = time.monotonic() + 90
        while not (temp_dir / "ray_current_cluster").is_file():  # written once the head is up
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"ray start did not come up:\n{(temp_dir / 'ray_start.log').read_text()}"
                )
            time.sleep(0.25)
        yield Head(address=f"127.0.0.1:{port}", temp_dir=temp_dir)
    finally:
        left = _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of the test's head outlived it: {left}"


def test_federation_runs_on_an_existing_ray_cluster(ray_head, tmp_path, monkeypatch, capsys):
    from fl_privsim.app.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = _gcs(ray_head.address)
    assert len(before["alive_nodes"]) == 1
    out = tmp_path / "run"
    settings = [*SMALL, f'federation.ray_address="{ray_head.address}"']
    code = main(["run", "--quiet", "--out", str(out), *(a for s in settings for a in ("--set", s))])
    shown = capsys.readouterr()
    assert code == 0, shown.err[-3000:]
    assert f"Ray cluster: {ray_head.address} (1 node(s) alive" in shown.out  # the run's table
    summary = json.loads((out / "summary.json").read_text())

    # the run completed, with every round's results
    assert summary["status"] == "completed"
    assert sorted(summary["accuracy_by_round"]) == ["0", "1", "2"]
    assert sorted(summary["fit_seconds_by_round"]) == ["1", "2"]
    assert summary["failures"]["total"] == 0
    assert summary["attacks"]["analytic"]["attacked"] == 4  # 2 rounds x 2 clients
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {(r["round"], r["client"]) for r in rows if r["source"] == "client_train"}
    assert trained == {(r, c) for r in (1, 2) for c in range(4)}

    # the run says it used this cluster ...
    ray = summary["ray"]
    assert ray["address"] == ray["connect"] == ray_head.address
    assert ray["cluster_id"] == before["cluster_id"]
    assert ray["gcs_address"].endswith(f":{ray_head.address.rsplit(':', 1)[1]}")
    assert [n["node_id"] for n in ray["nodes"]] == before["alive_nodes"]
    assert ray["client_actor_nodes"] == {before["alive_nodes"][0]: 2}  # 2 CPUs, 1 per client

    # ... and the cluster agrees: its GCS saw the run's client actors, on its node; the
    # driver disconnected and left the cluster running
    after = _gcs(ray_head.address)
    assert after["cluster_id"] == before["cluster_id"]
    assert after["alive_nodes"] == before["alive_nodes"]
    clients = [a for a in after["actors"] if a["class"] == "ClientAppActor"]
    assert clients and all(a["job"] == ray["job_id"] for a in clients)
    assert {a["node"] for a in clients} == set(ray["client_actor_nodes"])
    assert len(clients) == 2
