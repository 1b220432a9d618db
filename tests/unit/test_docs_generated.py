"""The generated documentation matches the code: regenerate it and compare with what is committed.

``docs/gen_docs.py`` writes the config reference from the config schemas, one API page per
package from the package folders, and the README's copy of the default run's output from
``docs/snippets/default_run.txt``. If a config field, a package or the snippet changes without
rerunning ``python docs/gen_docs.py``, these tests fail. No federation is run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
FIX = "rerun `python docs/gen_docs.py` and commit what it writes"


@pytest.fixture(scope="module")
def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", DOCS / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


def test_the_config_reference_is_generated_from_the_schema(
    gen_docs: ModuleType, tmp_path: Path
) -> None:
    gen_docs.main(["--docs", str(tmp_path)])
    fresh = (tmp_path / "reference" / "config.md").read_text(encoding="utf-8")
    committed = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    assert fresh == committed, f"docs/reference/config.md is out of date: {FIX}"


def test_the_config_reference_covers_every_run_key(gen_docs: ModuleType) -> None:
    text = gen_docs.config_reference()
    for heading in ("`[federation.secure_aggregation]`", "`[[attacks]]`", "`[attacks.targets]`"):
        assert heading in text
    for key in ("`clipping_range`", "`asr_mse_threshold`", "`model_mismatch_steps`", "`probes`"):
        assert key in text


def test_the_api_pages_are_generated_from_the_packages(gen_docs: ModuleType) -> None:
    pages = gen_docs.api_pages()
    committed = {p.name for p in (DOCS / "reference" / "api").glob("*.md")}
    assert set(pages) == committed, f"docs/reference/api/ is out of date: {FIX}"
    for name, text in pages.items():
        assert (DOCS / "reference" / "api" / name).read_text(encoding="utf-8") == text, (
            f"docs/reference/api/{name} is out of date: {FIX}"
        )
    every = "".join(pages.values())
    assert "::: fl_privsim.core.config" in every or "::: fl_privsim.core.config" in every
    assert "._" not in "".join(line for line in every.splitlines() if line.startswith(":::"))


def test_the_readme_quotes_the_default_run_snippet(gen_docs: ModuleType) -> None:
    snippet = (DOCS / "snippets" / "default_run.txt").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert gen_docs.readme_with_snippet(readme, snippet) == readme, (
        f"the README's default-run output differs from docs/snippets/default_run.txt: {FIX}"
    )
    assert "attack" in snippet and "run folder: runs/<UTC time>_default" in snippet
