"""Run every stage of a run in order, skipping the ones already complete, then write its report.html.

    dalle2 run --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

import json
from typing import Optional


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the pipeline described by --config."""
    from .stage import parse_run_config, run_session
    from .stages import run_all

    config = parse_run_config(argv, __doc__.splitlines()[0])  # validated before any stage starts
    with run_session(config) as session:  # one Ray for every stage
        outcome = run_all(config, session)
    if "ran" in outcome.values():  # the page of what this run now holds
        from .report import build_report

        build_report(config.root)
    print(json.dumps(outcome))
    return outcome


if __name__ == "__main__":
    main()
