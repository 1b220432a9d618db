"""The HTML reports (report.html) of hand-built run and sweep folders, read as HTML (no
browser, no Ray): the CLI's numbers, inlined images, no external resource, missing parts."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from cli_helpers import run_cli
from report_helpers import SUMMARY, make_run_folder, make_sweep_folder

from fl_privsim.app.report import build_report, write_run_report, write_sweep_report
from fl_privsim.core.errors import UserError
from tests.browser import expected_attack_rows

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.IGNORECASE)


class _Tables(HTMLParser):
    """Every table's rows of cell texts, by the table's id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._rows: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("id") or f"#{len(self.tables)}", [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._rows:
            self._rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _tables(html: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def _assert_self_contained(html: str) -> None:
    assert not EXTERNAL.findall(html), EXTERNAL.findall(html)
    assert "<script" not in html.lower()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_run_report_shows_the_cli_numbers_and_inlines_the_grids(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run")
    out = write_run_report(run)
    assert out == run / "report.html"
    html = out.read_text(encoding="utf-8")
    _assert_self_contained(html)
    tables = _tables(html)
    attack = tables["attack-table"]
    assert attack[0] == [
        "attack",
        "attacked",
        "PSNR dB",
        "SSIM",
        "AVD",
        "ASR",
        "leak",
        "label acc",
        "refused",
        "failed",
        "reasons",
    ]
    rows = {r[0]: r for r in attack[1:]}
    assert rows == expected_attack_rows(SUMMARY)
    assert rows["analytic"][:10] == [
        "analytic",
        "2",
        "98.77",
        "1.000",
        "0.012",
        "1.00",
        "0.50",
        "0.875",
        "0",
        "1",
    ]
    assert rows["idlg"][-1].startswith("refused: batch of 4 records")
    assert tables["inference-table"][1] == [
        "membership",
        "0.833",
        "[0.500, 1.000]",
        "0.667",
        "0.333",
        "6",
        "3",
    ]
    assert tables["crafted-table"][1] == ["1", "imprint", "0, 1"]
    assert tables["client-errors"][1] == [
        "refused to train",
        "1",
        "round 2: 1",
        "no secure aggregation",
    ]
    assert tables["defenses-table"][1] == ["0", "dp_sgd", "noise_multiplier = 1, max_grad_norm = 1"]
    assert tables["accuracy-table"][1:] == [
        ["0", "0.1562", "-"],
        ["1", "0.5000", "0.4800"],
        ["2", "0.6992", "0.6900"],
    ]
    assert "client DP: ε = 1.456 at δ = 1e-05 (largest over clients; not formal" in html
    assert "model test accuracy after round 2: 0.6992 (round 0: 0.1562)" in html
    for client in (0, 1):
        assert f"round 1, client {client} — originals (top) above reconstructions" in html
    assert html.count('<img src="data:image/png') == 3  # two grids and the accuracy plot
    assert "<title>hand_built: fl-privsim run report</title>" in html
    assert "name = &#34;hand_built&#34;" in html  # the config, escaped, in a <pre>
    assert "no summary.json" not in html


def test_interrupted_run_renders_what_exists_with_a_note(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run", finished=False)
    html = build_report(run).read_text(encoding="utf-8")
    _assert_self_contained(html)
    assert "no summary.json: the run did not finish" in html
    tables = _tables(html)
    assert "attack-table" not in tables
    assert tables["accuracy-table"][-1] == ["2", "0.6992", "0.6900"]  # from metrics.jsonl
    assert tables["logged-attacks"][1][:4] == ["analytic", "1", "0", "97.50"]
    assert html.count("originals (top) above reconstructions</figcaption>") == 2


def test_report_escapes_and_flags_an_unreadable_summary(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["name"] = "<b>bold</b>"
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_run_report(run).read_text(encoding="utf-8")
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    (run / "summary.json").write_text("{not json")
    html = write_run_report(run).read_text(encoding="utf-8")
    assert "summary.json could not be read" in html


def test_sweep_report_links_cells_and_pivots_the_summary(tmp_path: Path) -> None:
    sweep = make_sweep_folder(tmp_path / "sweep")
    out = build_report(sweep)  # also (re)builds every finished cell's report
    assert out == sweep / "report.html"
    finished = {"c000_s0", "c000_s1", "c001_s0"}
    assert {p.parent.name for p in sweep.glob("cells/*/report.html")} == finished
    html = out.read_text(encoding="utf-8")
    _assert_self_contained(html)
    tables = _tables(html)
    assert tables["grid-table"][1:] == [
        ["client.batch_size", "1, 4", "-"],
        ["federation.clients_per_round", "1, 2", "-"],
    ]
    summary = tables["summary-table"]
    assert summary[0] == [
        "cell",
        "client.batch_size",
        "federation.clients_per_round",
        "aggregate_size",
        "attack",
        "psnr",
        "ssim",
    ]
    assert summary[1] == [
        "0",
        "1",
        "1",
        "1",
        "analytic",
        "98.77 [97.10, 99.25]",
        "1.000 [0.999, 1.000]",
    ]
    assert summary[2] == ["1", "4", "2", "8", "analytic", "31.50", "0.500"]
    cells = {r[0]: r for r in tables["cells-table"][1:]}
    assert cells["c001_s1"][-4:] == ["failed", "RuntimeError: out of memory", "13.2", "no report"]
    for cid in finished:
        assert f'<a href="cells/{cid}/report.html">report</a>' in html
    assert len(tables["results-table"]) == 1 + 3
    assert "psnr (plots/psnr.png)" in html


def test_sweep_report_with_only_a_manifest(tmp_path: Path) -> None:
    sweep = make_sweep_folder(tmp_path / "sweep")
    for name in ("results.csv", "summary.csv"):
        (sweep / name).unlink()
    html = write_sweep_report(sweep).read_text(encoding="utf-8")
    assert "no results.csv or summary.csv yet" in html
    assert "summary-table" not in html and "cells-table" in html


def test_build_report_refuses_a_folder_that_is_neither(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"neither a run folder .* nor a sweep folder \(sweep.json\)"
    ):
        build_report(tmp_path)


def test_report_command(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run")
    ok = run_cli("report", str(run))
    assert ok.returncode == 0 and ok.stdout.strip() == str(run / "report.html"), ok
    missing = run_cli("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "no folder" in missing.stderr
    assert str(tmp_path / "nowhere") in missing.stderr
