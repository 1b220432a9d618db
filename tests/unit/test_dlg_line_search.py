"""DLG and iDLG defaults on the documented ``lenet``/digits batch-1 setting (issue 16).

The cases are those of ``experiments/ig_fedavg_defaults.py --attack idlg --protocol fedsgd
--batch 1`` (a seeded default-init sigmoid ``lenet``, one digit per FedSGD update), built by
its own :func:`make_case` / :func:`run_case`. With both papers' fixed-step L-BFGS
(``line_search="none"``) iDLG stalls below the mean image there (6.6 dB mean over 16 cases,
mean image 11.4 dB); with the default (``"auto"``: that loop, then strong-Wolfe line-search
steps, and strong-Wolfe steps from the start, the lowest matching loss kept) it reaches
39.1 dB (min 31.0).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from adversaries import ATTACKS
from fl_privsim.core.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ig_fedavg_defaults.py"

#: Smallest attack-minus-mean-image gap with the defaults over the script's 16 cases
#: (``--cases 16``): iDLG 18.38 dB, DLG 19.99 dB.
MIN_MEASURED_GAP_DB = {"idlg": 18.38, "dlg": 19.99}


def run_case(case: int, attack: str, params: dict[str, object]) -> dict[str, float]:
    spec = importlib.util.spec_from_file_location("ig_fedavg_defaults", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get("ig_fedavg_defaults") or importlib.util.module_from_spec(spec)
    if "ig_fedavg_defaults" not in sys.modules:
        sys.modules["ig_fedavg_defaults"] = module
        spec.loader.exec_module(module)
    return module.run_case(
        case, attack_name=attack, protocol="fedsgd", batch=1, steps=1, params=params
    )


@pytest.mark.parametrize(
    ("attack", "case"),
    [("idlg", 0), ("dlg", 0), ("dlg", 1)],  # iDLG's default: ~15 s a case
)
def test_defaults_beat_the_mean_image_by_the_measured_margin(attack: str, case: int) -> None:
    """The attack sees only the observation; the script scores it against the true digit."""
    r = run_case(case, attack, {})
    assert r["labels_ok"] == 1.0
    # 0.5 dB: float rounding across machines (L-BFGS amplifies it), not a loosened target
    assert r["psnr"] - r["mean_image"] >= MIN_MEASURED_GAP_DB[attack] - 0.5, r


def test_the_papers_loop_stalls_below_the_mean_image_there() -> None:
    """Why the default changed: the fixed-step loop barely moves the dummy on this model."""
    r = run_case(0, "idlg", {"line_search": "none", "iterations": 5})
    assert r["psnr"] < r["mean_image"], r


@pytest.mark.parametrize("attack", ["idlg", "dlg"])
def test_line_search_is_checked(attack: str) -> None:
    with pytest.raises(ConfigError, match="line_search must be one of auto, none, strong_wolfe"):
        ATTACKS.create(attack, line_search="wolfe")
