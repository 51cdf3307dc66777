"""Fuzz the tar reader (pipeline/formats/shard_reader.py) for N minutes: the suite's hypothesis strategies
(tests/tar_fuzz.py), unseeded, round after round, over structurally plausible hostile shards and random bytes.

    python bench/fuzz_reader.py [--minutes 10] [--no-memory]

A failure is any error but ShardReadError, a read over a second, or a tracemalloc peak over the cap; each is
logged once (shrunk by hypothesis) with its input. Logs the executions, their rate, what the reader made of
them and the failures; exits 1 if any.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

log = logging.getLogger("fuzz_reader")
ROUND = 200  # examples a hypothesis run; the time left is checked between runs


def slow_again(checker, data: bytes) -> bool:
    """Whether `data` is still slow to read, timed 3 times afresh (over a tenth of SECONDS each time)."""
    from tests.tar_fuzz import SECONDS

    for _ in range(3):
        started = time.perf_counter()
        try:
            checker.check(data)
        except AssertionError:
            pass
        if time.perf_counter() - started < SECONDS / 10:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--no-memory", action="store_true", help="skip tracemalloc (about twice the executions)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.tar_fuzz import SECONDS, Checker, shards

    scratch = tempfile.TemporaryDirectory(prefix="fuzz-reader-")
    checker, outcomes, failures = Checker(scratch.name, measure_memory=not args.no_memory), Counter(), {}
    inputs = st.one_of(shards(), shards(), shards(), st.binary(max_size=3000))

    @settings(max_examples=ROUND, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(inputs)
    def read(data: bytes) -> None:
        try:
            outcomes[checker.check(data)] += 1
        except AssertionError as error:
            read.last_input = data
            raise error

    started = time.monotonic()
    stop, rounds, reported = started + 60 * args.minutes, 0, time.monotonic()
    while time.monotonic() < stop:
        rounds += 1
        try:
            read()
        except Exception as error:  # noqa: BLE001 - shrunk by hypothesis (several at once: a group): the findings
            for one in error.exceptions if isinstance(error, BaseExceptionGroup) else [error]:
                finding = (str(one).splitlines() or [type(one).__name__])[0][:300]
                if "still running" in finding and not slow_again(checker, getattr(read, "last_input", b"")):
                    outcomes["timing outlier, not reproduced"] += 1  # a busy machine, not the reader
                    log.warning("a read over %s s that took under a tenth of that 3 times again: %s", SECONDS, finding)
                    continue
                if finding not in failures:
                    failures[finding] = getattr(read, "last_input", b"")[:200]
                    log.error("FAILURE %d: %s; input (first 200 bytes): %r", len(failures), finding, failures[finding])
        if time.monotonic() - reported > 60:
            reported = time.monotonic()
            log.info("%d executions in %.0f s, %d failures", checker.executions, reported - started, len(failures))
    elapsed = time.monotonic() - started
    log.info("done: %d executions in %.0f s (%.0f/s, %d rounds), outcomes %s", checker.executions, elapsed,
             checker.executions / elapsed, rounds, dict(outcomes.most_common()))
    log.info("failures: %d%s", len(failures), "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
