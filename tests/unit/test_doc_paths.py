"""Every file path that ``--help``, the README and the docs name exists.

The docs are ``README.md``, ``experiments/README.md`` and every page under ``docs/`` (the
mkdocs site). A path counts when it starts with one of the repository's top-level folders
(``experiments/``, ``docs/``, ``fl_privsim/``, ...) or is a bare example config name
(``default.toml``), which is looked up in ``experiments/`` and ``experiments/reproduce/``.
Placeholders (``NAME``, ``XXX``, ``...``) and the files a run folder holds (``summary.json``)
are not repository paths and are skipped.

Markdown links and images (``[text](target)``) are checked too, relative to the page that
holds them: ``mkdocs build --strict`` checks the site's own links, but not the README's or
``experiments/README.md``'s, and not without the docs extra installed. Finally every page of
the site is reachable: listed in ``mkdocs.yml``'s nav, or a generated API page linked from
the API index.
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
#: A markdown link or image target, outside code: ``[text](target)`` / ``![alt](target)``.
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^( *)(```|~~~).*?^\1\2", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


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
            and raw not in ("config.toml", "settings.toml", "pyproject.toml", "sweep.toml")
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


def _links(text: str) -> set[str]:
    """Relative link targets of a markdown text (no URLs, no in-page anchors), code removed."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    found = set()
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # https:, mailto:, ... or an anchor on the same page
        found.add(target.split("#", 1)[0])
    return found


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_a_doc_makes_resolves(doc: Path) -> None:
    missing = sorted(
        t for t in _links(doc.read_text(encoding="utf-8")) if not (doc.parent / t).exists()
    )
    assert not missing, f"{doc.relative_to(REPO)} links to files that do not exist: {missing}"


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    if isinstance(node, list):
        return [p for v in node for p in _nav_pages(v)]
    return []


def test_every_site_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    yaml = pytest.importorskip("yaml")

    class _Loader(yaml.SafeLoader):  # mkdocs.yml may hold !!python/name tags; keep them inert
        pass

    _Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    config = yaml.load((REPO / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)
    docs = REPO / config.get("docs_dir", "docs")
    nav = _nav_pages(config["nav"])
    assert not [p for p in nav if not (docs / p).is_file()], "mkdocs.yml's nav names missing pages"
    api = docs / "reference" / "api"
    api_index = (api / "index.md").read_text(encoding="utf-8")
    unlisted = []
    for page in sorted(docs.rglob("*.md")):
        rel = page.relative_to(docs).as_posix()
        if rel in nav or page.parent == api and f"]({page.name})" in api_index:
            continue
        if rel.startswith("snippets/"):  # included into pages, excluded from the site (mkdocs.yml)
            continue
        unlisted.append(rel)
    assert not unlisted, f"pages neither in mkdocs.yml's nav nor in the API index: {unlisted}"


def test_the_link_checker_catches_a_missing_file() -> None:
    text = "see [a](docs/index.md) and [b](docs/nope.md#x), not `[c](docs/gone.md)` nor [d](#top)"
    assert _links(text) == {"docs/index.md", "docs/nope.md"}
    assert [t for t in sorted(_links(text)) if not (REPO / t).exists()] == ["docs/nope.md"]
