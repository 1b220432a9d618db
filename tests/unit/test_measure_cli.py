"""``fl-privsim measure``: each kind on digits writes a complete run folder; bad input gives one
line on stderr, exit code 2 and no traceback."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from cli_helpers import CliResult, run_cli

from fl_privsim.app.measure import load_config, run_measure
from fl_privsim.core.errors import ConfigError

torch.set_num_threads(1)

SMALL = {
    "i2f": ["i2f.samples=3"],
    "vinfo": ["vinfo.samples_per_class=6", "vinfo.mlp_epochs=20", 'vinfo.target="parity"'],
    "sensitivity": ["sensitivity.samples=2", "sensitivity.probes=4"],
    "subspace": ["subspace.samples_per_class=6", "subspace.k=2"],
}


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_each_kind_writes_run_folder(kind, tmp_path):
    cfg = load_config(None, [f'measure.kind="{kind}"', *SMALL[kind]])
    path, summary = run_measure(cfg, out=tmp_path / "run")
    for name in ("config.toml", "env.json", "summary.json", "table.csv", "table.md", "plot.png"):
        assert (path / name).is_file(), name
    saved = json.loads((path / "summary.json").read_text())
    assert saved["kind"] == kind and saved["data"] == "digits"
    rows = list(csv.DictReader((path / "table.csv").read_text().splitlines()))
    if kind == "i2f":
        assert len(rows) == 3 == summary["samples"]
        for r in rows:
            lam, jd, lb = float(r["lambda_max"]), float(r["jdelta_norm"]), float(r["lower_bound"])
            assert lam > 0 and lb == pytest.approx(jd / lam, rel=1e-9)
            # the regularised value is never below ||J delta|| / (lambda_max + eps)
            assert float(r["exact"]) >= float(r["lower_bound_eps"]) * (1 - 1e-4)
        assert summary["all_cg_converged"] is True
    else:
        assert [r["layer"] for r in rows] == ["body.0", "body.2", "body.4", "fc"]
    if kind == "vinfo":
        assert summary["h_y"] == pytest.approx(0.693, abs=0.05)  # balanced parity: log 2 nats
        assert all(float(r["v_information"]) <= float(r["h_y"]) + 1e-9 for r in rows)
    if kind == "sensitivity":
        assert all(float(r["sensitivity"]) > 0 for r in rows)
    if kind == "subspace":
        assert all(0.0 <= float(r["normalized_distance"]) <= 1.0 + 1e-6 for r in rows)
        assert summary["samples"] == 12


def test_i2f_monte_carlo_and_pruning(tmp_path):
    _, mc = run_measure(
        load_config(None, ["i2f.samples=2", "i2f.mc_samples=3", 'i2f.noise="laplace"']),
        out=tmp_path / "mc",
    )
    assert mc["mc_samples"] == 3 and mc["lower_bound_mean"] > 0
    rows = list(csv.DictReader((tmp_path / "mc" / "table.csv").read_text().splitlines()))
    assert all(float(r["lower_bound_stderr"]) >= 0 for r in rows)
    _, none = run_measure(
        load_config(None, ["i2f.samples=2", 'i2f.noise="pruning"', "i2f.scale=0.0"]),
        out=tmp_path / "p0",
    )
    assert none["lower_bound_max"] == 0.0  # pruning nothing perturbs nothing


def test_vinfo_about_the_input(tmp_path):
    """``vinfo.target = "input"``: Gaussian-decoder V-information about the digits' pixels."""
    cfg = load_config(
        None,
        [
            'measure.kind="vinfo"',
            'vinfo.target="input"',
            "vinfo.samples_per_class=8",
            "vinfo.mlp_epochs=20",
            "vinfo.input_components=4",
            "vinfo.max_features=16",
        ],
    )
    path, summary = run_measure(cfg, out=tmp_path / "run")
    assert summary["target"] == "input" and summary["input_components"] == 4
    assert 0.0 < summary["explained_variance"] <= 1.0 and summary["most_informative_layer"] in {
        "body.0",
        "body.2",
        "body.4",
        "fc",
    }
    rows = list(csv.DictReader((path / "table.csv").read_text().splitlines()))
    assert [r["layer"] for r in rows] == ["body.0", "body.2", "body.4", "fc"]
    for r in rows:  # one null model (shared split and projection), total = per-dimension x 4
        assert float(r["h_x"]) == pytest.approx(summary["h_x"])
        assert float(r["v_information"]) == pytest.approx(4 * float(r["v_information_per_dim"]))
        assert float(r["v_information"]) == pytest.approx(float(r["h_x"]) - float(r["h_x_given_g"]))
    assert (path / "plot.png").is_file()


def test_example_configs_load():
    assert load_config("experiments/measure_i2f.toml")["measure"]["kind"] == "i2f"
    assert load_config("experiments/measure_vinfo.toml")["vinfo"]["target"] == "parity"


@pytest.mark.parametrize(
    "overrides, words",
    [
        (['measure.kind="nope"'], ["measure.kind", "i2f, vinfo, sensitivity, subspace"]),
        (["i2f.bogus=1"], ["'bogus' in [i2f]", "samples"]),
        (["bogus.key=1"], ["'bogus'", "measure"]),
        (['i2f.noise="uniform"'], ["i2f.noise", "gaussian, laplace, pruning"]),
        (["i2f.samples=0"], ["i2f.samples", "minimum 1"]),
        (['i2f.samples="3"'], ["i2f.samples", "integer"]),
        (['i2f.noise="pruning"', "i2f.scale=2.0"], ["i2f.scale", "ratio"]),
        (['i2f.noise="pruning"', "i2f.mc_samples=4"], ["mc_samples", "deterministic"]),
        (['vinfo.target="age"'], ["vinfo.target", "label, parity, input"]),
        (['vinfo.input_variance="full"'], ["vinfo.input_variance", "per_dim, shared"]),
        (["vinfo.input_components=0"], ["vinfo.input_components", "minimum 1"]),
        (["subspace.classes=[3, 3]"], ["subspace.classes"]),
        (["samples=3"], ["SECTION.KEY"]),
    ],
)
def test_bad_config_names_what_is_allowed(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for w in words:
        assert w in str(err.value)


def _cli(*args: str) -> CliResult:
    return run_cli("measure", *args)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--set", 'measure.kind="nope"'], ["nope", "allowed"]),
        (["missing.toml"], ["missing.toml", "does not exist"]),
        (
            ["--set", 'data.name="mnist_idx"', "--set", 'data.root="/nonexistent/mnist"'],
            ["/nonexistent/mnist"],
        ),
        (["--set", "i2f.samples=100000"], ["i2f.samples", "split has"]),
        (["--set", 'model.name="vgg"'], ["vgg", "lenet"]),
    ],
)
def test_cli_bad_input_one_line_exit_2(args, words, tmp_path):
    res = _cli(*args, "--out", str(tmp_path / "run"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "run").exists()  # config and data errors come before the run folder


def test_cli_help_lists_keys():
    res = _cli("--help")
    assert res.returncode == 0
    for key in (
        "measure.kind",
        "i2f.mc_samples",
        "vinfo.target",
        "sensitivity.probes",
        "subspace.classes",
    ):
        assert key in res.stdout


def test_cli_prints_a_table_naming_the_eps_of_each_i2f_column(tmp_path):
    res = _cli("--set", "i2f.samples=2", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == f"run folder: {tmp_path / 'run'}"
    header = next(x for x in lines if x.startswith("index"))
    for col in ("λ_max(JJᵀ)", "‖Jδ‖", "I2F exact (ε=1)", "bound (ε=1)", "bound (ε=0)"):
        assert col in header
    rows = [x.split() for x in lines if x[:1].isdigit()]
    assert len(rows) == 2 and all(r[-1] == "ok" for r in rows)
    for r in rows:  # the same-ε bound never exceeds the exact value; the ε=0 bound here does
        exact, same, lb0 = float(r[4]), float(r[5]), float(r[6])
        assert same <= exact * (1 + 1e-3) and lb0 > exact
    assert any("bounds the unregularised I2F (ε = 0)" in x for x in lines)
    assert not res.stdout.lstrip().startswith("{")


def test_cli_json_prints_the_summary_only(tmp_path):
    res = _cli(
        "--set",
        'measure.kind="sensitivity"',
        "--set",
        "sensitivity.samples=2",
        "--set",
        "sensitivity.probes=4",
        "--json",
        "--out",
        str(tmp_path / "run"),
    )
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)  # nothing but JSON on stdout
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert printed == {**saved, "run_dir": str(tmp_path / "run")}
    assert printed["kind"] == "sensitivity" and printed["layers"] == 4


@pytest.mark.parametrize("kind", ["vinfo", "sensitivity", "subspace"])
def test_layer_tables_are_human(kind, tmp_path):
    from fl_privsim.app.measure import _read_rows, format_measure

    path, summary = run_measure(
        load_config(None, [f'measure.kind="{kind}"', *SMALL[kind]]), out=tmp_path / "run"
    )
    text = format_measure(summary, _read_rows(path / "table.csv"))
    lines = text.splitlines()
    assert lines[1].startswith("layer")
    assert [x.split()[0] for x in lines[2:6]] == ["body.0", "body.2", "body.4", "fc"]
    best = {
        "vinfo": "most informative layer",
        "sensitivity": "most sensitive layer",
        "subspace": "most separating layer",
    }[kind]
    assert lines[-1].startswith(f"{best}: ")
    if kind == "sensitivity":
        assert "±" in lines[2]  # stderr of the Hutchinson estimate
