"""``fl-privsim sweep`` end to end on real Ray federations: the tidy table, the report in a real
browser, kill -9 in the middle then ``--resume`` (finished cells kept byte for byte, the same
table as an uninterrupted sweep), and the example sweep configs planned and checked cell by
cell."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fl_privsim.app.sweep import check_cells
from fl_privsim.app.sweep_config import load_sweep
from fl_privsim.app.sweep_results import read_csv_table
from tests.browser import Browser, assert_report_matches_summary, chromium_path

pytestmark = pytest.mark.e2e

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CONFIG = """
name = "tiny"
[federation]
num_clients = 4
clients_per_round = 4
rounds = 1
fraction_evaluate = 0.0
device = "cpu"
[[attacks]]
name = "analytic"
targets = { rounds = [1], clients = [0] }
[[attacks]]
name = "analytic"
targets = { rounds = [1], clients = [], aggregate = true }
[sweep]
repeats = 2
[sweep.grid]
"client.batch_size" = [1, 4]
"""
CELLS = 4  # 2 batch sizes x 2 seeds
ATTACKS = ("analytic", "analytic@aggregate")


def _sweep(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fl_privsim.app.cli", "sweep", *args, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ray's helpers are cleaned up with it
        **kw,  # type: ignore[call-overload]
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return proc.returncode, err


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sweep_config") / "tiny.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def whole(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep that ran without interruption."""
    out = tmp_path_factory.mktemp("sweep_whole") / "sweep"
    code, err = _finish(_sweep(str(config), "--out", str(out)))
    assert code == 0, err
    return out


def test_sweep_writes_cells_table_and_report(whole: Path) -> None:
    manifest = json.loads((whole / "sweep.json").read_text(encoding="utf-8"))
    assert [c["status"] for c in manifest["cells"]] == ["done"] * CELLS
    for cell in manifest["cells"]:  # each cell an ordinary run folder with its own report
        folder = whole / cell["dir"]
        assert (folder / "summary.json").is_file() and (folder / "report.html").is_file()
    results = read_csv_table(whole / "results.csv")
    pd.testing.assert_frame_equal(results, pd.read_parquet(whole / "results.parquet"))
    assert len(results) == CELLS * len(ATTACKS)  # one row per cell x seed x attack
    assert sorted(set(results["attack"])) == sorted(ATTACKS)
    aggregate = results[results["attack"] == "analytic@aggregate"]
    assert set(aggregate["clients_in_aggregate"]) == {4}
    assert sorted(set(aggregate["aggregate_size"])) == [4, 16]  # batch x 1 step x 4 clients
    single = results[results["attack"] == "analytic"]
    assert sorted(set(single["aggregate_size"])) == [1, 4]
    # batch 1 is one record behind the update: the analytic attack recovers it exactly
    assert (single[single["client.batch_size"] == 1]["psnr"] > 60).all()
    summary = read_csv_table(whole / "summary.csv")
    psnr = summary[(summary["metric"] == "psnr") & (summary["attack"] == "analytic")]
    assert set(psnr["n"]) == {2}
    assert (psnr["ci_low"] <= psnr["mean"]).all() and (psnr["mean"] <= psnr["ci_high"]).all()
    assert (whole / "plots" / "psnr.png").is_file()


def test_sweep_and_cell_reports_in_a_browser(whole: Path) -> None:
    if chromium_path() is None:
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    summary = read_csv_table(whole / "summary.csv")
    with Browser() as browser:
        page = browser.check(whole / "report.html")
        assert page.console_errors == []
        assert page.images and all(img["loaded"] for img in page.images), page.images
        psnr = summary[summary["metric"] == "psnr"]
        assert len(psnr) == 2 * len(ATTACKS)  # 2 cells x 2 attacks
        for row in psnr.itertuples():  # summary.csv's numbers, as the CLI formats PSNR
            assert f"{row.mean:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]" in page.text
        cell = whole / "cells" / "c000_s0"
        assert_report_matches_summary(cell, browser.check(cell / "report.html"))


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("cells/*/summary.json"))
    }


def test_kill_9_then_resume_keeps_finished_cells_and_gives_the_same_table(
    config: Path, whole: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    proc = _sweep(str(config), "--out", str(out))
    deadline = time.monotonic() + 300
    try:  # kill -9 the sweep once a cell has finished and another one is running
        while time.monotonic() < deadline:
            done = list(out.glob("cells/*/summary.json"))
            if done and len(done) < CELLS:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)  # Ray's helper processes that outlive a killed driver
    before = _digests(out)
    assert 0 < len(before) < CELLS
    code, err = _finish(_sweep("--resume", str(out)))
    assert code == 0, err
    after = _digests(out)
    assert len(after) == CELLS
    assert {k: after[k] for k in before} == before  # the same bytes
    pd.testing.assert_frame_equal(
        read_csv_table(out / "results.csv"), read_csv_table(whole / "results.csv")
    )
    pd.testing.assert_frame_equal(
        read_csv_table(out / "summary.csv"), read_csv_table(whole / "summary.csv")
    )


@pytest.mark.parametrize(
    "path",
    sorted(p for p in EXPERIMENTS.glob("*.toml") if "[sweep]" in p.read_text(encoding="utf-8")),
    ids=lambda p: p.stem,
)
def test_example_sweeps_plan_and_pass_the_run_checks(
    path: Path, shared_data: Path, tmp_path: Path
) -> None:
    # the examples name ../../shared/data/<folder> relative to themselves; point those at
    # $FL_PRIVSIM_SHARED_DATA (or ../shared/data) wherever it is
    text = path.read_text(encoding="utf-8").replace('"../../shared/data/', f'"{shared_data}/')
    copy = tmp_path / path.name
    copy.write_text(text, encoding="utf-8")
    plan = load_sweep(copy)
    assert plan.cells
    check_cells(plan)  # every cell x seed as fl-privsim run checks it before starting Ray
