"""Canary auditing (adversaries.inference.audit): the Clopper–Pearson ε lower bound is 0 when
TPR = FPR, never exceeds the accountant's ε under DP-SGD, and the CLI writes it."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from adversaries.inference import Release
from adversaries.inference.audit import (
    accountant_epsilons,
    audit_bound,
    craft_canary,
    epsilon_lower_bound,
    gaussian_epsilon,
    run_audit,
)
from clients.defenses import build_defenses
from fl_privsim.core.config import DefenseConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_games import ADULT, ATTR, toy_model, toy_pool

torch.set_num_threads(1)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (10, 10), (37, 100), (500, 1000)])
def test_bound_is_zero_when_tpr_equals_fpr(k: int, n: int) -> None:
    assert epsilon_lower_bound(k, n, k, n, 1e-5)["epsilon_lower_bound"] == 0.0


def test_bound_grows_with_separation_and_stays_below_the_cp_limit() -> None:
    weak = epsilon_lower_bound(60, 100, 40, 100, 1e-5)["epsilon_lower_bound"]
    strong = epsilon_lower_bound(95, 100, 5, 100, 1e-5)["epsilon_lower_bound"]
    perfect = epsilon_lower_bound(100, 100, 0, 100, 1e-5)
    assert 0.0 <= weak < strong < perfect["epsilon_lower_bound"]
    # perfect separation over n trials per class: log(TPR_lo / FPR_hi), both Clopper–Pearson ends
    lo, hi = perfect["tpr_ci"][0], perfect["fpr_ci"][1]
    assert perfect["epsilon_lower_bound"] == pytest.approx(math.log((lo - 1e-5) / hi))


def test_audit_bound_on_uninformative_scores_is_zero() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 2, 400)
    assert audit_bound(s, np.zeros(400), 1e-5)["epsilon_lower_bound"] == 0.0


def test_accountant_epsilons_order() -> None:
    e = accountant_epsilons(1.0, 1e-5)
    # exact Gaussian ε (replace-one, μ = 2/σ) ≤ its RDP bound; add/remove is the smaller sensitivity
    assert e["epsilon_add_remove"] < e["epsilon_exact"] <= e["epsilon"]
    assert gaussian_epsilon(1e-6, 1e-5) == 0.0 and gaussian_epsilon(1e-3, 1e-5) < 0.01


def test_epsilon_lower_bound_never_exceeds_accountant_epsilon() -> None:
    model = toy_model("mlp")
    pool, aux = toy_pool(400, 1), toy_pool(400, 2)
    canary = craft_canary(model, aux, attr_column=ATTR, max_grad_norm=1.0, steps=20, restarts=1)
    assert 0.0 < canary.separation <= 2.0 + 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {}
        for sigma in (0.5, 1.0, 2.0):
            defs = build_defenses(
                [
                    DefenseConfig(
                        name="dp_sgd", params={"noise_multiplier": sigma, "max_grad_norm": 1.0}
                    )
                ]
            )
            r = run_audit(
                model,
                Release(model, defenses=defs, seed=0),
                pool,
                aux,
                attr_column=ATTR,
                trials=160,
                natural=sigma == 0.5,
                canary=canary,
            )
            results[sigma] = r
            for kind in ("natural", "canary"):
                if kind in r:
                    assert (
                        0.0 <= r[kind]["epsilon_lower_bound"] <= r["epsilon_exact"] <= r["epsilon"]
                    )
    # the canary is audited at least as well at σ = 0.5 as at σ = 2
    assert (
        results[0.5]["canary"]["epsilon_lower_bound"]
        >= results[2.0]["canary"]["epsilon_lower_bound"]
    )
    assert results[0.5]["canary"]["auc"] > 0.6


@pytest.mark.skipif(not (ADULT / "adult.data.gz").is_file(), reason="needs ../shared/data/adult")
def test_cli_audit_writes_epsilons(tmp_path: Path) -> None:
    from fl_privsim.app.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "game",
            "--set",
            'game.kind="attribute"',
            "--set",
            "game.audit=true",
            "--set",
            "game.trials=24",
            "--set",
            "game.batch_size=1",
            "--set",
            "game.canary_steps=3",
            "--set",
            "game.bootstrap=20",
            "--set",
            'data.name="adult"',
            "--set",
            f'data.root="{ADULT}"',
            "--set",
            "data.pool_size=100",
            "--set",
            "data.aux_size=100",
            "--set",
            "model.pretrain_steps=10",
            "--set",
            'defenses=[{name="dp_sgd", params={noise_multiplier=1.0}}]',
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["epsilon"] > 0 and 0 <= s["epsilon_lower_bound"] <= s["epsilon"]
    assert {"natural", "canary", "epsilon_lower_bound_natural", "auc"} <= s.keys()


def test_cli_audit_needs_dp_sgd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fl_privsim.app.cli import main

    rc = main(
        [
            "game",
            "--set",
            'game.kind="attribute"',
            "--set",
            "game.audit=true",
            "--set",
            'data.name="adult"',
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc != 0
    assert "dp_sgd" in capsys.readouterr().err
