"""`fl-privsim game`: happy path on digits and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_privsim.app.cli import main

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "--set",
    "game.trials=100",
    "--set",
    "game.shadow_trials=100",
    "--set",
    "game.bootstrap=50",
    "--set",
    "model.pretrain_steps=20",
]


def test_game_happy_path_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert (
        main(
            ["game", str(REPO / "experiments/game_property_digits.toml"), *SMALL, "--out", str(out)]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    for key in ("auc", "auc_ci", "accuracy", "advantage", "tpr_at_1pct_fpr"):
        assert key in summary
    assert (
        len(summary["auc_ci"]) == 2
        and summary["auc_ci"][0] <= summary["auc"] <= summary["auc_ci"][1]
    )
    assert summary["game"] == "property" and summary["trials"] == 100
    assert (
        (out / "roc.png").is_file()
        and (out / "config.toml").is_file()
        and (out / "scores.csv").is_file()
    )
    assert "AUC" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["--set", 'game.kind="colour"'],
            "allowed: attribute, property, distributional, user, membership",
        ),
        (["--set", 'game.kind="attribute"'], "needs data.name = 'adult' or 'utkface'"),
        (["--set", 'data.name="mnist"'], "allowed: adult, utkface, digits, cifar10_npz"),
        (
            ["--set", 'data.name="utkface"', "--set", 'data.sensitive="sex"'],
            "allowed: gender, race",
        ),
        (
            [
                "--set",
                'data.name="utkface"',
                "--set",
                'data.sensitive="gender"',
                "--set",
                'data.root="/no/such/utk"',
            ],
            "/no/such/utk",
        ),
        (["--set", 'game.features="alignment"'], "needs a target the adversary knows"),
        (["--set", "game.model_mismatch_steps=500"], "exceeds model.pretrain_steps"),
        (["--set", "game.rounds=0"], "game.rounds"),
        (["--set", 'game.round_combine="max"'], "allowed: mean_logit, concat"),
        (["--set", 'game.adversary="clever"'], "allowed: static, adaptive"),
        (["--set", "game.batch_size=0"], "minimum 1"),
        (["--set", "game.oops=1"], "unknown key 'oops'"),
        (["--set", 'defenses=[{name="nope"}]'], "defenses[0]"),
        (["no/such/config.toml"], "does not exist"),
        (["--set", 'defenses=[{name="dp_sgd", params={poisson=true}}]'], "sampler defenses"),
        (["--set", 'data.name="adult"', "--set", 'data.root="/no/such/folder"'], "adult.data.gz"),
    ],
)
def test_game_bad_input_is_one_line(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["game", *args, *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_game_multi_round_and_model_mismatch_run(tmp_path: Path) -> None:
    """rounds = R plays the same batches at R models; model_mismatch_steps moves the adversary's model."""
    out = tmp_path / "run"
    args = [
        "game",
        str(REPO / "experiments/game_property_digits.toml"),
        *SMALL,
        "--set",
        "game.rounds=2",
        "--set",
        "game.round_steps=5",
        "--set",
        "game.model_mismatch_steps=10",
        "--set",
        'game.round_combine="concat"',
        "--out",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["rounds"] == 2
        and summary["model_mismatch_steps"] == 10
        and summary["trials"] == 100
    )
    assert summary["auc_ci"][0] <= summary["auc"] <= summary["auc_ci"][1]
