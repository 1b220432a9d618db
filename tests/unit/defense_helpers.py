"""Helpers shared by the defense tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_plugin_dist_info(site: Path) -> Path:
    """Make ``experiments/plugin_example`` importable and discoverable without pip: a
    ``*.dist-info`` folder with its ``entry_points.txt`` on ``sys.path`` is exactly what an
    install writes for importlib.metadata; a second, broken entry point must only warn."""
    info = site / "fl_privsim_clip_example-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fl-privsim-clip-example\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[fl_privsim.defenses]\nclip_update = fl_privsim_clip_example:ClipUpdate\n"
        "broken = fl_privsim_no_such_module:Nothing\n"
    )
    return ROOT / "experiments" / "plugin_example" / "src"
