"""The CLI: help texts, and bad input gives one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_helpers import run_cli as _cli


def _subprocess_cli(*args, cwd=None):
    """The real entry point in a fresh interpreter (kept for the help text)."""
    return subprocess.run(
        [sys.executable, "-m", "fl_privsim.app.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_help_lists_commands_and_keys():
    top = _subprocess_cli("--help")
    assert top.returncode == 0 and "run" in top.stdout
    sub = _cli("run", "--help")
    assert sub.returncode == 0
    for key in (
        "--set",
        "--out",
        "federation.protocol",
        "client.batch_size",
        "attacks[i].targets.rounds",
    ):
        assert key in sub.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "--set", "federation.roundz=2"], ["roundz"]),
        (["run", "--set", "federation.rounds=-1"], ["federation.rounds", "minimum"]),
        (["run", "missing.toml"], ["missing.toml", "does not exist"]),
        (
            ["run", "--set", 'data.name="mnist_idx"', "--set", 'data.root="/nonexistent/mnist"'],
            ["/nonexistent/mnist"],
        ),
        (["run", "--set", "attacks.0.params.bogus=1"], ["bogus", "analytic"]),
        (["run", "--set", 'attacks.0.name="nope"'], ["nope", "inverting_gradients"]),
        (["run", "--set", "attacks.2.params.iterations=-5"], ["attacks[2]", "iterations"]),
        (["config", "--set", "client.batch_size=0"], ["client.batch_size"]),
        (["reproduce", "nope"], ["nope", "idlg_labels", "rgap_cnn6"]),
        (["reproduce", "demixing", "--set", "bogus=1"], ["bogus", "allowed"]),
        (["reproduce", "demixing", "--set", "seed=[1]"], ["demixing.seed", "integer"]),
        (
            ["reproduce", "rgap_cnn6", "--config", "missing.toml"],
            ["missing.toml", "does not exist"],
        ),
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
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_privsim.app.cli",
            "reproduce",
            "rgap_cnn6",
            "--quick",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2 and "nowhere" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the end-of-run table

HEADER = "attack                         attacked  PSNR dB   SSIM    AVD   ASR  leak label acc refused failed"


def _summary(**extra):
    """A run summary as ``run_server`` writes it (keys the table reads), plus ``extra``."""
    return {
        "rounds": 2,
        "final_accuracy": 0.5,
        "initial_accuracy": 0.1,
        "client_errors": {},
        "server": {"role": "honest_but_curious"},
        "attacks": {
            "analytic": {
                "psnr": 100.0,
                "ssim": 1.0,
                "avd": 0.0,
                "asr": 1.0,
                "leakage_rate": 1.0,
                "label_accuracy": 1.0,
                "attacked": 2.0,
                "refused": 0.0,
                "failed": 0.0,
            }
        },
        **extra,
    }


def _client_dp(defenses, eps=1.4563):
    """The client-DP keys of ``run_server``: δ and the reasons come from the configured
    defenses built on the server, formal only if no reason."""
    from clients.defenses import build_defenses
    from clients.defenses.accounting import AccountedDefense

    accounted = [d for d in build_defenses(defenses) if isinstance(d, AccountedDefense)]
    reasons = list(dict.fromkeys(r for d in accounted for r in d.not_formal_because))
    return {
        "epsilon": eps,
        "epsilon_formal": all(d.epsilon_formal for d in accounted),
        "epsilon_delta": accounted[0].delta,
        "epsilon_not_formal_because": reasons,
    }


def _central_dp(eps_steps=2, **settings):
    """``central_dp`` of the summary from a real :class:`CentralDP` (4 clients, 2 per round)."""
    from fl_privsim.core.config import CentralDPConfig
    from strategies.central_dp import CentralDP
    from strategies.fedupdates import FedUpdates

    inner = FedUpdates(
        protocol="fedsgd",
        server_lr=1.0,
        param_names=["w"],
        clients_per_round=2,
        seed=0,
        node_to_client={1000: 0, 1001: 1, 1002: 2, 1003: 3},
    )
    central = CentralDP(
        inner, settings=CentralDPConfig(mode="server_fixed", **settings), num_clients=4, seed=0
    )
    for _ in range(eps_steps):
        central.accountant.step(settings.get("noise_multiplier", 1.0))
    report = central.report()
    return {"central_epsilon": report["epsilon"], "central_dp": report}


def test_table_keeps_its_columns_without_dp():
    from fl_privsim.app.cli import format_table

    lines = format_table(_summary()).splitlines()
    assert lines[0] == HEADER
    assert lines[1].split() == [
        "analytic",
        "2",
        "100.00",
        "1.000",
        "0.000",
        "1.00",
        "1.00",
        "1.000",
        "0",
        "0",
    ]
    assert not any("DP" in line for line in lines)


def test_client_dp_epsilon_line_not_formal_with_fixed_size_batches():
    from fl_privsim.app.cli import format_table

    text = format_table(
        _summary(**_client_dp([{"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}]))
    )
    (line,) = [x for x in text.splitlines() if x.startswith("client DP:")]
    assert line.startswith("client DP: ε = 1.456 at δ = 1e-05 (")
    assert (
        "not formal: batches are fixed-size draws, not Poisson-sampled; set poisson = true in dp_sgd"
        in line
    )


def test_client_dp_epsilon_line_formal_with_poisson_batches():
    from fl_privsim.app.cli import format_table

    keys = _client_dp([{"name": "dp_sgd", "params": {"poisson": True, "delta": 1e-6}}], eps=0.8)
    assert keys["epsilon_formal"] is True and keys["epsilon_not_formal_because"] == []
    (line,) = [x for x in format_table(_summary(**keys)).splitlines() if x.startswith("client DP:")]
    assert (
        "ε = 0.800 at δ = 1e-06" in line
        and "(largest over clients; formal" in line
        and "not formal" not in line
    )


def test_client_dp_reasons_for_data_dependent_clipping_and_hand_set_rate():
    from fl_privsim.app.cli import format_table

    keys = _client_dp(
        [{"name": "dynamic_dp", "params": {"sigma": 1.0, "clipping": "l2max", "poisson": True}}]
    )
    (line,) = [x for x in format_table(_summary(**keys)).splitlines() if x.startswith("client DP:")]
    assert "not formal: the clipping bound is not fixed in advance" in line and "'l2max'" in line
    assert "Poisson" not in line  # Poisson batches: that reason does not apply
    keys = _client_dp([{"name": "dp_sgd", "params": {"poisson": True, "sample_rate": 0.01}}])
    assert (
        keys["epsilon_formal"] is False
        and "sample_rate = 0.01" in keys["epsilon_not_formal_because"][0]
    )


def test_accounted_defense_reports_delta_and_reasons_as_metrics():
    import torch

    from clients.defenses.dp_sgd import DPSGD
    from clients.local_update import local_update
    from fl_privsim.core.models import build_model

    model = build_model("linear", (1, 4, 4), 3)
    d = DPSGD(delta=1e-6)
    res = local_update(
        model,
        [(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))],
        protocol="fedsgd",
        lr=0.1,
        generator=torch.Generator(),
        defenses=[d],
    )
    assert res.metrics["defense0.dp_sgd.delta"] == 1e-6
    assert res.metrics["defense0.dp_sgd.epsilon_formal"] == 0.0 and len(d.not_formal_because) == 1


def test_central_dp_line_not_formal_with_amplification():
    from fl_privsim.app.cli import format_table

    keys = _central_dp(noise_multiplier=1.0, delta=1e-5)
    assert keys["central_dp"]["formal"] is False
    (line,) = [x for x in format_table(_summary(**keys)).splitlines() if x.startswith("central DP")]
    assert line.startswith(
        f"central DP (server_fixed): ε = {keys['central_epsilon']:.3f} at δ = 1e-05"
    )
    assert "not formal: the accountant assumes Poisson sampling of clients at q = 2/4" in line
    assert "amplification = false" in line


def test_central_dp_line_formal_without_amplification():
    from fl_privsim.app.cli import format_table

    keys = _central_dp(noise_multiplier=2.0, delta=1e-6, amplification=False)
    assert keys["central_dp"]["formal"] is True and keys["central_dp"]["not_formal_because"] == []
    (line,) = [x for x in format_table(_summary(**keys)).splitlines() if x.startswith("central DP")]
    assert (
        "at δ = 1e-06" in line
        and "(formal: 2 Gaussian releases" in line
        and "no amplification" in line
    )


def test_central_dp_without_noise_says_infinite():
    from fl_privsim.app.cli import format_table

    keys = _central_dp(noise_multiplier=0.0, amplification=False)
    assert keys["central_epsilon"] is None and keys["central_dp"]["epsilon_infinite"] is True
    (line,) = [x for x in format_table(_summary(**keys)).splitlines() if x.startswith("central DP")]
    assert "ε = ∞, no DP guarantee" in line and "no noise (noise_multiplier = 0)" in line


def test_unscored_attack_rows_give_the_reason():
    from fl_privsim.app.cli import format_table

    attacks = {
        "idlg": {
            "attacked": 0.0,
            "refused": 2.0,
            "failed": 0.0,
            "refused_reasons": [
                "batch of 4 records: iDLG recovers one label",
                "batch of 4 records: iDLG recovers one label",
                "FedAvg update: needs a single gradient",
            ],
        },
        "inverting_gradients": {
            "attacked": 0.0,
            "refused": 0.0,
            "failed": 1.0,
            "failed_reasons": [
                (
                    "CUDA out of memory while optimising 64 dummies of 3x224x224 "
                    "images; lower the batch or use the cpu"
                )
            ],
        },
        "dlg": {
            "attacked": 0.0,
            "refused": 1.0,
            "failed": 0.0,
        },  # a summary without the reasons lists
        "analytic": {
            "psnr": 30.0,
            "ssim": 0.9,
            "attacked": 1.0,
            "refused": 0.0,
            "failed": 1.0,
            "failed_reasons": ["singular system"],
        },
    }
    lines = format_table(_summary(attacks=attacks)).splitlines()
    assert lines[0] == HEADER

    def cell(name):  # the row's text between ``attacked`` and the counts, with its wrapped lines
        i = next(k for k, x in enumerate(lines) if x.startswith(name + " "))
        more = []
        for x in lines[i + 1 :]:
            if not x.startswith(" " * 40):
                break
            more.append(x.strip())
        return lines[i], " ".join([lines[i][40:84].strip(), *more])

    row, text = cell("idlg")
    assert text == "refused: batch of 4 records: iDLG recovers one label (+1 more in summary.json)"
    assert row.split()[-2:] == ["2", "0"] and " - " not in row  # counts in their columns, no dashes
    assert len(row) == len(HEADER) and row[HEADER.index("refused") :].split() == [
        "2",
        "0",
    ]  # under their headers
    row, text = cell("inverting_gradients")
    assert text.startswith("failed: CUDA out of memory") and text.endswith("use the cpu")
    assert row.split()[-2:] == ["0", "1"]
    assert "refused (1x, no reason recorded)" in next(x for x in lines if x.startswith("dlg"))
    k = next(k for k, x in enumerate(lines) if x.startswith("analytic"))
    assert "30.00" in lines[k] and lines[k + 1].strip() == "failed: singular system"
