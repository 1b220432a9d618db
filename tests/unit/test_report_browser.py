"""The reports of hand-built folders in a real headless Chromium (tests/browser.py): no console
error, every image decoded, the attack table showing summary.json's numbers as the CLI prints
them; and the harness itself notices a broken image and a console error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from report_helpers import make_run_folder, make_sweep_folder

from fl_privsim.app.report import build_report
from tests.browser import Browser, assert_report_matches_summary, chromium_path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if chromium_path() is None:
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    with Browser() as b:
        yield b


def test_run_report_in_chromium(tmp_path: Path, browser: Browser) -> None:
    run = make_run_folder(tmp_path / "run")
    page = browser.check(build_report(run))
    assert_report_matches_summary(run, page)
    assert len(page.images) == 3  # two reconstruction grids and the accuracy plot
    assert page.table("round", "central test accuracy")[1:] == [
        ["0", "0.1562", "-"],
        ["1", "0.5000", "0.4800"],
        ["2", "0.6992", "0.6900"],
    ]
    assert "client DP: ε = 1.456 at δ = 1e-05" in page.text


def test_interrupted_run_report_in_chromium(tmp_path: Path, browser: Browser) -> None:
    page = browser.check(build_report(make_run_folder(tmp_path / "run", finished=False)))
    assert not page.console_errors
    assert page.images and all(i["loaded"] for i in page.images)
    assert "no summary.json: the run did not finish" in page.text


def test_sweep_report_in_chromium(tmp_path: Path, browser: Browser) -> None:
    sweep = make_sweep_folder(tmp_path / "sweep")
    page = browser.check(build_report(sweep))
    assert not page.console_errors, page.console_errors
    assert len(page.images) == 1 and page.images[0]["loaded"]
    assert page.title == "hand_sweep: fl-privsim sweep report"
    summary = page.table("cell", "client.batch_size")
    assert summary[1][-2:] == ["98.77 [97.10, 99.25]", "1.000 [0.999, 1.000]"]
    cells = page.table("id", "seed")
    assert [row[-1] for row in cells[1:]] == ["report", "report", "report", "no report"]
    cell = browser.check(sweep / "cells" / "c000_s0" / "report.html")  # the linked page
    assert_report_matches_summary(sweep / "cells" / "c000_s0", cell)


def test_harness_sees_a_broken_image_and_a_console_error(tmp_path: Path, browser: Browser) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body>"
        '<img src="missing.png" alt="gone"><img src="data:image/png;base64,AAAA" alt="junk">'
        "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>"
        '<script>console.error("boom", 42); throw new Error("uncaught");</script>'
        "</body></html>",
        encoding="utf-8",
    )
    check = browser.check(page)
    assert check.title == "broken"
    assert [i["loaded"] for i in check.images] == [False, False]
    errors = "\n".join(check.console_errors)
    assert "console.error: boom 42" in errors
    assert "Error: uncaught" in errors
    assert "ERR_FILE_NOT_FOUND" in errors and "missing.png" in errors
    assert check.tables == [[["a", "b"], ["1", "2"]]]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('<img src="data:image/png;base64,', '<img src="nowhere.png" data-was="'),  # broken image
        (">98.77<", ">98.78<"),  # a number that is not the summary's
    ],
    ids=["broken image", "wrong number"],
)
def test_report_check_fails_on_a_tampered_report(
    tmp_path: Path, browser: Browser, old: str, new: str
) -> None:
    run = make_run_folder(tmp_path / "run")
    report = build_report(run)
    html = report.read_text(encoding="utf-8")
    assert old in html
    report.write_text(html.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(AssertionError):
        assert_report_matches_summary(run, browser.check(report))
