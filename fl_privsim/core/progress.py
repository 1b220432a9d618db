"""A small progress bar for the CLI (stderr; one line per round when not a terminal)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO


def configure_logging(verbose: bool) -> None:
    """Log INFO (``verbose``) or WARNING and above to stderr. ``force`` replaces the handler
    that a library may have installed at import (Opacus calls ``basicConfig``), which would
    otherwise make this call a no-op and hide ``--verbose`` progress."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )


class Progress:
    """Tracks rounds and attack runs and draws ``[####----] round r/R | attacks a/A | acc x``."""

    def __init__(
        self, *, rounds: int, attacks: int, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.rounds = rounds
        self.attacks_total = attacks
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.round = 0
        self.attacks = 0
        self.accuracy: float | None = None
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        width = 24
        done = self.round / max(self.rounds, 1)
        bar = "#" * int(width * done) + "-" * (width - int(width * done))
        acc = f" | acc {self.accuracy:.3f}" if self.accuracy is not None else ""
        text = (
            f"[{bar}] round {self.round}/{self.rounds} | attacks {self.attacks}/{self.attacks_total}"
            f"{acc} | {time.perf_counter() - self.t0:.0f}s"
        )
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def round_done(self, server_round: int, accuracy: float | None) -> None:
        """Called after the central evaluation of ``server_round``."""
        with self._lock:
            self.round = server_round
            self.accuracy = accuracy
            self._draw()

    def attack_done(self) -> None:
        """Called after each attack run."""
        with self._lock:
            self.attacks += 1
            if self.tty:
                self._draw()

    def close(self) -> None:
        """Finish the bar."""
        with self._lock:
            if self.tty and self.enabled:
                self._draw(final=True)
