"""Image grids explain themselves: title, true labels, per-tile PSNR, labelled refusals, wrapping.
Checked on the rendered figure's text objects."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch

from fl_privsim.core import plots
from fl_privsim.core.plots import GridRow, image_grid


@pytest.fixture
def figures(monkeypatch):
    """The figures image_grid draws (kept open for inspection instead of closed)."""
    kept: list = []
    close = plt.close
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def _texts(fig) -> list[str]:
    out = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
    return [t for t in out if t]


def test_grid_has_title_labels_psnr_and_a_labelled_refusal(tmp_path, figures):
    o = torch.rand(5, 1, 8, 8)
    image_grid(
        tmp_path / "g.png",
        o,
        [
            GridRow("analytic", o, [f"{10 * i:.1f} dB" for i in range(5)]),
            GridRow("idlg", None, note="refused: idlg: requires batch size 1"),
        ],
        title="round 1, client 0 (fedsgd)",
        captions=[f"label {i}" for i in range(5)],
    )
    (fig,) = figures
    texts = _texts(fig)
    assert "round 1, client 0 (fedsgd)" in texts
    assert all(f"label {i}" in texts for i in range(5)) and all(
        f"{10 * i:.1f} dB" in texts for i in range(5)
    )
    assert (
        "refused: idlg: requires batch size 1" in texts and "idlg" in texts and "analytic" in texts
    )
    assert (tmp_path / "g.png").stat().st_size > 0


def test_large_batches_wrap_at_16_tiles_and_say_what_is_shown(tmp_path, figures):
    o = torch.rand(40, 3, 4, 4)
    layout = image_grid(
        tmp_path / "g.png", o, [GridRow("imprint", o, ["ok"] * 40)], title="round 1"
    )
    (fig,) = figures
    assert layout.columns == 16 and layout.shown == 32
    cols = {round(ax.get_position().x0, 3) for ax in fig.axes}
    assert len(cols) <= 16
    assert any("first 32 of 40 records" in t for t in _texts(fig))


def test_reconstruction_captions_carry_psnr_and_the_predicted_label() -> None:
    """The scorer matches each reconstruction to its original and keeps the label the attack
    predicted for it; the caption under a tile says both, "no match" where there is none."""
    from adversaries.base import AttackResult
    from fl_privsim.core import config as config_mod
    from fl_privsim.engine.federated_data import federated_data
    from fl_privsim.engine.scoring import Scorer
    from strategies.attack_runner import _psnr_captions

    cfg = config_mod.load(None, ["client.batch_size=4"])
    fed = federated_data(cfg)
    scorer = Scorer(cfg, fed)
    images, labels = scorer.ground_truth(1, [0])
    inputs = (images - torch.tensor(fed.data.mean).view(1, -1, 1, 1)) / torch.tensor(
        fed.data.std
    ).view(1, -1, 1, 1)
    wrong = (labels + 1) % fed.data.num_classes
    # three exact reconstructions in reverse order, each with a label; the first original gets none
    result = AttackResult(
        inputs=inputs[1:].flip(0),
        labels=torch.stack([wrong[3], labels[2], labels[1]]),
        labels_per_input=True,
    )
    captions = _psnr_captions(scorer.score(result, 1, [0]))
    assert captions == [
        "no match",
        f"100.0 dB, pred {int(labels[1])}",
        f"100.0 dB, pred {int(labels[2])}",
        f"100.0 dB, pred {int(wrong[3])}",
    ]
    # labels recovered apart from the inputs (a multiset) are not pinned to tiles
    loose = AttackResult(inputs=inputs, labels=labels.flip(0), labels_per_input=False)
    assert _psnr_captions(scorer.score(loose, 1, [0])) == ["100.0 dB"] * 4
    # an attack without labels: PSNR only
    assert (
        _psnr_captions(scorer.score(AttackResult(inputs=inputs, labels=None), 1, [0]))
        == ["100.0 dB"] * 4
    )
