"""UTKFace in the inference games: read from ../shared/data/utkface only (never shipped);
a missing folder is one DataError naming it; the tests that need the faces skip cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adversaries.inference.datasets import load_game_data
from adversaries.inference.utkface import load_utkface
from fl_privsim.core.errors import ConfigError, DataError
from fl_privsim.core.paths import shared_data_dir

torch.set_num_threads(1)
UTK = shared_data_dir() / "utkface"  # honours $FL_PRIVSIM_SHARED_DATA
needs_utk = pytest.mark.skipif(
    not (UTK / "utkface_subset_1500.zip").is_file(),
    reason="../shared/data/utkface is absent (UTKFace is never shipped)",
)


def test_missing_folder_is_one_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_game_data("utkface", root=missing, sensitive="gender")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DataError, match="utkface_subset_1500.zip"):
        load_utkface(tmp_path / "empty")


def test_bad_sensitive_attribute_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="allowed: gender, race"):
        load_utkface(UTK, sensitive="sex")


def test_utkface_not_in_the_package() -> None:
    repo = Path(__file__).resolve().parents[2]
    shipped = [
        p
        for p in repo.rglob("*")
        if "utkface" in p.name.lower()
        and p.suffix in (".zip", ".csv", ".jpg")
        or p.name.endswith(".jpg.chip.jpg")
    ]
    assert not shipped


@needs_utk
def test_utkface_pools_and_codings() -> None:
    x, y, a = load_utkface(UTK, "race", image_size=16)
    assert x.shape == (1500, 3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert int(a.sum()) == 1200  # 150 per gender x race cell: 4 of 5 races are "not White" (a = 1)
    assert 0.3 < float(y.float().mean()) < 0.6  # label: age >= 30
    d = load_game_data(
        "utkface", root=UTK, sensitive="gender", pool_size=600, aux_size=600, image_size=16
    )
    assert d.x_pool.shape[1:] == (3, 16, 16) and len(d.y_pool) == 600 and len(d.y_aux) == 600
    assert len(d.y_pre) == 300 and d.attr_column is None and d.attribute == "gender"
    assert abs(float(d.x_pre.mean())) < 1e-4  # normalised with the pretraining split's statistics


@needs_utk
def test_attribute_game_on_utkface_runs(tmp_path: Path) -> None:
    from fl_privsim.app.game import load_game_config, run_game

    repo = Path(__file__).resolve().parents[2]
    cfg = load_game_config(
        repo / "experiments/game_attribute_utkface.toml",
        [
            "game.trials=60",
            "game.shadow_trials=60",
            "game.bootstrap=20",
            "model.pretrain_steps=5",
            "data.image_size=12",
            "game.batch_size=1",
            f'data.root="{UTK}"',
        ],
    )
    _, s = run_game(cfg, out=tmp_path / "run")
    assert s["dataset"] == "utkface" and s["attribute"] == "gender" and s["trials"] == 60
    assert s["auc_ci"][0] <= s["auc"] <= s["auc_ci"][1]
