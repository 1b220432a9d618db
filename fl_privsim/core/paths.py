"""Where paths resolve, where the shared data lives, and what a missing-path error says.

The rule, the same in every command (``run``, ``config``, ``game``, ``measure``, ``reproduce``):

- a relative path written in a config FILE resolves against that file's folder;
- a relative path given on the command line (``--set data.root=...``, ``--out``, ``--config``)
  resolves against the current directory;
- a default that is not written in a file (``output.dir = "runs"``) stays relative to the
  current directory.

Loaders store the resolved, absolute paths in the config they return (which is what clients
receive and what a run folder's ``config.toml`` records). This module imports nothing of the
project, so every layer may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

#: The repository (the folder holding ``fl_privsim/`` and ``experiments/``).
REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """``$FL_PRIVSIM_SHARED_DATA``, else ``../shared/data`` beside the repository, else beside
    the current directory (the repository's one is returned when neither exists)."""
    env = os.environ.get("FL_PRIVSIM_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    for base in (REPO_ROOT, Path.cwd()):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand.resolve()
    return REPO_ROOT.parent / "shared" / "data"


def absolute(path: str | Path, base: str | Path | None = None) -> Path:
    """``path`` (``~`` expanded) made absolute against ``base`` (default: the current
    directory), with ``..`` and symlinks resolved."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base if base is not None else Path.cwd()).expanduser() / p
    return p.resolve()


def resolve_value(value: Any, base: str | Path | None = None) -> Any:
    """A path-valued config value made absolute against ``base``; ``""`` (not set) and
    non-strings (left for the validator to reject) come back unchanged."""
    if not isinstance(value, str) or not value:
        return value
    return str(absolute(value, base))


def resolve_keys(
    data: MutableMapping[str, Any],
    keys: Iterable[str],
    base: str | Path | None = None,
    *,
    under: str = "",
) -> MutableMapping[str, Any]:
    """Resolve, in place, the path-valued ``keys`` (dotted: ``data.root``) of a TOML dict
    against ``base`` (default: the current directory). With ``under`` (the key of one
    ``--set``), only the keys at or below it are touched. Absent keys are skipped."""
    for key in keys:
        if under and key != under and not key.startswith(under + "."):
            continue
        *parents, last = key.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, MutableMapping) else None
        if isinstance(node, MutableMapping) and last in node:
            node[last] = resolve_value(node[last], base)
    return data


def _holds(folder: Path, contains: Sequence[str | tuple[str, ...]]) -> bool:
    """``folder`` holds every entry of ``contains`` (a tuple: any one of its names)."""
    for entry in contains:
        names = (entry,) if isinstance(entry, str) else entry
        if not any((folder / n).exists() for n in names):
            return False
    return True


def suggest_path(
    path: str | Path,
    *,
    original: str | Path | None = None,
    contains: Sequence[str | tuple[str, ...]] = (),
) -> Path | None:
    """An existing path the user probably meant instead of the missing ``path``: the path as
    typed (``original``) relative to the current directory or the repository, or the last
    one to three parts of ``path`` inside the shared data folder (and ``../shared/data``
    beside the repository, when ``$FL_PRIVSIM_SHARED_DATA`` points elsewhere), the current
    directory, the repository or its ``experiments/``. A candidate folder must hold
    ``contains``."""
    missing = absolute(path)
    cands: list[Path] = []
    if original is not None and str(original) and not Path(original).expanduser().is_absolute():
        cands += [Path.cwd() / original, REPO_ROOT / original]
    bases = (
        shared_data_dir(),
        REPO_ROOT.parent / "shared" / "data",
        Path.cwd(),
        REPO_ROOT,
        REPO_ROOT / "experiments",
    )
    for k in (1, 2, 3):
        if len(missing.parts) > k:
            tail = Path(*missing.parts[-k:])
            cands += [b / tail for b in bases]
    for cand in cands:
        try:
            cand = cand.resolve()
            if cand == missing or not cand.exists():
                continue
            if contains and cand.is_dir() and not _holds(cand, contains):
                continue
        except OSError:
            continue
        return cand
    return None


def missing_path_message(
    what: str,
    path: str | Path,
    *,
    expect: str = "",
    original: str | Path | None = None,
    contains: Sequence[str | tuple[str, ...]] = (),
    problem: str = "does not exist",
    always_expect: bool = False,
) -> str:
    """One line for a path that is not there: ``"<what> <absolute path> <problem>"``, then a
    path that exists and would work (:func:`suggest_path`), else ``expect`` (what the path
    must be or hold; with ``always_expect``, after the suggestion too)."""
    msg = f"{what} {absolute(path)} {problem}"
    cand = suggest_path(path, original=original, contains=contains)
    if cand is not None:
        msg = f"{msg}; did you mean {cand}?"
        return f"{msg} ({expect})" if expect and always_expect else msg
    return f"{msg}; {expect}" if expect else msg
