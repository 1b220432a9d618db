"""Malicious servers against Flower's real SecAgg+ on Ray (issue 14's acceptance runs).

Each case is a whole federation through :func:`fl_privsim.app.simulation.run` on the workflow path
(``DefaultWorkflow`` + ``SecAggPlusWorkflow``, ``secaggplus_mod`` clients): the attacks see
only the mean Flower unmasked. Isolation's own run is the example
``experiments/secagg_isolation.toml`` (``tests/e2e/test_examples.py`` checks it); here its
honest counterpart, imprint and LOKI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod

pytestmark = pytest.mark.e2e

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SECAGG = [
    'federation.secure_aggregation.mode="secagg+"',
    "federation.rounds=1",
    'federation.device="cpu"',
]


def _run(
    tmp_path: Path, example: str | None, overrides: list[str], rounds: list[int] | None = None
) -> dict:
    cfg = config_mod.load(EXPERIMENTS / example if example else None, SECAGG + overrides)
    _, summary = run(cfg, out=tmp_path / "run", show_progress=False)
    assert summary["secure_aggregation"]["mode"] == "secagg+"
    assert summary["secure_aggregation"]["rounds_aggregated"] == (rounds or [1])
    return summary


def test_honest_secagg_aggregate_of_10_clients_batch_4_hides_the_records(tmp_path):
    """The counterpart of isolation: the same analytic attack, honest server, 40 records."""
    summary = _run(
        tmp_path,
        "secagg_isolation.toml",
        ['server.role="honest_but_curious"', "server.modifications=[]", "client.batch_size=4"],
    )
    scores = summary["attacks"]["analytic@aggregate"]
    assert scores["asr"] < 0.2, scores  # 20 dB (the default threshold), recovered share


def test_imprint_512_bins_through_secagg_recovers_half_the_records_at_30_db(tmp_path):
    summary = _run(
        tmp_path,
        "malicious_imprint.toml",
        ['attacks=[{name="imprint", targets={rounds=[1], clients=[], aggregate=true}}]'],
    )
    assert summary["server"]["crafted"]["1"] == {"imprint": list(range(10))}
    scores = summary["attacks"]["imprint@aggregate"]
    assert scores["asr"] >= 0.5, scores  # the example's threshold: MSE 1e-3, 30 dB


def test_loki_through_secagg_keeps_every_client_s_records_separable(tmp_path, shared_data):
    summary = _run(
        tmp_path,
        None,
        [
            'data.name="mnist_idx"',
            f'data.root="{shared_data / "mnist"}"',
            'model.name="mlp"',
            'federation.protocol="fedsgd"',
            "federation.num_clients=10",
            "federation.clients_per_round=10",
            "federation.fraction_evaluate=0.0",
            "client.batch_size=8",
            'server.role="malicious"',
            'server.modifications=[{name="loki", targets={rounds=[1]}}]',
            'attacks=[{name="loki", targets={rounds=[1], clients=[], aggregate=true}}]',
            "scoring.asr_mse_threshold=0.001",
        ],
    )
    scores = summary["attacks"]["loki@aggregate"]
    assert scores["asr"] >= 0.5 and scores["leakage_rate"] == 1.0, scores


def test_decoys_that_inspect_their_model_drop_out_and_secagg_halts_the_round(tmp_path):
    """Real dropouts: under isolation the 9 decoy clients run ``model_inspection``, see the dead
    layer (``dead_rows``) and refuse; Flower's SecAgg+ drops them, 1 survivor is below the
    threshold (7 of 10), the round halts, the model is not updated and no attack runs."""
    summary = _run(
        tmp_path,
        "secagg_isolation.toml",
        ["federation.rounds=2", 'defenses=[{name="model_inspection"}]'],
        rounds=[2],
    )
    sa = summary["secure_aggregation"]
    assert sa["halted_rounds"] == [1] and sa["rounds_aggregated"] == [2], sa
    assert sa["dropouts_by_stage"]["1"]["collect_masked_vectors"] == [0, 1, 2, 4, 5, 6, 7, 8, 9], sa
    refused = summary["client_errors"]["refused"]
    assert refused["total"] == 9 and refused["by_round"] == {"1": 9}, refused
    assert any("dead_rows" in r for r in refused["reasons"]), refused
    assert summary["attacks"]["analytic@aggregate"]["attacked"] == 0.0
    assert summary["accuracy_by_round"]["1"] == summary["accuracy_by_round"]["0"]
