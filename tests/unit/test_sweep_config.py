"""``fl-privsim sweep``: the [sweep] table, its cells, bad configs and the manifest (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_privsim.app import sweep_manifest as manifest_mod
from fl_privsim.app.sweep_config import load_sweep
from fl_privsim.core.errors import ConfigError, UserError
from tests.unit.cli_helpers import run_cli

BASE = """
name = "s"
[federation]
rounds = 1
[[attacks]]
name = "analytic"
"""


def _write(tmp_path: Path, sweep: str, base: str = BASE) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(base + sweep, encoding="utf-8")
    return path


def test_grid_crosses_keys_and_repeats_seeds(tmp_path):
    path = _write(
        tmp_path,
        '[sweep]\nrepeats = 2\n[sweep.grid]\n"client.batch_size" = [1, 4, 16]\n'
        '"federation.clients_per_round" = [2, 10]\n',
    )
    plan = load_sweep(path)
    assert len(plan.cells) == 3 * 2 * 2
    assert [c.id for c in plan.cells[:4]] == ["c000_s0", "c000_s1", "c001_s0", "c001_s1"]
    first, last = plan.cells[0], plan.cells[-1]
    assert first.values == {"client.batch_size": 1, "federation.clients_per_round": 2}
    assert last.values == {"client.batch_size": 16, "federation.clients_per_round": 10}
    assert (last.config.client.batch_size, last.config.federation.clients_per_round) == (16, 10)
    assert [c.seed for c in plan.cells[:2]] == [0, 1]  # seed, seed+1
    assert {c.config.name for c in plan.cells} == {"s"}


def test_zip_keys_vary_together(tmp_path):
    path = _write(
        tmp_path,
        '[sweep]\nzip = [["client.batch_size", "client.local_steps"]]\n[sweep.grid]\n'
        '"client.batch_size" = [1, 8]\n"client.local_steps" = [8, 1]\n'
        '"federation.protocol" = ["fedsgd", "fedavg"]\n',
    )
    plan = load_sweep(path)
    pairs = {(c.values["client.batch_size"], c.values["client.local_steps"]) for c in plan.cells}
    assert pairs == {(1, 8), (8, 1)}
    assert len(plan.cells) == 4


def test_a_list_valued_key_replaces_the_list(tmp_path):
    path = _write(
        tmp_path,
        '[sweep]\n[sweep.grid]\n"defenses" = [[], [{name = "noise", params = {scale = 0.01}}]]\n',
    )
    plan = load_sweep(path)
    assert [len(c.config.defenses) for c in plan.cells] == [0, 1]
    assert plan.cells[1].config.defenses[0].name == "noise"


def test_set_overrides_the_base_but_not_a_swept_key(tmp_path):
    path = _write(tmp_path, '[sweep]\n[sweep.grid]\n"client.batch_size" = [1, 2]\n')
    plan = load_sweep(path, ["federation.rounds=3"])
    assert {c.config.federation.rounds for c in plan.cells} == {3}
    with pytest.raises(ConfigError, match="swept"):
        load_sweep(path, ["client.batch_size=8"])


BAD = {
    "unknown key": ('"client.batchsize" = [1, 2]', "batchsize"),
    "empty list": ('"client.batch_size" = []', "empty"),
    "wrong type": ('"client.batch_size" = ["four"]', "client.batch_size"),
    "out of range": ('"client.batch_size" = [0]', "client.batch_size"),
    "not a list": ('"client.batch_size" = 4', "expected a list"),
    "seed": ('"seed" = [1, 2]', "repeats"),
    "output": ('"output.dir" = ["a"]', "cannot be swept"),
    "name": ('"name" = ["a"]', "cannot be swept"),
    "unknown choice": ('"model.name" = ["mlp", "nope"]', "model.name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_config_is_one_line_exit_2_before_any_cell(tmp_path, case):
    line, expected = BAD[case]
    path = _write(tmp_path, f"[sweep]\n[sweep.grid]\n{line}\n")
    out = tmp_path / "out"
    result = run_cli("sweep", str(path), "--out", str(out), "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(
    "sweep, expected",
    [
        ('[sweep]\nrepeats = 0\n[sweep.grid]\n"client.batch_size" = [1]\n', "repeats"),
        ('[sweep]\nrepeat = 2\n[sweep.grid]\n"client.batch_size" = [1]\n', "did you mean"),
        ("[sweep]\nrepeats = 2\n", "[sweep.grid]"),
        ('[sweep]\nzip = [["a"]]\n[sweep.grid]\n"client.batch_size" = [1]\n', "zip"),
        (
            (
                '[sweep]\nzip = [["client.batch_size", "client.lr"]]\n[sweep.grid]\n'
                '"client.batch_size" = [1, 2]\n"client.lr" = [0.1]\n'
            ),
            "equally many",
        ),
        ("", "no [sweep] table"),
    ],
)
def test_bad_sweep_table(tmp_path, sweep, expected):
    result = run_cli("sweep", str(_write(tmp_path, sweep)), "--quiet")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert expected in result.stderr


def test_run_refuses_a_sweep_config_with_a_hint(tmp_path):
    path = _write(tmp_path, '[sweep]\n[sweep.grid]\n"client.batch_size" = [1, 2]\n')
    result = run_cli("run", str(path), "--quiet")
    assert result.returncode == 2
    assert "fl-privsim sweep" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_config_and_bad_jobs_are_one_line(tmp_path):
    for args in (
        ("sweep", str(tmp_path / "missing.toml")),
        ("sweep",),
        ("sweep", "--resume", str(tmp_path)),
    ):
        result = run_cli(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, args
    path = _write(tmp_path, '[sweep]\n[sweep.grid]\n"client.batch_size" = [1]\n')
    result = run_cli("sweep", str(path), "--jobs", "0")
    assert result.returncode == 2 and "--jobs" in result.stderr


def test_manifest_reconcile_keeps_finished_cells_and_clears_half_written(tmp_path):
    path = _write(tmp_path, '[sweep]\nrepeats = 2\n[sweep.grid]\n"client.batch_size" = [1]\n')
    plan = load_sweep(path)
    folder = tmp_path / "sweep"
    folder.mkdir()
    manifest = manifest_mod.new_manifest(plan)
    done, half = (folder / c["dir"] for c in manifest["cells"])
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}", encoding="utf-8")
    before = (done / "summary.json").stat()
    half.mkdir(parents=True)
    (half / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    manifest["cells"][1]["status"] = "failed"
    todo = manifest_mod.reconcile(folder, manifest)
    assert [c["id"] for c in todo] == ["c000_s1"]
    assert [c["status"] for c in manifest["cells"]] == ["done", "pending"]
    assert not half.exists()  # redone from an empty folder
    assert (done / "summary.json").stat().st_mtime_ns == before.st_mtime_ns
    manifest_mod.write_manifest(folder, manifest)
    assert json.loads((folder / "sweep.json").read_text())["cells"][0]["status"] == "done"


def test_resume_refuses_another_plan(tmp_path):
    path = _write(tmp_path, '[sweep]\n[sweep.grid]\n"client.batch_size" = [1, 2]\n')
    plan = load_sweep(path)
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / manifest_mod.CONFIG).write_text(plan.to_toml(), encoding="utf-8")
    manifest = manifest_mod.new_manifest(plan)
    manifest_mod.check_same_plan(folder, manifest, plan)  # the same plan resumes
    other = load_sweep(path, ["federation.rounds=2"])
    with pytest.raises(UserError, match="differs"):
        manifest_mod.check_same_plan(folder, manifest, other)
    saved = load_sweep(folder / manifest_mod.CONFIG)  # the saved sweep.toml plans the same
    manifest_mod.check_same_plan(folder, manifest, saved)


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
    probe = (
        "import sys; from pathlib import Path; from fl_privsim.app import sweep_manifest as m\n"
        "from fl_privsim.core.errors import UserError\n"
        "try:\n"
        "    with m.locked(Path(sys.argv[1])): sys.exit(0)\n"
        "except UserError as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    with manifest_mod.locked(tmp_path):
        held = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path)],
            check=False,
            capture_output=True,
            text=True,
        )
    free = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], check=False, capture_output=True, text=True
    )
    assert held.returncode == 3 and "another fl-privsim sweep" in held.stdout
    assert free.returncode == 0  # released with the holder
