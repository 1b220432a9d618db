"""Write the aggregation-size study's results table and figures for the docs from a finished
sweep folder (nothing is typed by hand):

    fl-privsim sweep experiments/aggregation_study.toml --out runs/aggregation_study
    python experiments/aggregation_study_tables.py runs/aggregation_study

writes ``docs/snippets/aggregation_study_table.md`` (included by
docs/results/aggregation_study.md) and copies the sweep's ``plots/{psnr,asr,auc}.png`` to
``docs/results/img/aggregation_study_*.png``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

from fl_privsim.app.sweep_results import read_csv_table
from fl_privsim.core.results import markdown_table

DOCS = Path(__file__).resolve().parents[1] / "docs"
METRICS = {"psnr": ".1f", "asr": ".2f", "auc": ".2f"}
FIGURES = ("psnr", "asr", "auc")


def _scenario(row: pd.Series) -> str:
    role = "malicious" if row["server.role"] == "malicious" else "honest"
    mode = row["federation.secure_aggregation.mode"]
    return (
        f"{row['attack'].removesuffix('@aggregate')} ({role}{', SecAgg+' if mode != 'off' else ''})"
    )


def _cell(rows: pd.DataFrame, metric: str) -> str:
    hit = rows[rows["metric"] == metric]
    if hit.empty:
        return "-"
    r = hit.iloc[0]
    spec = METRICS[metric]
    return f"{r['mean']:{spec}} [{r['ci_low']:{spec}}, {r['ci_high']:{spec}}]"


def table(summary: pd.DataFrame) -> str:
    """One row per scenario x aggregate size: mean [95 % CI] of PSNR, ASR and AUC over seeds."""
    summary = summary.assign(scenario=summary.apply(_scenario, axis=1))
    rows = []
    keys = ["scenario", "client.batch_size", "federation.clients_per_round", "aggregate_size"]
    for (scenario, batch, clients, size), group in summary.groupby(keys, sort=True):
        rows.append(
            [scenario, int(batch), int(clients), round(size), int(group["n"].max())]
            + [_cell(group, m) for m in METRICS]
        )
    rows.sort(key=lambda r: (r[0], r[3], r[1]))
    header = ["attack (server)", "batch", "clients", "records per update", "seeds"]
    return markdown_table(header + ["PSNR dB", "ASR", "AUC"], rows)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    sweep = Path(argv[0])
    summary = read_csv_table(sweep / "summary.csv")
    text = table(summary)
    (DOCS / "snippets" / "aggregation_study_table.md").write_text(text + "\n", encoding="utf-8")
    for metric in FIGURES:
        src = sweep / "plots" / f"{metric}.png"
        if src.is_file():
            shutil.copyfile(src, DOCS / "results" / "img" / f"aggregation_study_{metric}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
