"""The ``defenses`` reproduction (issue 4's evaluation): calibration and a quick real run."""

from __future__ import annotations

import pytest

from clients.defenses.schedules import resolve_schedule
from fl_privsim.app.reproduce._defenses_rows import ROWS, bisect_scale, epsilon, specs
from fl_privsim.core.errors import ConfigError


@pytest.mark.parametrize("schedule", ["linear", "staircase", "exponential", "cyclic"])
def test_calibration_hits_target_epsilon(schedule):
    fn = resolve_schedule(schedule)
    base = [fn(t, 9) for t in range(10)]
    a = bisect_scale(base, 0.064, 5, 1e-5, 3.0)
    assert epsilon([a * s for s in base], 0.064, 5, 1e-5) == pytest.approx(3.0, rel=1e-3)


def test_fixed_sigma_calibration_matches_constant_schedule():
    sigma = bisect_scale([1.0] * 10, 0.064, 5, 1e-5, 3.0)
    assert epsilon([sigma] * 10, 0.064, 5, 1e-5) == pytest.approx(3.0, rel=1e-3)
    assert epsilon([2 * sigma] * 10, 0.064, 5, 1e-5) < 3.0


def test_every_row_builds():
    settings = {
        "delta": 1e-5,
        "clip_norm": 1.0,
        "rounds": 5,
        "pruning_ratio": 0.9,
        "quantization_bits": 8,
        "noise_scale": 0.01,
    }
    for row in ROWS:
        assert isinstance(specs(row, settings, 1.0), list)
    with pytest.raises(ConfigError, match="unknown row"):
        specs("bogus", settings, 1.0)


def test_quick_reproduction(shared_data, tmp_path):
    if not (shared_data / "mnist").is_dir():
        pytest.skip(f"needs {shared_data / 'mnist'}")
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("defenses", quick=True, out=tmp_path / "run")
    s = result.summary
    # The DP rows end at the calibrated ε; the undefended update is reconstructed, DP ones are not.
    assert s["mnist_epsilon_dp_fixed"] == pytest.approx(3.0, rel=1e-3)
    assert s["mnist_epsilon_dynamic_linear"] == pytest.approx(3.0, rel=1e-3)
    assert s["mnist_epsilon_none"] is None
    assert s["mnist_analytic_asr_none"] == 1.0
    assert s["mnist_analytic_asr_dp_fixed"] == 0.0 and s["mnist_idlg_asr_dp_fixed"] == 0.0
    assert 0.0 <= s["mnist_accuracy_none"] <= 1.0
    assert (
        "dynamic_linear" in result.table
        and (path / "table.md").is_file()
        and (path / "accuracy.png").is_file()
    )
    # The mixing-loss table: distinct labels through a fresh dense layer are de-mixed with either
    # loss (the attack is told the loss); identical labels are not.
    for loss in ("cross_entropy", "mse"):
        assert s[f"mixing_init_recovered_{loss}_random_b4"] == 1.0
        assert s[f"mixing_init_recovered_{loss}_identical_b4"] < 1.0
        assert 0.0 <= s[f"mixing_accuracy_{loss}_identical_b4"] <= 1.0
    assert "mixing_loss" in result.table
