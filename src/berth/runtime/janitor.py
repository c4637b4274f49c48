"""A tiny guardian process that kills model process groups if berth dies.

berth writes `+PGID` / `-PGID` lines to the janitor's stdin as it starts and
reaps model processes. If berth exits for any reason, SIGKILL included, the
pipe closes and the janitor SIGKILLs every group still registered, so no model
server (or its children) outlives berth. Run as `python -m berth.runtime.janitor`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal every process of a group; one already gone (or no longer ours) is no error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_groups(groups: set[int]) -> None:
    for pgid in groups:
        signal_group(pgid, signal.SIGKILL)


def main() -> None:
    # Signals meant for berth (Ctrl-C reaches the whole foreground group) must not
    # take the janitor down before berth has cleaned up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("+"):
            groups.add(int(line[1:]))
        elif line.startswith("-"):
            groups.discard(int(line[1:]))
    _kill_groups(groups)


class Janitor:
    """The parent side: starts the guardian and tells it which groups exist."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "berth.runtime.janitor"],
            stdin=subprocess.PIPE, text=True, start_new_session=True,
        )

    def _send(self, line: str) -> None:
        if self._proc and self._proc.stdin:
            try:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                pass

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unregister(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


if __name__ == "__main__":
    main()
