"""The ``i2f_vs_dgl`` reproduction: helpers on known inputs, and the quick run on real MNIST
(skipped cleanly where ../shared/data/mnist is absent)."""

from __future__ import annotations

import math

import pytest
import torch

from fl_privsim.app.reproduce.i2f_vs_dgl import parse_noise, spearman
from fl_privsim.core.errors import ConfigError

torch.set_num_threads(1)


def test_parse_noise():
    assert parse_noise("gaussian:1e-3") == ("gaussian", 1e-3)
    assert parse_noise("pruning:0.4") == ("pruning", 0.4)
    for bad in ("gaussian", "uniform:1e-3", "pruning:1.5", "laplace:-1", "gaussian:x"):
        with pytest.raises(ConfigError, match="noises"):
            parse_noise(bad)


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1.0, 2.0, math.nan]) == pytest.approx(
        1.0
    )  # diverged = largest error
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_quick_reproduction(shared_data, tmp_path):
    if not (shared_data / "mnist").is_dir():
        pytest.skip(f"{shared_data / 'mnist'} not present")
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("i2f_vs_dgl", quick=True, out=tmp_path / "run")
    s = result.summary
    assert s["samples"] == 3 and s["settings"] == ["gaussian:1e-3"]
    assert s["attacks"] == ["idlg", "inverting_gradients"] and s["ig_iterations"] == 5
    for sfx in ("", "_ig"):  # iDLG's keys, then Inverting Gradients'
        for key in ("spearman_lb", "spearman_exact", "lower_bound_holds", "rmse_median"):
            assert set(s[key + sfx]) == {"gaussian:1e-3"}
        assert -1.0 <= s["spearman_lb" + sfx]["gaussian:1e-3"] <= 1.0
        assert (
            0.0 <= s["lower_bound_holds_all" + sfx] <= 1.0
            and s["rmse_median" + sfx]["gaussian:1e-3"] > 0
        )
    assert s["all_cg_converged"]
    for name in ("summary.json", "table.md", "samples.json", "i2f_vs_rmse.png", "settings.toml"):
        assert (path / name).is_file(), name
    assert (
        "Spearman" in result.table
        and "0.8" in result.table
        and "Inverting Gradients" in result.table
    )


def test_attacks_setting_selects_and_validates(shared_data, tmp_path):
    if not (shared_data / "mnist").is_dir():
        pytest.skip(f"{shared_data / 'mnist'} not present")
    from fl_privsim.app.reproduce import run_reproduction

    _, result = run_reproduction(
        "i2f_vs_dgl",
        quick=True,
        out=tmp_path / "ig",
        overrides=['attacks=["inverting_gradients"]', "samples=3"],
    )
    s = result.summary
    assert (
        s["attacks"] == ["inverting_gradients"] and "spearman_lb_ig" in s and "spearman_lb" not in s
    )
    with pytest.raises(ConfigError, match="attacks.*idlg, inverting_gradients"):
        run_reproduction(
            "i2f_vs_dgl", quick=True, out=tmp_path / "bad", overrides=['attacks=["dlg"]']
        )
