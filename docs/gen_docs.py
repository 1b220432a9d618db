"""Generate the parts of the documentation site that must not drift from the code.

    python docs/gen_docs.py                 # config reference + API pages + README snippet sync
    python docs/gen_docs.py --run-default   # also rerun the default job (~1 min) for its output

What it writes (all under ``docs/`` unless said otherwise):

* ``reference/config.md``: the config reference, one table per section, read from the config
  schemas: the dataclasses of the run config (``Config``) and of ``fl-privsim game``
  (``GameRunConfig``), whose fields carry help, choices, min and max in their metadata, and
  and of ``fl-privsim measure`` (``MeasureConfig``).
* ``reference/api/*.md``: one page per Python package of the project, made of mkdocstrings
  ``::: module`` directives, found by walking the package folders with :mod:`pkgutil` (so
  modules can move without editing the site), plus ``reference/api/index.md``.
* ``snippets/default_run.txt`` (only with ``--run-default``): what ``fl-privsim run`` prints
  for the default job, captured from a real run; the README's copy between the
  ``default-run`` markers is rewritten from it on every call.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import re
import subprocess
import sys
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: The top-level packages documented in the API reference.
PACKAGES = ("fl_privsim", "strategies", "clients", "adversaries")
SNIPPET = DOCS / "snippets" / "default_run.txt"
README_START = "<!-- default-run:start (written by docs/gen_docs.py) -->"
README_END = "<!-- default-run:end -->"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- module lookup


def _module_names(package: str) -> Iterator[tuple[str, bool]]:
    """(dotted name, is a package) of ``package`` and everything below it, from the files."""
    yield package, True
    folder = REPO / Path(*package.split("."))
    for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: i.name):
        name = f"{package}.{info.name}"
        if info.ispkg:
            yield from _module_names(name)
        else:
            yield name, False


def _find_module(leaf: str, attr: str) -> Any:
    """The project module named ``leaf`` that defines ``attr``, wherever it lives now.

    ``fl_privsim.core.config`` may move (e.g. to ``fl_privsim.core.config``); the generator looks
    for it by its last name instead of hardcoding the path.
    """
    candidates = [n for n, _ in _module_names("fl_privsim") if n.rsplit(".", 1)[-1] == leaf]
    candidates.sort(key=lambda n: (n.count("."), n))
    for name in candidates:
        module = importlib.import_module(name)
        if hasattr(module, attr):
            return module
    raise SystemExit(f"gen_docs: no module '{leaf}' defining {attr} under fl_privsim/")


# --------------------------------------------------------------------------- config reference


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _type_label(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type_label(item)}"
    if origin is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, str(tp))


def _allowed(meta: dict[str, Any]) -> str:
    parts = []
    if "choices" in meta:  # a tuple, or a function giving a registry's names
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        parts.append(", ".join(f"`{c}`" for c in choices))
    if "min" in meta and "max" in meta:
        parts.append(f"{meta['min']} to {meta['max']}")
    elif "min" in meta:
        parts.append(f"≥ {meta['min']}")
    elif "max" in meta:
        parts.append(f"≤ {meta['max']}")
    return "; ".join(parts) or "any"


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _list_item(tp: Any) -> Any:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _doc_note(cls: type) -> str:
    """The first paragraph of a schema class's docstring, without its ``[section]:`` label."""
    text = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    text = re.sub(r"^``\[+[\w.]+\]+``:\s*", "", text)
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)  # Sphinx roles to code spans
    text = text.replace("``", "`")
    return text[:1].upper() + text[1:]


def _sections(
    cls: type, path: str, is_array: bool, note: str
) -> Iterator[tuple[str, str, list[list[str]]]]:
    """(heading, note, rows) for the table ``path`` of schema ``cls`` and every table nested
    in it, depth first. ``is_array``: an array of tables (``[[attacks]]``)."""
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        meta = dict(f.metadata)
        item = _list_item(tp)
        sub_path = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(tp) or item is not None:
            sub = tp if item is None else item
            sub_note = _doc_note(sub)
            extra = str(meta.get("help", ""))
            if extra.startswith("targets ("):  # e.g. "targets (clients only)"
                sub_note += f" Here: {extra[len('targets (') : -1]}."
            if item is not None:
                names = [getattr(d, "name", "") for d in _default_of(f) or []]
                sub_note += (
                    " Default: " + ", ".join(f"`{n}`" for n in names) + " (one entry each)."
                    if names
                    else " Default: none."
                )
            nested.append((sub, sub_path, item is not None, sub_note))
            continue
        rows.append(
            [
                f"`{f.name}`",
                _type_label(tp),
                f"`{_toml(_default_of(f))}`",
                _allowed(meta),
                _cell(meta.get("help", "")),
            ]
        )
    if rows:
        heading = (f"`[[{path}]]`" if is_array else f"`[{path}]`") if path else "Top level"
        yield heading, note, rows
    for sub, sub_path, sub_array, sub_note in nested:
        yield from _sections(sub, sub_path, sub_array, sub_note)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _dataclass_reference(cls: type, command: str) -> list[str]:
    lines: list[str] = []
    for heading, note, rows in _sections(cls, "", False, ""):
        lines += [f"### {heading} ({command})", ""]
        if note:
            lines += [_cell(note), ""]
        lines += _table(rows, ["key", "type", "default", "allowed", "help"])
        lines.append("")
    return lines


def config_reference() -> str:
    """The text of ``docs/reference/config.md``."""
    config = _find_module("config", "Config")
    game = _find_module("game", "GameRunConfig")
    measure = _find_module("measure_config", "MeasureConfig")
    lines = [
        "<!-- Generated by `python docs/gen_docs.py` from the config schemas; do not edit. -->",
        "",
        "# Config reference",
        "",
        "Every key of the three config files, generated from the schemas in the code",
        f"(`{config.__name__}.Config`, `{game.__name__}.GameRunConfig`,",
        f"`{measure.__name__}.MeasureConfig`), all bound by one binder. A config file only needs",
        "the keys it changes;",
        "`--set KEY=VALUE` overrides any of them with a TOML value. The prose for each",
        "section is in [Config](../config.md).",
        "",
        "## `fl-privsim run` (and `config`, `flwr run`)",
        "",
    ]
    lines += _dataclass_reference(config.Config, "fl-privsim run")
    lines += ["## `fl-privsim game`", ""]
    lines += _dataclass_reference(game.GameRunConfig, "fl-privsim game")
    lines += ["## `fl-privsim measure`", ""]
    lines += _dataclass_reference(measure.MeasureConfig, "fl-privsim measure")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- API pages


def api_pages() -> dict[str, str]:
    """``{file name: text}`` of ``docs/reference/api/``: one page per package."""
    pages: dict[str, str] = {}
    index = [
        "<!-- Generated by `python docs/gen_docs.py`; do not edit. -->",
        "",
        "# API reference",
        "",
        "One page per package, generated from the package folders (public modules only;",
        "modules whose name starts with `_` are internal).",
        "",
    ]
    for top in PACKAGES:
        for package, is_pkg in _module_names(top):
            if not is_pkg or any(p.startswith("_") for p in package.split(".")):
                continue
            folder = REPO / Path(*package.split("."))
            modules = [
                f"{package}.{i.name}"
                for i in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: i.name)
                if not i.ispkg and not i.name.startswith("_")
            ]
            body = [
                "<!-- Generated by `python docs/gen_docs.py`; do not edit. -->",
                "",
                f"# `{package}`",
                "",
                f"::: {package}",
                "    options:",
                "      members: false",
                "",
            ]
            for module in modules:
                body += [f"::: {module}", ""]
            pages[f"{package}.md"] = "\n".join(body).rstrip() + "\n"
            depth = package.count(".")
            index.append(f"{'    ' * depth}- [`{package}`]({package}.md)")
    pages["index.md"] = "\n".join(index) + "\n"
    return pages


# --------------------------------------------------------------------------- default run


def run_default() -> str:
    """Run the default job once and return what it printed (the table, not the progress)."""
    with tempfile.TemporaryDirectory(prefix="fl-privsim-docs-") as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "fl_privsim.app.cli", "run", "--quiet", "--out", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise SystemExit(f"gen_docs: fl-privsim run failed:\n{proc.stdout}\n{proc.stderr}")
    text = proc.stdout.replace(str(out), "runs/<UTC time>_default")
    return text.rstrip() + "\n"


def readme_with_snippet(readme: str, snippet: str) -> str:
    """``readme`` with the block between the default-run markers replaced by ``snippet``."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise SystemExit("gen_docs: README.md lacks the default-run markers")
    block = f"{README_START}\n```\n{snippet.rstrip()}\n```\n"
    return readme[:start] + block + readme[end:]


# --------------------------------------------------------------------------- main


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {_shown(path)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-default",
        action="store_true",
        help="run the default job (about a minute) and write its output to the snippet",
    )
    parser.add_argument("--docs", type=Path, default=DOCS, help="where to write (default docs/)")
    args = parser.parse_args(argv)
    docs: Path = args.docs
    write(docs / "reference" / "config.md", config_reference())
    api = docs / "reference" / "api"
    pages = api_pages()
    for name, text in pages.items():
        write(api / name, text)
    if api.is_dir():  # a page of a package that no longer exists must go
        for old in api.glob("*.md"):
            if old.name not in pages:
                old.unlink()
                print(f"removed {_shown(old)}")
    snippet = docs / "snippets" / "default_run.txt"
    if args.run_default:
        write(snippet, run_default())
    if docs.resolve() == DOCS.resolve() and snippet.exists():
        readme = REPO / "README.md"
        text = readme.read_text(encoding="utf-8")
        write(readme, readme_with_snippet(text, snippet.read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
