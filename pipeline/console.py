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


def progress_bar(**kwargs):
    """A tqdm bar; where the output is not a terminal (a log file) it redraws at most every 10 s."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(mininterval=0.1 if interactive else 10.0, **kwargs)
