"""Errors that carry a message meant for the user (shown without a traceback)."""

from __future__ import annotations


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
