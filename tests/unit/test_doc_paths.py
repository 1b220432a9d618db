"""Every file path that ``--help``, the README and the docs name exists.

A path counts when it starts with one of the repository's top-level folders
(``experiments/``, ``docs/``, ``fl_privsim/``, ...) or is a bare example config name
(``default.toml``), which is looked up in ``experiments/`` and ``experiments/reproduce/``.
Placeholders (``NAME``, ``XXX``, ``...``) and the files a run folder holds (``summary.json``)
are not repository paths and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fl_privsim.app.cli import _parser

REPO = Path(__file__).resolve().parents[2]
TOP = ("experiments", "docs", "fl_privsim", "clients", "adversaries", "strategies", "tests", ".ci")
PATH = re.compile(
    r"(?<![\w./-])((?:\.\./)*[\w.-]+(?:/[\w.-]+)*\.(?:toml|py|md|png|json|csv|yml|yaml))\b"
)
PLACEHOLDER = re.compile(r"NAME|XXX|YYY|CONFIG|\.\.\.")


def _docs() -> list[Path]:
    return [
        REPO / "README.md",
        REPO / "experiments" / "README.md",
        *sorted((REPO / "docs").rglob("*.md")),
    ]


def _help_texts() -> str:
    parser = _parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    texts += [p.format_help() for p in sub.choices.values()]  # type: ignore[attr-defined]
    return "\n".join(texts)


def _candidates(text: str) -> set[str]:
    """Repository paths mentioned in ``text``."""
    found = set()
    for raw in PATH.findall(text):
        if PLACEHOLDER.search(raw):
            continue
        stripped = raw
        while stripped.startswith("../"):
            stripped = stripped[3:]
        first = stripped.split("/", 1)[0]
        if (
            "/" in stripped
            and first in TOP
            or "/" not in raw
            and raw.endswith(".toml")
            and raw not in ("config.toml", "settings.toml", "pyproject.toml")
        ):
            found.add(raw)
    return found


def _exists(path: str, doc_dir: Path) -> bool:
    if "/" not in path:  # a bare example name
        return any((REPO / d / path).is_file() for d in ("experiments", "experiments/reproduce"))
    rel = path
    while rel.startswith("../"):
        rel = rel[3:]
    return any((base / p).exists() for base in (REPO, doc_dir) for p in (path, rel))


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    missing = sorted(
        p for p in _candidates(doc.read_text(encoding="utf-8")) if not _exists(p, doc.parent)
    )
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"


def test_every_path_the_help_names_exists() -> None:
    text = _help_texts()
    names = _candidates(text)
    assert names, "the help names no example file at all; the path pattern is broken"
    missing = sorted(p for p in names if not _exists(p, REPO))
    assert not missing, f"--help names paths that do not exist: {missing}"


def test_the_checker_catches_a_missing_path() -> None:
    text = "run fl-privsim run experiments/cifar10_npz_convnet.toml or experiments/default.toml"
    names = _candidates(text)
    assert names == {"experiments/cifar10_npz_convnet.toml", "experiments/default.toml"}
    assert [p for p in names if not _exists(p, REPO)] == ["experiments/cifar10_npz_convnet.toml"]
