"""The attacks the two all-attacks examples leave out stop a run before launch.

``experiments/all_attacks_cnn6_cifar.toml`` and ``experiments/all_attacks_linear_fedavg.toml``
run every attack that fits their model inside a federation (tests/e2e/test_examples.py). The
attacks that do not fit used to be configured there and refused at run time; the static check
now stops such a config before Ray starts, with the failed assumption in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import ConfigError

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CPU = ['federation.device="cpu"']


@pytest.mark.parametrize(
    "example,attack,needle",
    [
        (
            "all_attacks_cnn6_cifar.toml",
            "analytic",
            "first trainable layer to be nn.Linear with bias",
        ),
        ("all_attacks_cnn6_cifar.toml", "llg", "non-negative features"),
        ("all_attacks_linear_fedavg.toml", "rgap", "single sample"),
    ],
)
def test_attacks_the_examples_leave_out_stop_before_launch(
    example, attack, needle, monkeypatch, request, example_data_root
):
    from fl_privsim.app import simulation

    if "cifar" in example:
        request.getfixturevalue("shared_data")  # its data; skips with the reason where absent

    monkeypatch.setattr(simulation, "launch", lambda *a, **k: pytest.fail("the federation started"))
    extra = example_data_root(EXPERIMENTS / example)  # honours $FL_PRIVSIM_SHARED_DATA
    cfg = config_mod.load(EXPERIMENTS / example, [*CPU, *extra, f'attacks=[{{name="{attack}"}}]'])
    with pytest.raises(ConfigError, match=needle):
        simulation.run(cfg, out=None, show_progress=False)
