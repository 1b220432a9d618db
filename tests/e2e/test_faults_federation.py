"""Client failures and interrupts on a real Ray federation (small: digits, mlp, 10 clients)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod
from fl_privsim.core.faults import injected_failures

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    'model.name="mlp"',
    "federation.num_clients=10",
    "federation.clients_per_round=10",
    'federation.device="cpu"',
    "federation.fraction_evaluate=0",
    "output.save_images=false",
]


def test_failure_rate_run_completes_and_counts_the_injected_failures(tmp_path):
    settings = [
        *SMALL,
        "federation.rounds=3",
        "federation.failure_rate=0.2",
        'federation.failure_mode="mixed"',
        'attacks=[{name = "analytic", targets = { rounds = [1, 2, 3], clients = [0, 1, 2, 3] }}]',
    ]
    cfg = config_mod.load(None, settings)
    sampled = {r: range(10) for r in (1, 2, 3)}  # every client is sampled
    expected = injected_failures(cfg.seed, 0.2, "mixed", sampled)
    assert sum(map(len, expected.values())) > 0  # this seed injects failures
    path, summary = run(cfg, out=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed"
    failures = summary["failures"]
    assert failures["by_round"] == {str(r): len(c) for r, c in expected.items()}
    assert failures["total"] == sum(map(len, expected.values()))
    assert failures["injected"]["by_round"] == failures["by_round"]
    assert failures["injected"]["clients"] == {str(r): sorted(c) for r, c in expected.items()}
    # the aggregate holds only the real replies
    assert failures["aggregated_by_round"] == {str(r): 10 - len(c) for r, c in expected.items()}
    assert all(math.isfinite(a) for a in summary["accuracy_by_round"].values())
    assert summary["final_accuracy"] > summary["initial_accuracy"]
    # an attack on a failed client records why it was skipped
    targeted_failed = sum(len(set(c) & {0, 1, 2, 3}) for c in expected.values())
    attack = summary["attacks"]["analytic"]
    assert attack["skipped"] == targeted_failed > 0
    assert attack["attacked"] == 4 * 3 - targeted_failed
    assert all(" failed in round " in r for r in attack["skipped_reasons"])
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["source"] == "attack/analytic" and r["key"] == "skipped"]
    assert len(skipped) == targeted_failed
    assert json.loads((path / "summary.json").read_text())["failures"] == json.loads(
        json.dumps(failures)
    )


def _rounds_evaluated(metrics: Path) -> int:
    """The last round with a central evaluation in ``metrics`` (0 when none yet)."""
    done = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if row["source"] == "server_eval":
                done = max(done, int(row["round"]))
    return done


@pytest.mark.parametrize("mode", ["off", "secagg+"])
def test_sigint_leaves_status_interrupted(tmp_path, mode):
    """Both server paths (Message API; SecAgg+ on Flower's workflow path) leave a summary with
    the status, the rounds so far and the Ray record."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fl_privsim.app.cli", "run", "--quiet", "--out", str(out)]
    small = [*SMALL, "federation.num_clients=3", "federation.clients_per_round=3"]
    small.append(f'federation.secure_aggregation.mode="{mode}"')
    for s in [*small, "federation.rounds=200", "attacks=[]"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:  # the first round's metrics
            if _rounds_evaluated(metrics) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: run folder"), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert 1 <= len(summary["accuracy_by_round"]) - 1 < 200  # round 0 plus the rounds done
    assert summary["ray"]["address"] == "local"
    if mode == "off":
        assert summary["failures"]["total"] == 0
    else:
        assert summary["secure_aggregation"]["mode"] == "secagg+"
    lines = metrics.read_text().splitlines()
    assert all(json.loads(x) for x in lines)  # every line whole


def test_a_hanging_client_is_left_behind_at_the_round_timeout(tmp_path):
    settings = [
        *SMALL,
        "federation.num_clients=6",
        "federation.clients_per_round=6",
        "federation.rounds=2",
        "federation.failure_rate=0.1",
        'federation.failure_mode="hang"',
        "federation.round_timeout=20",  # round 1 includes starting the client actors
        "attacks=[]",
    ]
    cfg = config_mod.load(None, settings)
    expected = injected_failures(cfg.seed, 0.1, "hang", {r: range(6) for r in (1, 2)})
    assert sum(map(len, expected.values())) > 0  # this seed injects hangs
    _, summary = run(cfg, out=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed"
    failures = summary["failures"]
    assert failures["by_round"] == {str(r): len(c) for r, c in expected.items()}
    assert failures["reasons"] == ["no reply within 20 s"]
    assert failures["aggregated_by_round"] == {str(r): 6 - len(c) for r, c in expected.items()}
    assert failures["injected"]["by_kind"] == {"hang": failures["total"]}
    assert summary["devices"] == {"server": "cpu", "clients": ["cpu"]}
