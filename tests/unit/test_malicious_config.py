"""Bad malicious-server input: one line on stderr, exit 2, before any federation starts."""

from __future__ import annotations

import pytest

from fl_privsim.app.cli import main

MAL = ['server.role="malicious"']


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (['server.modifications=[{name="imprint"}]'], 'needs server.role = "malicious"'),
        ([*MAL, 'server.modifications=[{name="imprint", params={bins=1}}]'], "bins must be >= 2"),
        (
            [*MAL, 'server.modifications=[{name="imprint", params={colour=1}}]'],
            "unknown parameter(s) colour",
        ),
        ([*MAL, 'server.modifications=[{name="robbery"}]'], "unknown modification 'robbery'"),
        (
            [*MAL, 'model.name="lenet"', 'server.modifications=[{name="trap_weights"}]'],
            "server.modifications[0] (trap_weights)",
        ),
        (
            [*MAL, 'model.name="cnn6"', 'server.modifications=[{name="fishing"}]'],
            "server.modifications[0] (fishing)",
        ),
        (['attacks=[{name="imprint"}]'], "needs the server modification 'imprint' in round(s) [1]"),
        (
            [
                *MAL,
                'server.modifications=[{name="imprint", targets={rounds=[2]}}]',
                'attacks=[{name="imprint"}]',
            ],
            "needs the server modification 'imprint' in round(s) [1]",
        ),
        (
            [
                *MAL,
                'server.modifications=[{name="imprint", targets={clients=[3]}}]',
                'attacks=[{name="imprint", targets={clients=[0]}}]',
            ],
            "client(s) [0] do not get the 'imprint' model",
        ),
    ],
)
def test_bad_malicious_config_is_one_line_and_exit_2(overrides, expected, capsys, tmp_path):
    args = ["run", "--out", str(tmp_path / "run"), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing written
