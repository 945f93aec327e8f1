"""Progress for every loop that shows one: tqdm's bar on a terminal; elsewhere (a log file, a
pipe, a scheduler's capture) plain lines, at most one every ``PlainProgress.EVERY`` seconds and
one at the end, instead of the hundreds of ``\\r``-separated bar redraws tqdm writes there."""
from __future__ import annotations

import sys
import time


class PlainProgress:
    """The part of tqdm's interface the package uses (update, set_postfix(_str), write, close), as lines."""

    EVERY = 10.0        # seconds between lines

    def __init__(self, total: int, desc: str, unit: str, leave: bool = True, stream=None):
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.stream = stream or sys.stderr
        self.n, self.postfix = 0, ""
        self.t0 = time.monotonic()
        self.next = self.t0 + self.EVERY
        self.closed = False

    def _line(self) -> None:
        post = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}, {time.monotonic() - self.t0:.1f} s{post}",
              file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() >= self.next:
            self.next = time.monotonic() + self.EVERY
            self._line()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, s: str) -> None:
        print(s, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed and self.leave:      # inner loops (leave=False) end silently, as tqdm's do
            self._line()
        self.closed = True


def progress_bar(total: int, desc: str, unit: str, leave: bool = True, **tqdm_kw):
    """tqdm on a terminal (stderr is a TTY), :class:`PlainProgress` lines otherwise."""
    isatty = getattr(sys.stderr, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, **tqdm_kw)
    return PlainProgress(total, desc, unit, leave)
