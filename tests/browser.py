"""A real browser for the tests: headless Chromium driven over the Chrome DevTools Protocol.

The protocol runs over ``--remote-debugging-pipe``: Chromium reads commands from its fd 3 and
writes replies and events to its fd 4, each a JSON message ended by a NUL byte, so no
websocket library is needed. :func:`check_page` loads a file, waits for its load event and
returns a :class:`PageCheck`: the console errors (``console.error``/``console.assert``,
uncaught exceptions, browser log errors such as a resource that failed to load), every image
and whether it decoded, and the text of every table. :func:`assert_report_matches_summary`
checks a run folder's ``report.html`` against its ``summary.json`` the way the CLI prints it.

    from tests.browser import check_page, chromium_path
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

#: Seconds any one step (start, a command, the page load) may take.
TIMEOUT = 30.0

_INSPECT = """JSON.stringify({
  title: document.title,
  text: document.body ? document.body.innerText : "",
  images: Array.from(document.images).map(i => ({
    src: i.getAttribute("src") || "", alt: i.alt, complete: i.complete,
    naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
    loaded: i.complete && i.naturalWidth > 0})),
  tables: Array.from(document.querySelectorAll("table")).map(t =>
    Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent.trim())))
})"""


@dataclass
class PageCheck:
    """What a page showed in the browser."""

    console_errors: list[str]
    images: list[dict[str, Any]]
    tables: list[list[list[str]]]
    title: str
    text: str = field(default="", repr=False)

    def table(self, *header: str) -> list[list[str]]:
        """The first table whose header row starts with ``header``."""
        for rows in self.tables:
            if rows and tuple(rows[0][: len(header)]) == header:
                return rows
        raise AssertionError(
            f"no table with header {header}; headers: {[t[0] for t in self.tables if t]}"
        )


def chromium_path() -> str | None:
    """The Chromium (or Chrome) executable on PATH, ``None`` when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium, talked to over its DevTools pipe; use as a context manager."""

    def __init__(self, executable: str | None = None, timeout: float = TIMEOUT) -> None:
        exe = executable or chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed: apt-get install -y chromium")
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="fl-privsim-chromium-")
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - open as long as the browser runs
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The child's ends, moved above fd 10: the shell below maps them to fds 3 and 4.
        cmd_fd = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        out_fd = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)
        flags = [
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--mute-audio",
            f"--user-data-dir={self._profile.name}",
            "about:blank",
        ]
        # A tiny trampoline puts them at 3 and 4 (a POSIX shell cannot name fds above 9).
        trampoline = (
            "import os, sys\n"
            f"os.dup2({cmd_fd}, 3); os.dup2({out_fd}, 4); os.close({cmd_fd}); os.close({out_fd})\n"
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", trampoline, exe, *flags],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                pass_fds=(cmd_fd, out_fd),
                start_new_session=True,
            )
        finally:
            os.close(cmd_fd)
            os.close(out_fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    # -------------------------------------------------------------------------- the pipe

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no message from chromium in {self.timeout:.0f} s{self._tail()}"
                )
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed its DevTools pipe{self._tail()}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one command and wait for its reply (events that arrive meanwhile are kept)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_child, data) :]
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, session: str | None = None) -> dict[str, Any]:
        """The first event ``method`` (of ``session``), waiting for it if need be."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and (
                    session is None or event.get("sessionId") == session
                ):
                    return event
            seen = len(self.events)
            event = self._read(deadline)
            if "method" in event:
                self.events.append(event)

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            self._log.seek(0)
            text = self._log.read()[-2000:].decode("utf-8", "replace").strip()
            return f"; chromium said: {text}" if text else ""
        return ""

    # -------------------------------------------------------------------------- pages

    def check(self, page: str | Path) -> PageCheck:
        """Load ``page`` (a file path or URL) in a new tab and report what it showed."""
        url = (
            Path(page).resolve().as_uri()
            if not str(page).startswith(("file:", "http:", "https:", "data:"))
            else str(page)
        )
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        start = len(self.events)
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired", session)
        found = self.send(
            "Runtime.evaluate", {"expression": _INSPECT, "returnByValue": True}, session=session
        )
        if "exceptionDetails" in found:
            raise RuntimeError(f"inspecting {url} failed: {found['exceptionDetails']}")
        data = json.loads(found["result"]["value"])
        errors = _console_errors([e for e in self.events[start:] if e.get("sessionId") == session])
        self.send("Target.closeTarget", {"targetId": target})
        return PageCheck(errors, data["images"], data["tables"], data["title"], data["text"])

    def close(self) -> None:
        """Close the browser (Browser.close, then terminate/kill) and remove its profile."""
        try:
            if self._proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.timeout = 5.0
                    self.send("Browser.close")
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.terminate()
                    try:
                        self._proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        self._proc.kill()
                        self._proc.wait(timeout=5)
        finally:
            with contextlib.suppress(OSError):  # helpers left in its session (it leads one)
                os.killpg(self._proc.pid, signal.SIGKILL)
            for fd in (self._to_child, self._from_child):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._log.close()
            self._profile.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    """The error messages among a page's DevTools events."""
    out = []
    for event in events:
        p = event.get("params", {})
        if event["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = [str(a.get("value", a.get("description", ""))) for a in p.get("args", [])]
            out.append(f"console.{p['type']}: {' '.join(args)}")
        elif event["method"] == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            what = details.get("exception", {}).get("description") or details.get("text", "")
            out.append(f"exception: {what}")
        elif event["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"log: {entry.get('text', '')} {entry.get('url', '')}".strip())
    return out


def check_page(page: str | Path, executable: str | None = None) -> PageCheck:
    """Load ``page`` in a fresh headless Chromium and report what it showed."""
    with Browser(executable) as browser:
        return browser.check(page)


def expected_attack_rows(summary: dict[str, Any]) -> dict[str, list[str]]:
    """Per attack, the cells the report's attack table must show: the numbers exactly as
    ``fl-privsim run`` prints them (split from :func:`fl_privsim.app.cli.format_table`'s row)
    and, for an attack that scored nothing, the reason the CLI gives."""
    from fl_privsim.app.cli import format_table
    from fl_privsim.app.summary_text import outcome_notes

    lines = format_table(summary).splitlines()
    out = {}
    for name, row in summary.get("attacks", {}).items():
        line = next(x for x in lines if x.startswith(f"{name} ") and x.split()[0] == name)
        tokens = line.split()
        if int(row.get("attacked", 0)) == 0:
            why = "; ".join(outcome_notes(row)) or ("-" if "auc" in row else "no update attacked")
            out[name] = [name, "0", *["-"] * 6, tokens[-2], tokens[-1], why]
        else:
            out[name] = [*tokens[:10], "; ".join(outcome_notes(row))]
    return out


def assert_report_matches_summary(run_dir: Path, page: PageCheck | None = None) -> PageCheck:
    """Load ``run_dir/report.html`` in Chromium (or take ``page``, already loaded) and check
    it: no console error, every image decoded and inlined, one grid per attack PNG of the
    folder, and the attack table's cells equal to ``summary.json``'s numbers as the CLI
    prints them. Returns the page."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    page = page or check_page(run_dir / "report.html")
    assert not page.console_errors, page.console_errors
    assert page.images and all(i["loaded"] for i in page.images), page.images
    assert all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    pngs = list((run_dir / "attacks").glob("round_*/client_*.png"))
    grids = [i for i in page.images if "originals (top) above reconstructions" in i["alt"]]
    assert len(grids) == len(pngs), (len(grids), len(pngs))
    assert summary["name"] in page.title
    if summary.get("attacks"):
        table = page.table("attack", "attacked", "PSNR dB")
        shown = {row[0]: row for row in table[1:]}
        for name, cells in expected_attack_rows(summary).items():
            assert shown.get(name) == cells, (name, shown.get(name), cells)
    return page
