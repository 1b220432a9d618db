"""``federation.ray_address``: its forms, "auto", and the refusal of a cluster that does not
answer (no Ray started; the real cluster is tests/e2e/test_ray_cluster.py)."""

from __future__ import annotations

import socket
import time

import pytest

from fl_privsim.app.ray_cluster import probe, reach_cluster, resolve_address
from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.ray_address import RayAddress, check_ray_address, parse_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:6379", RayAddress("127.0.0.1", 6379)),
        ("head-node.example:6380", RayAddress("head-node.example", 6380)),
        ("ray://10.0.0.5:10001", RayAddress("10.0.0.5", 10001, client=True)),
        ("[::1]:6379", RayAddress("::1", 6379)),
    ],
)
def test_cluster_addresses_parse(text, expected):
    parsed = parse_host_port(text)
    assert parsed == expected
    assert str(parsed) == text
    check_ray_address(text)


@pytest.mark.parametrize(
    "text",
    ["localhost", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "http://x:1", "a b:1", "ray://x"],
)
def test_malformed_addresses_are_one_config_error(text):
    with pytest.raises(ConfigError, match=r"^federation\.ray_address: ") as err:
        config_mod.load(None, [f'federation.ray_address="{text}"'])
    assert "\n" not in str(err.value)


def test_local_and_auto_pass_the_config_check():
    for text in ("", "auto"):
        assert (
            config_mod.load(None, [f'federation.ray_address="{text}"']).federation.ray_address
            == text
        )


def test_auto_reads_ray_address_then_the_address_ray_start_recorded(tmp_path):
    env = {"RAY_ADDRESS": "10.0.0.5:6379", "TMPDIR": str(tmp_path)}
    assert resolve_address("auto", env) == RayAddress("10.0.0.5", 6379)
    recorded = tmp_path / "ray" / "ray_current_cluster"
    recorded.parent.mkdir()
    recorded.write_text("192.0.2.7:6380\n")
    assert resolve_address("auto", {"TMPDIR": str(tmp_path)}) == RayAddress("192.0.2.7", 6380)
    # fl-privsim's own RAY_TMPDIR (local runs) is not where `ray start` records its cluster
    own = {"TMPDIR": str(tmp_path), "RAY_TMPDIR": str(tmp_path / "x" / "fl-privsim-ray")}
    assert resolve_address("auto", own) == RayAddress("192.0.2.7", 6380)
    theirs = tmp_path / "theirs"
    (theirs / "ray").mkdir(parents=True)
    (theirs / "ray" / "ray_current_cluster").write_text("192.0.2.8:6381")
    user = {"TMPDIR": str(tmp_path), "RAY_TMPDIR": str(theirs)}
    assert resolve_address("auto", user) == RayAddress("192.0.2.8", 6381)


def test_auto_with_no_cluster_recorded_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r'"auto": no Ray cluster recorded on this machine'):
        resolve_address("auto", {"TMPDIR": str(tmp_path)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nothing_listening_is_refused_at_once():
    port = _free_port()
    with pytest.raises(ConfigError, match=rf"cannot reach a Ray cluster at 127\.0\.0\.1:{port} "):
        reach_cluster(f"127.0.0.1:{port}")


def test_a_silent_server_is_refused_after_the_deadline():
    with socket.socket() as server:  # accepts TCP connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"cannot reach a Ray cluster .* within 1 s"):
            probe(RayAddress("127.0.0.1", port), timeout=1.0)
        assert (
            time.monotonic() - start < 30
        )  # the deadline holds (ray.init would retry for minutes)


def test_cli_run_against_an_absent_cluster_exits_2_with_one_line(tmp_path, capfd, monkeypatch):
    from fl_privsim.app.cli import main

    for key in ("RAY_TMPDIR", "FLWR_HOME", "RAY_DEDUP_LOGS", "FLWR_TELEMETRY_ENABLED"):
        monkeypatch.delenv(key, raising=False)  # the launcher sets them; put back afterwards
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _free_port()
    out = tmp_path / "run"
    code = main(
        ["run", "--quiet", "--out", str(out), "--set", f'federation.ray_address="127.0.0.1:{port}"']
    )
    assert code == 2
    err = capfd.readouterr().err.strip().splitlines()  # the process's stderr: gRPC's C core too
    assert len(err) == 1
    assert err[0].startswith(
        f"error: federation.ray_address: cannot reach a Ray cluster at 127.0.0.1:{port}"
    )
    assert not out.exists()  # refused before anything is written


def test_joining_passes_ray_init_only_what_an_existing_cluster_accepts():
    from fl_privsim.app.simulation import backend_config

    cfg = config_mod.load(None, ['federation.ray_address="auto"', 'federation.device="cpu"'])
    init_args = backend_config(cfg, connect="10.0.0.5:6379")["init_args"]
    assert init_args["address"] == "10.0.0.5:6379"  # "auto" resolved, never Ray's own fallback
    assert set(init_args) == {"address", "logging_level", "log_to_driver"}


SWEEP = """
name = "tiny"
[federation]
num_clients = 2
clients_per_round = 2
rounds = 1
device = "cpu"
ray_address = "127.0.0.1:{port}"
[sweep.grid]
"client.batch_size" = [1, 2]
"""


def test_sweep_on_a_cluster_refuses_parallel_jobs_and_an_absent_cluster(tmp_path):
    from fl_privsim.app.sweep import run_sweep
    from fl_privsim.app.sweep_config import load_sweep
    from fl_privsim.core.errors import UserError

    port = _free_port()
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(port=port))
    plan = load_sweep(path)
    with pytest.raises(UserError, match=r"^--jobs 2: cells that join a Ray cluster"):
        run_sweep(plan, out=str(tmp_path / "a"), jobs=2, show_progress=False)
    with pytest.raises(ConfigError, match=rf"cannot reach a Ray cluster at 127\.0\.0\.1:{port} "):
        run_sweep(plan, out=str(tmp_path / "b"), jobs=1, show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
