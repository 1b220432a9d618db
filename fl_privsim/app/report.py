"""``report.html``: a self-contained HTML report of a run folder or a sweep folder.

A report is built from the folder's files only (``config.toml``, ``env.json``, ``summary.json``,
``metrics.jsonl``, ``attacks/round_XXX/client_YYY.png``; for a sweep ``sweep.json``, the CSV
tables and ``plots/``), never from a run's memory, so ``fl-privsim report DIR`` rebuilds the
same page later. Images are inlined as ``data:`` URIs and the CSS is in the page: it opens
offline, without JavaScript. The attack table shows the columns and numbers that
``fl-privsim run`` prints (:func:`fl_privsim.app.cli.format_table`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_privsim.app.report_html import (
    data_uri,
    fmt,
    image,
    plain,
    read_json,
    read_text,
    render,
    write_page,
)
from fl_privsim.app.report_sweep import write_sweep_report
from fl_privsim.app.summary_text import dp_lines, outcome_notes
from fl_privsim.core.errors import UserError

__all__ = ["add_parser", "build_report", "cmd_report", "write_run_report", "write_sweep_report"]

log = logging.getLogger(__name__)

#: The attack table's columns, as ``fl-privsim run`` prints them, and the reasons column.
ATTACK_HEADER = (
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
)
#: Summary key and format of each score column (the CLI's formats).
SCORES = (
    ("psnr", ".2f"),
    ("ssim", ".3f"),
    ("avd", ".3f"),
    ("asr", ".2f"),
    ("leakage_rate", ".2f"),
    ("label_accuracy", ".3f"),
)
INFERENCE_HEADER = ("attack", "AUC", "95 % CI", "accuracy", "advantage", "trials", "secret 1")


def _attack_table(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """One row per attack of the summary: the CLI's numbers and its reasons for a refusal or
    failure (an attack that scored nothing says why, or "no update attacked")."""
    rows = []
    for name, row in (summary.get("attacks") or {}).items():
        attacked = int(row.get("attacked", 0))
        notes = outcome_notes(row)
        if attacked == 0:
            scores = ["-"] * len(SCORES)
            why = "; ".join(notes) or ("-" if "auc" in row else "no update attacked")
        else:
            scores = [fmt(row.get(key), spec) for key, spec in SCORES]
            why = "; ".join(notes)
        counts = [str(int(row.get("refused", 0))), str(int(row.get("failed", 0)))]
        rows.append([name, str(attacked), *scores, *counts, why])
    if not rows:
        return None
    return {"header": ATTACK_HEADER, "rows": rows, "numeric": tuple(range(1, 10))}


def _inference_table(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """Inference attacks (rows with ``auc``): AUC, its CI, accuracy, advantage, trials."""
    rows = []
    for name, row in (summary.get("attacks") or {}).items():
        if "auc" not in row:
            continue
        lo, hi = (row.get("auc_ci") or [None, None])[:2]
        rows.append(
            [
                name,
                fmt(row["auc"], ".3f"),
                f"[{fmt(lo, '.3f')}, {fmt(hi, '.3f')}]",
                fmt(row.get("accuracy"), ".3f"),
                fmt(row.get("advantage"), ".3f"),
                str(row.get("trials", 0)),
                str(row.get("positives", 0)),
            ]
        )
    return {"header": INFERENCE_HEADER, "rows": rows, "numeric": (1, 3, 4, 5, 6)} if rows else None


def _malicious(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The malicious server's modifications and the rounds/clients it crafted models for."""
    server = summary.get("server") or {}
    if server.get("role") != "malicious":
        return None
    rows = [
        [str(r), mod, ", ".join(str(c) for c in clients)]
        for r, mods in (server.get("crafted") or {}).items()
        for mod, clients in mods.items()
    ]
    return {"modifications": list(server.get("modifications") or []), "rows": rows}


def _client_errors(summary: Mapping[str, Any]) -> list[list[str]]:
    """Clients that refused to train or failed: total, per round, their distinct reasons."""
    rows = []
    for kind, what in (("refused", "refused to train"), ("failed", "failed")):
        errs = (summary.get("client_errors") or {}).get(kind) or {}
        if errs.get("total"):
            rounds = ", ".join(f"round {r}: {n}" for r, n in (errs.get("by_round") or {}).items())
            rows.append([what, str(errs["total"]), rounds, "; ".join(errs.get("reasons") or [])])
    return rows


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl``; a line cut short by an interrupted run is skipped."""
    text = read_text(run_dir / "metrics.jsonl") or ""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _by_round(values: Mapping[str, Any] | None) -> dict[int, float]:
    return {int(r): float(v) for r, v in (values or {}).items() if v is not None}


def _accuracy(summary: Mapping[str, Any] | None, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy by round (central and federated) from the summary, else from metrics.jsonl;
    a table, the CLI's closing line, and a small plot."""
    if summary is not None:
        central = _by_round(summary.get("accuracy_by_round"))
        federated = _by_round(summary.get("federated_accuracy_by_round"))
    else:
        central, federated = {}, {}
        for m in metrics:
            if m.get("key") == "accuracy" and m.get("value") is not None:
                if m.get("source") == "server_eval":
                    central[int(m["round"])] = float(m["value"])
                elif m.get("source") == "federated_eval":
                    federated[int(m["round"])] = float(m["value"])
    if not central and not federated:
        return {}
    rows = [
        [str(r), fmt(central.get(r), ".4f"), fmt(federated.get(r), ".4f")]
        for r in sorted(set(central) | set(federated))
    ]
    line = None
    if summary is not None:
        line = (
            f"model test accuracy after round {summary.get('rounds')}: "
            f"{fmt(summary.get('final_accuracy'), '.4f')} "
            f"(round 0: {fmt(summary.get('initial_accuracy'), '.4f')})"
        )
    from fl_privsim.core.plots import accuracy_plot  # matplotlib: only when a page is drawn

    buf = io.BytesIO()
    accuracy_plot(buf, central, federated)
    plot = {"uri": data_uri(buf.getvalue()), "caption": "model test accuracy by round"}
    return {"rows": rows, "line": line, "plot": plot}


def _logged_attacks(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per attacked update, the scores an unfinished run logged (``attack/<name>`` rows)."""
    keys = (("psnr", ".2f"), ("ssim", ".3f"), ("label_accuracy", ".3f"))
    found: dict[tuple[str, int, str], dict[str, Any]] = {}
    for m in metrics:
        source = str(m.get("source", ""))
        if source.startswith("attack/"):
            at = (source.removeprefix("attack/"), int(m.get("round", 0)), str(m.get("client")))
            found.setdefault(at, {})[str(m.get("key"))] = m.get("value")
    rows = [
        [name, str(r), client, *(fmt(v.get(k), spec) for k, spec in keys)]
        for (name, r, client), v in found.items()
    ]
    if not rows:
        return None
    header = ("attack", "round", "client", "PSNR dB", "SSIM", "label acc")
    return {"header": header, "rows": rows, "numeric": (1, 3, 4, 5)}


def _attack_images(run_dir: Path) -> list[dict[str, str]]:
    """Every ``attacks/round_XXX/client_YYY.png``, inlined, in round then client order."""

    def key(path: Path) -> tuple[int, int, str]:
        rnd = re.sub(r"\D", "", path.parent.name) or "0"
        client = path.stem.removeprefix("client_")
        return int(rnd), int(client) if client.isdigit() else 1 << 30, client

    out = []
    for png in sorted((run_dir / "attacks").glob("round_*/client_*.png"), key=key):
        rnd, _, client = key(png)
        who = "the aggregate" if client == "agg" else f"client {client.lstrip('0') or '0'}"
        out.append(image(png, f"round {rnd}, {who} — originals (top) above reconstructions"))
    return out


def _defenses(config: Mapping[str, Any] | None) -> list[list[str]] | None:
    """The config's ``[[defenses]]`` with their parameters (``None`` without a config)."""
    if config is None:
        return None
    return [
        [
            str(i),
            str(d.get("name", "?")),
            ", ".join(f"{k} = {plain(v)}" for k, v in (d.get("params") or {}).items()) or "-",
        ]
        for i, d in enumerate(config.get("defenses") or [])
    ]


def write_run_report(run_dir: Path) -> Path:
    """Render ``run_dir/report.html`` from the run folder's files and return its path.

    Missing parts are left out; without ``summary.json`` (an interrupted run) the page says so
    and shows what the folder has (accuracy and attack scores from ``metrics.jsonl``, images,
    config)."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    summary = read_json(run_dir / "summary.json", notes)
    if not (run_dir / "summary.json").exists():
        notes.append("no summary.json: the run did not finish")
    elif (summary or {}).get("status") == "interrupted":
        notes.append(
            "summary.json says interrupted: the run was stopped; the numbers are those so far"
        )
    config_text = read_text(run_dir / "config.toml")
    config: dict[str, Any] | None = None
    if config_text is not None:
        try:
            config = tomllib.loads(config_text)
        except tomllib.TOMLDecodeError as exc:
            notes.append(f"config.toml could not be parsed: {exc}")
    env = read_json(run_dir / "env.json", notes)
    metrics = _read_metrics(run_dir)
    cfg = config or {}
    about = summary if isinstance(summary, dict) else {}
    name = about.get("name") or cfg.get("name") or run_dir.name
    facts = [
        f"seed {about.get('seed', cfg.get('seed', '?'))}",
        f"dataset {about.get('dataset') or (cfg.get('data') or {}).get('name', '?')}",
        f"model {about.get('model') or (cfg.get('model') or {}).get('name', '?')}",
        f"protocol {about.get('protocol') or (cfg.get('federation') or {}).get('protocol', '?')}",
        f"{about.get('rounds') or (cfg.get('federation') or {}).get('rounds', '?')} rounds",
    ]
    html = render(
        "run.html.j2",
        run_dir,
        "run",
        notes=notes,
        name=name,
        facts=facts,
        attacks=_attack_table(about),
        inference=_inference_table(about),
        dp_lines=dp_lines(about),
        malicious=_malicious(about),
        client_errors=_client_errors(about),
        logged_attacks=None if summary is not None else _logged_attacks(metrics),
        accuracy=_accuracy(summary if isinstance(summary, dict) else None, metrics),
        images=_attack_images(run_dir),
        defenses=_defenses(config),
        env=[[k, plain(v)] for k, v in env.items()] if isinstance(env, dict) else [],
        config_text=config_text,
        summary_text=json.dumps(summary, indent=2) if summary is not None else None,
    )
    return write_page(run_dir, html)


def build_report(folder: Path) -> Path:
    """(Re)build the report of ``folder``: a sweep folder (``sweep.json``) gets every finished
    cell's report, then its own page; a run folder (``config.toml`` or ``summary.json``) its
    page. Returns the page's path; anything else is a :class:`UserError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"report: no folder {str(folder)!r}")
    if (folder / "sweep.json").is_file():
        for summary in sorted((folder / "cells").glob("*/summary.json")):
            write_run_report(summary.parent)
        return write_sweep_report(folder)
    if (folder / "config.toml").is_file() or (folder / "summary.json").is_file():
        return write_run_report(folder)
    raise UserError(
        f"report: {str(folder)!r} is neither a run folder (config.toml or summary.json) "
        "nor a sweep folder (sweep.json)"
    )


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``report`` subcommand on the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "report",
        help="(re)build the HTML report of a run or sweep folder",
        description="Write DIR/report.html from the folder's files: a run folder's report, or a "
        "sweep folder's report and those of its finished cells. The page is self-contained "
        "and opens offline.",
    )
    p.add_argument("folder", metavar="DIR", help="a run folder or a sweep folder")
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """The ``report`` subcommand: build the report and print its path."""
    try:
        path = build_report(Path(args.folder))
    except OSError as exc:
        raise UserError(f"report: cannot write the report of {args.folder!r}: {exc}") from None
    print(path)
    return 0
