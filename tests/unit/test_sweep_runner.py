"""The sweep runner without Ray: a failed cell is recorded and the others go on; the tables,
plots and report are built from the finished cells; --jobs workers report their cells back."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from fl_privsim.app import sweep as sweep_mod
from fl_privsim.app import sweep_manifest as manifest_mod
from fl_privsim.app.sweep_config import load_sweep
from fl_privsim.app.sweep_results import read_csv_table
from fl_privsim.core.config import to_toml
from fl_privsim.core.results import RunFolder

CONFIG = """
name = "fake"
[federation]
rounds = 1
[[attacks]]
name = "analytic"
[sweep]
repeats = 2
[sweep.grid]
"client.batch_size" = [1, 4, 16]
"""


def _fake_run(cfg: Any, *, out: str, show_progress: bool = True) -> tuple[Path, dict]:
    """What a run leaves, with a PSNR that falls with the batch; batch 16 crashes midway."""
    folder = RunFolder(out)
    folder.write_config(to_toml(cfg))
    if cfg.client.batch_size == 16:
        raise RuntimeError("out of memory in round 1")
    psnr = 100.0 / cfg.client.batch_size + cfg.seed
    summary = {
        "name": cfg.name,
        "seed": cfg.seed,
        "attacks": {"analytic": {"attacked": 2, "psnr": psnr, "asr": 1.0 / cfg.client.batch_size}},
        "final_accuracy": 0.5,
        "initial_accuracy": 0.1,
        "accuracy_by_round": {"0": 0.1, "1": 0.5},
        "fit_seconds_by_round": {"1": 0.1},
    }
    folder.write_summary(summary)
    return folder.path, summary


@pytest.fixture
def plan(tmp_path: Path):
    path = tmp_path / "fake.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return load_sweep(path)


def test_a_failed_cell_is_recorded_and_the_others_go_on(plan, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "run", _fake_run)
    monkeypatch.setattr(sweep_mod, "kept_alive", contextlib.nullcontext)
    out = tmp_path / "sweep"
    outcome = sweep_mod.run_sweep(plan, out=str(out), show_progress=False)
    assert (outcome.done, outcome.failed, outcome.ran) == (4, 2, 6)
    manifest = json.loads((out / "sweep.json").read_text())
    failed = [c for c in manifest["cells"] if c["status"] == "failed"]
    assert [c["values"]["client.batch_size"] for c in failed] == [16, 16]
    assert all(c["error"] == "RuntimeError: out of memory in round 1" for c in failed)
    results = read_csv_table(out / "results.csv")
    assert len(results) == 4 + 2  # 4 finished cells x 1 attack, and one row per failed cell
    assert set(results[results["status"] == "failed"]["error"]) == {
        "RuntimeError: out of memory in round 1"
    }
    summary = read_csv_table(out / "summary.csv")
    psnr = summary[summary["metric"] == "psnr"].set_index("client.batch_size")
    assert psnr.loc[1, "mean"] == pytest.approx(100.5)  # seeds 0 and 1: 100 and 101
    assert psnr.loc[4, "mean"] == pytest.approx(25.5)
    assert (out / "plots" / "psnr.png").is_file()
    assert (out / "report.html").is_file()

    # --resume reruns the failed cells only (here they fail again) and keeps the others
    calls: list[int] = []

    def counting_run(cfg: Any, **kw: Any) -> Any:
        calls.append(cfg.client.batch_size)
        return _fake_run(cfg, **kw)

    monkeypatch.setattr(sweep_mod, "run", counting_run)
    again = sweep_mod.run_sweep(plan, resume=str(out), show_progress=False)
    assert calls == [16, 16] and (again.done, again.failed, again.ran) == (4, 2, 2)


def test_ctrl_c_leaves_the_running_cell_pending(plan, tmp_path, monkeypatch):
    def interrupted(cfg: Any, **kw: Any) -> Any:
        if cfg.client.batch_size == 4:
            raise KeyboardInterrupt
        return _fake_run(cfg, **kw)

    monkeypatch.setattr(sweep_mod, "run", interrupted)
    monkeypatch.setattr(sweep_mod, "kept_alive", contextlib.nullcontext)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.run_sweep(plan, out=str(out), show_progress=False)
    states = [c["status"] for c in json.loads((out / "sweep.json").read_text())["cells"]]
    assert states == ["done", "done", "pending", "pending", "pending", "pending"]


def test_workers_report_their_cells_back(plan, tmp_path):
    """--jobs 2 through real spawned worker processes. The cells fail fast, before Ray starts
    (their folders are not empty, which a run refuses), so this checks the plumbing: the
    workers start, run their cells and the failures come back with their errors."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    manifest = manifest_mod.new_manifest(plan)
    todo = manifest["cells"][:3]
    for cell in todo:
        (folder / cell["dir"]).mkdir(parents=True)
        (folder / cell["dir"] / "stale").write_text("x", encoding="utf-8")
    progress = sweep_mod.CellProgress(len(todo), 0, jobs=2, enabled=False)
    configs = {c.id: c for c in plan.cells}
    sweep_mod._run_in_workers(folder, manifest, todo, configs, progress, 2, False)
    assert [c["status"] for c in todo] == ["failed"] * 3
    assert all("exists and is not empty" in c["error"] for c in todo)
    assert progress.failed == 3


def test_an_interrupted_cell_is_not_finished(plan, tmp_path, monkeypatch):
    """A run stopped by SIGINT/SIGTERM writes summary.json with status interrupted: the table
    leaves it out and --resume runs it again."""
    from fl_privsim.app.sweep_results import write_tables

    monkeypatch.setattr(sweep_mod, "run", _fake_run)
    monkeypatch.setattr(sweep_mod, "kept_alive", contextlib.nullcontext)
    out = tmp_path / "sweep"
    sweep_mod.run_sweep(plan, out=str(out), show_progress=False)
    manifest = json.loads((out / "sweep.json").read_text())
    first = manifest["cells"][0]
    (out / first["dir"] / "summary.json").write_text('{"status": "interrupted"}', encoding="utf-8")
    first["status"] = "running"
    manifest_mod.write_manifest(out, manifest)
    results, _ = write_tables(out)
    assert first["id"] not in set(results["cell_id"])
    todo = manifest_mod.reconcile(out, manifest)
    assert first["id"] in [c["id"] for c in todo]
