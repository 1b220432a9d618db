"""No function-level import of a project module outside the documented start-up-time
exceptions (docs: "Layers and imports"). A lazy import hides a dependency from the import
contracts' reader and from a module's header; it is allowed only where it buys start-up time:

- ``fl_privsim/app/cli.py`` imports the chosen command's module only (``fl-privsim --help``
  and a config error stay fast);
- ``fl_privsim.core.plots`` (matplotlib, about half a second) is imported where a figure is
  drawn;
- ``fl_privsim/app/simulation.py`` imports the Flower glue (``strategies``,
  ``clients.client_app``, ``clients.secagg_client``: Flower and Ray, seconds) only to launch,
  after every pre-launch check has passed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fl_privsim", "strategies", "clients", "adversaries")
GLUE = ("strategies", "clients.client_app", "clients.secagg_client")


def _allowed(path: str, module: str) -> bool:
    if path == "fl_privsim/app/cli.py" or module == "fl_privsim.core.plots":
        return True
    return path == "fl_privsim/app/simulation.py" and module.startswith(GLUE)


def _function_level_project_imports() -> list[tuple[str, int, str]]:
    found = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(f.read_text(), filename=str(f))
            rel = f.relative_to(ROOT).as_posix()
            for fn in ast.walk(tree):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        mods = [node.module]
                    elif isinstance(node, ast.Import):
                        mods = [a.name for a in node.names]
                    else:
                        continue
                    found += [(rel, node.lineno, m) for m in mods if m.split(".")[0] in PACKAGES]
    return sorted(set(found))


def test_lazy_project_imports_are_only_the_documented_exceptions() -> None:
    found = _function_level_project_imports()
    assert found, (
        "the scan found no function-level import at all: is it looking in the right place?"
    )
    bad = [f"{p}:{line} imports {m}" for p, line, m in found if not _allowed(p, m)]
    assert not bad, "function-level imports outside the exception list:\n" + "\n".join(bad)
