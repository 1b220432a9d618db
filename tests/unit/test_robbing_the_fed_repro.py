"""The ``robbing_the_fed`` reproduction: the expected-share formula, and the quick run on the real
CIFAR-10 subset (skipped where ../shared/data/cifar10 is absent)."""

from __future__ import annotations

import json

import pytest
import torch

from adversaries.malicious.imprint import expected_alone_share

torch.set_num_threads(1)


def test_expected_alone_share_known_values():
    assert expected_alone_share(1, 256) == pytest.approx(1.0)
    assert expected_alone_share(64, 256) == pytest.approx((255 / 256) ** 63)
    assert expected_alone_share(64, 256) == pytest.approx(0.781, abs=1e-3)  # methods.md §7: 78 %


@pytest.mark.shared_data
def test_quick_reproduction(shared_data, tmp_path):
    if not (shared_data / "cifar10" / "cifar10_exact_subset.npz").is_file():
        pytest.skip(f"{shared_data / 'cifar10'} has no cifar10_exact_subset.npz")
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("robbing_the_fed", quick=True, out=tmp_path / "run")
    cells = {c["group"]: c for c in result.summary["cells"]}
    assert set(cells) == {
        "imprint vs batch",
        "imprint vs bins",
        "imprint fedavg",
        "imprint aggregate",
        "trap weights",
    }
    for group in ("imprint vs batch", "imprint fedavg", "imprint aggregate"):
        c = cells[group]
        # exact recovery of the records alone in their bin: asr tracks the expected share
        assert abs(c["asr"] - c["expected_alone"]) <= 0.1, (group, c)
    assert cells["imprint aggregate"]["records"] == 80 and cells["imprint aggregate"]["asr"] >= 0.5
    assert cells["trap weights"]["asr"] >= 0.3
    assert (path / "imprint_asr.png").is_file() and "expected alone" in (
        path / "table.md"
    ).read_text()
    rows = [json.loads(line) for line in (path / "cells.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["seed"] == 0 for r in rows)
