"""Unknown keys and names get the closest match ("did you mean ...?") in every command's
one-line error (fl_privsim.core.errors.did_you_mean)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_privsim.app.cli import main
from fl_privsim.core.errors import ConfigError, did_you_mean


def test_did_you_mean() -> None:
    assert did_you_mean("batchsize", ["batch_size", "lr"]) == " (did you mean 'batch_size'?)"
    assert did_you_mean("LeNet", ["lenet", "mlp"]) == " (did you mean 'lenet'?)"
    assert did_you_mean("zzz", ["batch_size", "lr"]) == ""
    assert did_you_mean("x", []) == ""


@pytest.mark.parametrize(
    "args, hint",
    [
        (["config", "--set", "client.batchsize=4"], "did you mean 'batch_size'?"),
        (["config", "--set", "federaton.rounds=2"], "did you mean 'federation'?"),
        (["config", "--set", 'data.name="cifar"'], "did you mean 'cifar10'?"),
        (["config", "--set", 'model.name="lenett"'], "did you mean 'lenet'?"),
        (["run", "--quiet", "--set", 'attacks.0.name="analytc"'], "did you mean 'analytic'?"),
        (["run", "--quiet", "--set", "attacks.2.params.iteratons=5"], "did you mean 'iterations'?"),
        (["measure", "--set", "i2f.sample=4"], "did you mean 'samples'?"),
        (["measure", "--set", 'vinfo.target="lable"'], "did you mean 'label'?"),
        (["measure", "--set", "sensitivty.probes=4"], "did you mean 'sensitivity'?"),
        (["game", "--set", "game.trails=50"], "did you mean 'trials'?"),
        (["game", "--set", 'game.adversary="adaptiv"'], "did you mean 'adaptive'?"),
        (["reproduce", "robing_the_fed"], "did you mean 'robbing_the_fed'?"),
        (["reproduce", "demixing", "--set", "seeed=1"], "did you mean 'seed'?"),
    ],
)
def test_every_command_suggests_the_closest_name(
    args: list[str],
    hint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert hint in err, err
    assert not (tmp_path / "runs").exists()


def test_registries_and_models_suggest() -> None:
    import adversaries  # noqa: F401
    from adversaries.base import ATTACKS
    from fl_privsim.core.models import build_model

    with pytest.raises(
        ConfigError, match=r"unknown attack 'idgl' \(did you mean 'idlg'\?\); known:"
    ):
        ATTACKS.get("idgl")
    with pytest.raises(
        ConfigError, match=r"unknown parameter\(s\) iteratons \(did you mean 'iterations'\?\)"
    ):
        ATTACKS.check_params("idlg", {"iteratons": 3})
    with pytest.raises(ConfigError, match=r"unknown model 'cnn7' \(did you mean 'cnn6'\?\)"):
        build_model("cnn7", (3, 32, 32), 10)
    with pytest.raises(
        ConfigError, match=r"allowed: mlp"
    ) as err:  # nothing close: the same text as before
        build_model("transformer", (3, 32, 32), 10)
    assert "did you mean" not in str(err.value)
