"""What a person sees in the terminal: the project's log lines and one progress bar per stage.

Ray's own worker output (Train controllers, placement-group cleaners, every worker's logging) stays in
Ray's session folder unless DALLE2_VERBOSE=1 (`dalle2 --verbose ...`); open_clip's informational lines
are dropped; a warning that repeats is shown once, and how often it came is said when the process ends.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from collections import Counter

VERBOSE_ENV = "DALLE2_VERBOSE"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose() -> bool:
    """Whether the user asked for Ray's own output too."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


class QuietFilter(logging.Filter):
    """Drops libraries' chatter (open_clip logs through the root logger at INFO, matplotlib's notes) and repeats
    of a warning."""

    def __init__(self) -> None:
        super().__init__()
        self.repeats: Counter = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        if record.levelno < logging.WARNING and (f"{os.sep}open_clip{os.sep}" in record.pathname
                                                 or record.name.startswith("matplotlib")):
            return False
        if record.levelno == logging.WARNING:
            key = (record.name, record.getMessage())
            self.repeats[key] += 1
            return self.repeats[key] == 1
        return True

    def report(self) -> None:
        for (name, message), count in self.repeats.items():
            if count > 1:
                sys.stderr.write(f"{name}: the warning {message[:100]!r} came {count} times (shown once)\n")


def setup_logging(level: int = logging.INFO) -> None:
    """The process's logging: one format, INFO and up, the quiet filter on every handler of the root logger."""
    logging.basicConfig(level=level, format=FORMAT)
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, QuietFilter) for f in handler.filters):
            quiet = QuietFilter()
            handler.addFilter(quiet)
            atexit.register(quiet.report)


class LogProgress:
    """Progress for a log file: a line at each quarter of the work and one at the end, never on a clock, so a slow
    machine writes the same lines as a fast one (tqdm redraws on a timer, and a log keeps every redraw)."""

    MARKS = 4  # lines before the end: at 25%, 50%, 75%

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it", **_) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, 0, ""
        self._mark, self._closed, self._start = 0, False, time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count `n` more done; writes a line when that crosses a quarter of the total."""
        self.n += n
        if self.total:
            mark = self.n * self.MARKS // self.total
            if self._mark < mark < self.MARKS:  # the end is written once, by close
                self._mark = mark
                self._write()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        """Figures shown after the count on the next line written (tqdm's signature)."""
        self.postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def close(self) -> None:
        """The last line: what was done in all, and how long it took."""
        if not self._closed:
            self._closed = True
            self._write()

    def _write(self) -> None:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f"{100 * self.n // self.total:3d}% " if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        sys.stderr.write(f"{self.desc}: {percent}{count} {self.unit} [{time.monotonic() - self._start:.0f} s{postfix}]\n")
        sys.stderr.flush()


def progress_bar(**kwargs):
    """A tqdm bar in a terminal; in a log file (not a terminal), lines at fixed fractions of the work."""
    if not sys.stderr.isatty():
        return LogProgress(**kwargs)
    from tqdm.auto import tqdm

    return tqdm(mininterval=0.1, **kwargs)
