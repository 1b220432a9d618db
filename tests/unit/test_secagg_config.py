"""Bad SecAgg+ input: one line on stderr, exit 2, before Ray starts (fl_privsim.engine.secure_aggregation)."""

from __future__ import annotations

import pytest

from fl_privsim.app.cli import main
from fl_privsim.core import config as config_mod
from fl_privsim.engine.secure_aggregation import quantization_error_bound, resolve

SA = [
    'federation.secure_aggregation.mode="secagg+"',
    'attacks=[{name="analytic", targets={clients=[], aggregate=true}}]',
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [
                'federation.secure_aggregation.mode="secagg+"'
            ],  # the default attacks target clients 0 and 1
            (
                "attacks[0].targets.clients: the server sees only the aggregate; set targets = { clients = [], "
                "aggregate = true }"
            ),
        ),
        (
            [*SA, 'analyses=[{name="i2f", targets={clients=[0]}}]'],
            ("analyses[0].targets.clients: the server sees only the aggregate"),
        ),
        (
            [*SA, "federation.secure_aggregation.num_shares=1"],
            "num_shares: 1 must be greater than 2",
        ),
        (
            [*SA, "federation.clients_per_round=2"],
            "needs at least 3 sampled clients (num_shares > 2)",
        ),
        (
            [*SA, "federation.clients_per_round=1"],
            "federation.clients_per_round: 1 with secure aggregation",
        ),
        (
            [*SA, "federation.secure_aggregation.num_shares=4"],
            ("num_shares: 4 is even and not the number of sampled clients (10)"),
        ),
        ([*SA, "federation.secure_aggregation.num_shares=11"], "num_shares: 11 exceeds"),
        (
            [
                *SA,
                "federation.secure_aggregation.num_shares=5",
                "federation.secure_aggregation.reconstruction_threshold=5",
            ],
            "reconstruction_threshold: 5 must be below num_shares (5)",
        ),
        (
            [*SA, "federation.secure_aggregation.quantization_range=1073741824"],
            "the masked sum wraps",
        ),
        ([*SA, "federation.secure_aggregation.max_weight=0.001"], "max_weight: 0.001 is too small"),
        (
            [
                *SA,
                'server.role="malicious"',
                'server.modifications=[{name="imprint", targets={rounds=[1], clients=[0]}}]',
            ],
            (
                "server.modifications[0].targets.clients: 'imprint' changes the architecture and secure aggregation "
                "sums vectors of one shape"
            ),
        ),
        (
            [
                *SA,
                'server.role="malicious"',
                'server.modifications=[{name="isolation", targets={rounds=[1]}}]',
            ],
            "server.modifications[0].targets.clients: 'isolation' needs the client(s) it singles out",
        ),
        (
            [*SA, 'federation.central_dp.mode="server_fixed"'],
            "'server_fixed' is not supported with secure aggregation yet",
        ),
        (['federation.secure_aggregation.mode="secagg"'], "did you mean"),
    ],
)
def test_bad_secagg_config_is_one_line_and_exit_2(overrides, expected, capsys, tmp_path):
    args = ["run", "--out", str(tmp_path / "run"), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_defaults_resolve_from_the_federation():
    cfg = config_mod.load(
        None, [*SA, 'federation.protocol="fedavg"', "client.batch_size=2", "client.local_steps=3"]
    )
    s = resolve(cfg)
    assert (s.num_shares, s.reconstruction_threshold, s.max_weight) == (10, 7, 6.0)
    assert s.quantization_step == pytest.approx(16 / 2**22)
    # k clients of W examples each: the bound is one quantisation step
    assert quantization_error_bound(s, 10, 60) == pytest.approx(s.quantization_step)
    fedsgd = resolve(config_mod.load(None, [*SA, "client.batch_size=4", "client.local_steps=3"]))
    assert fedsgd.max_weight == 4.0  # FedSGD sends one batch
    three = resolve(
        config_mod.load(None, [*SA, "federation.clients_per_round=3", "federation.num_clients=3"])
    )
    assert (three.num_shares, three.reconstruction_threshold) == (3, 2)
