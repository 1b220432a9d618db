"""``flwr run .`` from the repository root (Flower 1.41's managed local SuperLink) gives the
same metrics as ``fl-privsim run`` of the same config; a wrong number of SuperNodes fails fast.

The e2e test works in a temporary ``FLWR_HOME`` (Flower configuration file, installed FAB,
SuperLink state and log) on a free port (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``), with Flower's
runtime dependency installation off (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: the
apps run in this environment, as ``fl-privsim run`` does). ``flwr run`` leaves the SuperLink it
starts running; the test stops it, and anything else whose command line names its temporary
folders, by process id. See docs/flwr_run.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import ConfigError
from strategies import server_app

REPO = Path(__file__).resolve().parents[2]

SMALL = [
    "federation.num_clients=3",
    "federation.clients_per_round=3",
    "federation.rounds=1",
    'federation.device="cpu"',
    "attacks.1.params.iterations=30",
    "attacks.2.params.iterations=50",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_naming(*folders: Path) -> list[int]:
    """Processes whose command line names one of ``folders`` (only ours: they are fresh)."""
    marks = [str(f).encode() for f in folders]
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if any(m in cmdline for m in marks):
            pids.append(int(proc.name))
    return pids


def _stop(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM ``pids``, then SIGKILL what is still alive after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            if not pids:
                return
            time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]) == "Z"
    except OSError:
        return True


def _metric_rows(folder: Path) -> list[str]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return sorted(json.dumps(r, sort_keys=True) for r in rows if "seconds" not in r["key"])


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in k}
    return value


@pytest.mark.e2e
def test_flwr_run_matches_fl_privsim_run(tmp_path):
    # flwr starts `flower-superlink` from PATH: this interpreter's scripts first
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("flwr", path=path) is None or not Path("/proc").is_dir():
        pytest.skip("needs the flwr CLI and /proc (to stop the SuperLink it starts)")
    cfg = config_mod.load(None, SMALL)
    cfg_path = tmp_path / "small.toml"
    cfg_path.write_text(config_mod.to_toml(cfg))
    # Short paths: Ray's socket paths under its temp folder must stay below 108 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="flwr-run-"))
    home, ray_tmp, out = scratch / "home", scratch / "ray", tmp_path / "flwr-out"
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PATH=path,
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_TMPDIR=str(ray_tmp),
    )
    command = [
        "flwr",
        "run",
        ".",
        "--stream",
        "--run-config",
        f"config-path='{cfg_path}' out-dir='{out}'",
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=1",
    ]
    start = time.monotonic()
    log_path = tmp_path / "flwr_run.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            # fl-privsim run of the same config, meanwhile (its own Ray, its own folder)
            direct, summary = run(cfg, out=tmp_path / "direct", show_progress=False)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _stop(_pids_naming(home, ray_tmp))
            shutil.rmtree(scratch, ignore_errors=True)
    wall = time.monotonic() - start
    log = log_path.read_text(errors="replace")
    runs = sorted(out.glob("*/summary.json"))
    assert len(runs) == 1, f"flwr run wrote no run folder under out-dir:\n{log[-4000:]}"
    flwr_folder = runs[0].parent
    flwr_summary = json.loads(runs[0].read_text())

    assert flwr_summary["final_accuracy"] == summary["final_accuracy"]
    assert _without_seconds(flwr_summary["attacks"]) == _without_seconds(summary["attacks"])
    assert flwr_summary["accuracy_by_round"] == summary["accuracy_by_round"]
    assert _metric_rows(flwr_folder) == _metric_rows(direct)
    assert flwr_summary["attacks"]["analytic"]["psnr"] >= 60
    print(f"flwr run + fl-privsim run (concurrently): {wall:.0f} s")


class _FakeGrid:
    def __init__(self, counts):
        self.counts = list(counts)

    def get_node_ids(self):
        n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        return list(range(n))


def test_wrong_number_of_supernodes_fails_fast(monkeypatch):
    monkeypatch.setattr(server_app, "InMemoryGrid", _FakeGrid)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        server_app.check_simulated_supernodes(_FakeGrid([0, 0, 2]), 10, settle=0.3)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "\n" not in msg
    assert "2 SuperNodes" in msg and "federation.num_clients = 10" in msg
    assert 'num-supernodes=10"' in msg
    # registration still going (1, then 3): only the final count counts
    server_app.check_simulated_supernodes(_FakeGrid([1, 3]), 3, settle=0.3)
    # a deployment's grid (SuperNodes join over time) is left to discover_clients
    server_app.check_simulated_supernodes(SimpleNamespace(get_node_ids=list), 3)
