"""``--json`` of ``fl-privsim reproduce`` and ``fl-privsim game``: stdout is the summary (as
written to summary.json, plus ``run_dir``) and nothing else; without it, the human text."""

from __future__ import annotations

import json

import torch

from fl_privsim.app.cli import main

torch.set_num_threads(1)

GAME = ["game", "--set", "game.trials=40", "--set", "game.shadow_trials=40"]


def test_game_json(tmp_path, capsys):
    assert main([*GAME, "--json", "--out", str(tmp_path / "run")]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert printed == {**saved, "run_dir": str(tmp_path / "run")}
    assert printed["game"] == "property" and 0.0 <= printed["auc"] <= 1.0


def test_game_text_without_json(tmp_path, capsys):
    assert main([*GAME, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "  AUC " in out and out.rstrip().endswith(f"run folder: {tmp_path / 'run'}")


def test_reproduce_json(shared_data, tmp_path, capsys):
    assert (
        main(["reproduce", "idlg_labels", "--quick", "--json", "--out", str(tmp_path / "run")]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert printed == {**saved, "run_dir": str(tmp_path / "run")}
    assert (
        printed["reproduction"] == "idlg_labels"
        and printed["quick"] is True
        and printed["trials"] == 3
    )


def test_reproduce_list_json(capsys):
    assert main(["reproduce", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "idlg_labels" in listed and "trials" in listed["idlg_labels"]["settings"]
    assert listed["idlg_labels"]["title"]
