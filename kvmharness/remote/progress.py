"""What the user sees while rigs work: one live line per rig, or plain lines.

On a terminal, each rig owns one line that is redrawn in place (phase,
elapsed time, pytest's percentage, the latest output line).  Anywhere else
(CI logs, pipes) every event is a plain line prefixed with the rig's name, so
the log reads top to bottom.  Threads call in concurrently; one lock orders
the writes.
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from typing import TextIO

_PERCENT = re.compile(r"\[\s*(\d{1,3})%\]\s*$")


class Progress:
    def __init__(self, rigs: list[str], *, live: bool | None = None, stream: TextIO | None = None,
                 echo_lines: bool = True):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.echo_lines = echo_lines
        self.rigs = list(rigs)
        self.width = max((len(r) for r in rigs), default=3)
        self.state = {r: {"phase": "waiting", "t0": time.monotonic(), "last": "", "pct": "",
                          "end": None} for r in rigs}
        self._lock = threading.Lock()
        self._drawn = 0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.live and rigs:
            self._ticker = threading.Thread(target=self._tick, name="rig-progress", daemon=True)
            self._ticker.start()

    # -- events (any thread) -------------------------------------------------------
    def phase(self, rig: str, phase: str) -> None:
        with self._lock:
            if self.state[rig]["phase"] == "waiting":  # the clock starts at the rig's first step
                self.state[rig]["t0"] = time.monotonic()
            self.state[rig]["phase"] = phase
            if self.live:
                self._redraw()
            else:
                self._write(f"[{rig}] {phase}")

    def line(self, rig: str, text: str) -> None:
        with self._lock:
            st = self.state[rig]
            if text.strip():
                st["last"] = text.strip()
                m = _PERCENT.search(text)
                if m:
                    st["pct"] = m.group(1) + "%"
            if self.live:
                self._redraw()
            elif self.echo_lines:
                self._write(f"[{rig}] {text}")

    def note(self, rig: str, msg: str) -> None:
        self.message(f"[{rig}] {msg}")

    def message(self, msg: str) -> None:
        with self._lock:
            if self.live:
                self._clear()
                self._write(msg)
                self._redraw()
            else:
                self._write(msg)

    def done(self, rig: str, status: int, reason: str) -> None:
        with self._lock:
            st = self.state[rig]
            st["end"] = time.monotonic()
            st["phase"] = {0: "ok", 5: "no tests (exit 5)"}.get(status, f"FAILED (exit {status})")
            if reason:
                st["last"] = reason
            if self.live:
                self._redraw()
            else:
                self._write(f"[{rig}] {st['phase']} after {st['end'] - st['t0']:.1f} s"
                            + (f": {reason}" if reason else ""))

    def close(self) -> None:
        self._stop.set()
        if self._ticker:
            self._ticker.join(2)
        with self._lock:
            if self.live:
                self._redraw()
                self._drawn = 0

    # -- drawing (lock held) -------------------------------------------------------
    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}A" + "\x1b[2K\n" * self._drawn + f"\x1b[{self._drawn}A")
            self._drawn = 0

    def _redraw(self) -> None:
        cols = shutil.get_terminal_size((100, 20)).columns
        now = time.monotonic()
        out = []
        for r in self.rigs:
            st = self.state[r]
            elapsed = (st["end"] or now) - st["t0"]
            head = f"{r:<{self.width}}  {st['phase']:<12} {elapsed:6.1f}s {st['pct']:>4}  "
            out.append((head + st["last"])[:cols - 1])
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}A")
        for line in out:
            self.stream.write("\x1b[2K" + line + "\n")
        self._drawn = len(out)
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._redraw()
