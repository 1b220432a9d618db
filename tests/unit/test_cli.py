"""The CLI: help texts, and bad input gives one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fl_privsim.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_help_lists_commands_and_keys():
    top = _cli("--help")
    assert top.returncode == 0 and "run" in top.stdout
    sub = _cli("run", "--help")
    assert sub.returncode == 0
    for key in ("--set", "--out", "federation.protocol", "client.batch_size", "attacks[i].targets.rounds"):
        assert key in sub.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "--set", "federation.roundz=2"], ["roundz"]),
        (["run", "--set", "federation.rounds=-1"], ["federation.rounds", "minimum"]),
        (["run", "missing.toml"], ["missing.toml", "does not exist"]),
        (["run", "--set", 'data.name="mnist_idx"', "--set", 'data.root="/nonexistent/mnist"'], ["/nonexistent/mnist"]),
        (["run", "--set", "attacks.0.params.bogus=1"], ["bogus", "analytic"]),
        (["run", "--set", 'attacks.0.name="nope"'], ["nope", "inverting_gradients"]),
        (["run", "--set", "attacks.2.params.iterations=-5"], ["attacks[2]", "iterations"]),
        (["config", "--set", "client.batch_size=0"], ["client.batch_size"]),
        (["reproduce", "nope"], ["nope", "idlg_labels", "rgap_cnn6"]),
        (["reproduce", "demixing", "--set", "bogus=1"], ["bogus", "allowed"]),
        (["reproduce", "demixing", "--set", "seed=[1]"], ["demixing.seed", "integer"]),
        (["reproduce", "rgap_cnn6", "--config", "missing.toml"], ["missing.toml", "does not exist"]),
        (["reproduce"], ["name a reproduction"]),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, words):
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err
    assert not (tmp_path / "runs").exists()  # nothing written for a rejected config


def test_out_folder_that_has_files_is_not_overwritten(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = _cli("run", "--quiet", "--out", str(out), "--set", "federation.rounds=1", cwd=tmp_path)
    assert res.returncode == 2 and "not empty" in res.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_config_prints_resolved_toml():
    res = _cli("config", "--set", "federation.rounds=7")
    assert res.returncode == 0 and "rounds = 7" in res.stdout


def test_attacks_lists_builtins():
    res = _cli("attacks")
    assert res.returncode == 0
    for name in ("analytic", "idlg", "inverting_gradients"):
        assert name in res.stdout


def test_reproduce_lists_the_papers_experiments():
    res = _cli("reproduce", "--list")
    assert res.returncode == 0
    for name in ("idlg_labels", "rgap_cnn6", "demixing", "inverting_batch_steps"):
        assert name in res.stdout


def test_reproduce_without_shared_data_leaves_no_folder(tmp_path):
    import os

    env = {**os.environ, "FL_PRIVSIM_SHARED_DATA": str(tmp_path / "nowhere")}
    res = subprocess.run([sys.executable, "-m", "fl_privsim.cli", "reproduce", "rgap_cnn6", "--quick",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)
    assert res.returncode == 2 and "nowhere" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
