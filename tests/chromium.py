"""A minimal headless-Chromium driver for tests: the DevTools protocol over a pipe.

No dependencies beyond the standard library and a ``chromium`` binary. Started with
``--remote-debugging-pipe``, Chromium reads JSON commands from its fd 3 and writes JSON
responses and events to its fd 4, each message ending in a NUL byte. Every read has a
deadline, so a stuck browser fails the test instead of hanging it, and ``Browser`` always
kills the process on exit.

Typical use::

    with Browser(shutil.which("chromium"), tmp_path / "profile") as browser:
        page = browser.open_page()
        page.navigate(index.resolve().as_uri())
        assert page.errors() == []
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root, where the sandbox cannot start
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-extensions",
    "--remote-debugging-pipe",
)


class ChromiumError(RuntimeError):
    """The browser died, timed out or answered a command with an error."""


class Browser:
    """A headless Chromium process driven over ``--remote-debugging-pipe``.

    Args:
        executable: the ``chromium`` binary (or its launcher script).
        profile: an empty folder for ``--user-data-dir``; the browser log goes beside it.
        timeout: seconds for everything this browser does, from start to close.
        window: the window size, ``(width, height)`` in CSS pixels.
    """

    def __init__(
        self,
        executable: str,
        profile: Path,
        *,
        timeout: float = 60.0,
        window: tuple[int, int] = (1200, 1600),
    ) -> None:
        self.deadline = time.monotonic() + timeout
        self.events: list[dict[str, Any]] = []
        self.log_path = profile.with_name(profile.name + ".log")
        self._next_id = 0
        self._buffer = b""
        profile.mkdir(parents=True, exist_ok=True)
        command = [
            executable,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}",
            "about:blank",
        ]
        # Commands go parent → child fd 3, replies child fd 4 → parent.
        to_child_read, self._to_child = os.pipe()
        self._from_child, from_child_write = os.pipe()
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(3, 4),
                    preexec_fn=_onto_3_and_4(to_child_read, from_child_write),
                    start_new_session=True,
                )
        except BaseException:
            os.close(self._to_child)
            os.close(self._from_child)
            raise
        finally:
            os.close(to_child_read)
            os.close(from_child_write)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Asks the browser to quit, then kills it if it has not within a few seconds."""
        try:
            if self.process.poll() is None:
                # It may exit before it answers; the wait below settles it.
                with contextlib.suppress(ChromiumError, OSError):
                    self.call("Browser.close", timeout=5.0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=5.0)
        finally:
            if self.process.poll() is None:  # kill its helpers too: it leads its own group
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10.0)
            if self._to_child >= 0:
                os.close(self._to_child)
                os.close(self._from_child)
                self._to_child = self._from_child = -1

    def log(self, lines: int = 30) -> str:
        """The last ``lines`` of the browser's own stdout and stderr (for failure messages)."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Sends one command and returns its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_child, data) :]
        reply = self._read_until(lambda m: m.get("id") == self._next_id, method, timeout)
        if "error" in reply:
            raise ChromiumError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def wait_for(self, method: str, session: str | None = None) -> dict[str, Any]:
        """The params of the first event ``method`` (of ``session``), seen or still to come."""

        def match(message: dict[str, Any]) -> bool:
            return message.get("method") == method and message.get("sessionId") == session

        for event in self.events:
            if match(event):
                return event["params"]
        return self._read_until(match, method, None)["params"]

    def open_page(self) -> Page:
        """A new blank tab, attached in flat mode, with the runtime, log and page domains on."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, attached["sessionId"])
        for domain in ("Runtime", "Log", "Page"):
            page.call(f"{domain}.enable")
        return page

    def _read_until(self, match, what: str, timeout: float | None) -> dict[str, Any]:
        deadline = self.deadline
        if timeout is not None:
            deadline = min(deadline, time.monotonic() + timeout)
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" not in message:
                    self.events.append(message)
                if match(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError(f"timed out waiting for {what}\n{self.log()}")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise ChromiumError(f"browser closed the pipe waiting for {what}\n{self.log()}")
                self._buffer += chunk


class Page:
    """One attached tab: commands go to its session, its events are filtered from the rest."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session)

    def navigate(self, url: str) -> None:
        """Loads ``url`` and returns once its load event (images included) has fired."""
        result = self.call("Page.navigate", {"url": url})
        if "errorText" in result:
            raise ChromiumError(f"navigation to {url} failed: {result['errorText']}")
        self.browser.wait_for("Page.loadEventFired", self.session)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression; a thrown exception fails loudly."""
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise ChromiumError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """Saves the whole page (not only the window) as a PNG."""
        params = {"format": "png", "captureBeyondViewport": True}
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", params)["data"]))
        return path

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (failed loads) so far."""
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event["method"], event["params"]
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                text = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                found.append(f"console.{params['type']}: {text}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = details.get("exception", {}).get("description", details["text"])
                found.append(f"uncaught exception at line {details['lineNumber']}: {text}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log ({entry['source']}): {entry['text']} {entry.get('url', '')}")
        return found


def _onto_3_and_4(read_fd: int, write_fd: int):
    """A ``preexec_fn`` that puts the two pipe ends on the child's fds 3 and 4.

    Both are first copied to 10 or above, so neither ``dup2`` can clobber the other. Nothing
    else the child needs can sit on 3 or 4: the two pipes were opened before ``Popen`` and
    so took any of 3 and 4 that were free, which keeps subprocess's own error pipe off them.
    """

    def move() -> None:
        high_read = fcntl.fcntl(read_fd, fcntl.F_DUPFD, 10)
        high_write = fcntl.fcntl(write_fd, fcntl.F_DUPFD, 10)
        os.dup2(high_read, 3)  # dup2 leaves the copies inheritable
        os.dup2(high_write, 4)
        os.close(high_read)
        os.close(high_write)

    return move
