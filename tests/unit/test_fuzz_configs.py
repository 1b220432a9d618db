"""Fuzzing the config front door: random bad configs end with one line and exit 2.

Hypothesis mutates valid configs of ``run`` (the default job), ``game`` and ``measure`` (their
shipped examples): an unknown key, a value of the wrong type, an out-of-range number, a table
replaced by a scalar, broken TOML text, a data path that does not exist. Each goes through the
real CLI in-process (:func:`tests.unit.cli_helpers.run_cli`). A config that happens to be valid
stops where work would begin (``run``: before the run folder is made; ``game``/``measure``:
before they run) and is counted as valid, not as an error. Every other outcome must be exit 2
with exactly one ``error:`` line on stderr, no traceback, and no run folder. The last test
checks that at least 500 of the generated configs were bad ones.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_privsim.core import config as config_mod
from tests.unit.cli_helpers import run_cli

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
VALID = 99  # exit code of a config that got past validation (see _stop)
COUNTS = {"bad": 0, "valid": 0}
WRONG_VALUES: list[Any] = ["abc", -3, 0, 2.5, -1e9, 1e12, True, [1, "x"], {"k": 1}, ""]


def _bases() -> dict[str, dict[str, Any]]:
    return {
        "run": tomllib.loads(config_mod.to_toml(config_mod.load(None, []))),
        "game": tomllib.loads((EXPERIMENTS / "game_property_digits.toml").read_text()),
        "measure": tomllib.loads((EXPERIMENTS / "measure_i2f.toml").read_text()),
    }


BASES = _bases()


def _leaves(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, (*prefix, k))
        else:
            out.append((*prefix, k))
    return out


def _tables(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for k, v in doc.items():
        if isinstance(v, dict):
            out += _tables(v, (*prefix, k))
    return out


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


@st.composite
def bad_configs(draw: st.DrawFn) -> tuple[str, str]:
    """(command, TOML text) of one mutated config."""
    command = draw(st.sampled_from(sorted(BASES)))
    doc = copy.deepcopy(BASES[command])
    kinds = ["unknown_key", "wrong_type", "wrong_type", "table_to_scalar", "broken_toml"]
    if command == "run":
        kinds.append("missing_path")
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown_key":
        table = draw(st.sampled_from(_tables(doc)))
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
        target = doc
        for k in table:
            target = target[k]
        target[f"zz_{name}"] = draw(st.sampled_from(WRONG_VALUES))
    elif kind == "wrong_type":
        _set(doc, draw(st.sampled_from(_leaves(doc))), draw(st.sampled_from(WRONG_VALUES)))
    elif kind == "table_to_scalar":
        tables = [t for t in _tables(doc) if t]
        _set(doc, draw(st.sampled_from(tables)), draw(st.sampled_from([1, "x", [1]])))
    elif kind == "missing_path":
        doc.setdefault("data", {}).update(
            {"name": "cifar10_npz", "root": "/nonexistent/fl-privsim-fuzz"}
        )
    text = tomli_w.dumps(doc)
    if kind == "broken_toml":
        cut = draw(st.integers(min_value=1, max_value=max(1, len(text) - 1)))
        junk = draw(st.sampled_from(["= =", "[[", '"unterminated', "]]x", "key = \n"]))
        text = text[:cut] + junk + text[cut:]
    return command, text


@pytest.fixture(autouse=True)
def _stop_before_work(monkeypatch):
    """A valid config stops before any work or any file is written: exit code VALID."""
    from fl_privsim.app import game, measure, simulation

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise SystemExit(VALID)

    monkeypatch.setattr(simulation, "make_run_dir", stop)
    monkeypatch.setattr(game, "run_game", stop)
    monkeypatch.setattr(measure, "run_measure", stop)


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=bad_configs())
def test_bad_config_is_one_line_and_exit_2(case, tmp_path_factory):
    command, text = case
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    out = folder / "out"
    quiet = ("--quiet",) if command == "run" else ()
    result = run_cli(command, str(path), "--out", str(out), *quiet)
    if result.returncode == VALID:
        COUNTS["valid"] += 1
        return
    err = result.stderr.strip()
    assert result.returncode == 2, (command, text, result)
    assert (
        "Traceback" not in result.stderr and err.count("\n") == 0 and err.startswith("error: ")
    ), (text, err)
    assert not out.exists(), (text, err)
    COUNTS["bad"] += 1


def test_at_least_500_bad_configs_were_refused():
    if COUNTS["bad"] + COUNTS["valid"] == 0:
        pytest.skip("the fuzz test did not run in this session")
    assert COUNTS["bad"] >= 500, COUNTS
    print(f"fuzz: {COUNTS}")
