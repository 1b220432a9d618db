"""Errors that carry a message meant for the user (shown without a traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: a config key, a value, a path, a shape, missing data.

    The CLI prints ``str(err)`` on one line and exits with code 2.
    """


class ConfigError(UserError):
    """An invalid configuration key, type or value."""


class DataError(UserError):
    """A dataset that is missing, unreadable or of the wrong shape."""


class ThreatModelError(UserError):
    """An attack was given an observation that does not meet its threat model."""


def did_you_mean(name: object, choices: Iterable[object]) -> str:
    """`` (did you mean 'batch_size'?)`` for the choice closest to ``name``, or ``""``.

    Compared as text, case-insensitively (difflib's ratio, cutoff 0.6); meant to follow
    the unknown name in a one-line error.
    """
    text = str(name)
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(str(choice).lower(), str(choice))
    match = difflib.get_close_matches(text.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""
