"""Run every stage of a run in order, skipping the ones already complete, then write its report.html.

    dalle2 run --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

import json
from typing import Optional


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the pipeline described by --config."""
    import argparse

    from .config_io import load_config
    from .run_config import RunConfig
    from .stages import run_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(RunConfig, args.config, args.set)  # validated before any stage starts
    from pipeline.execution.console import setup_logging

    setup_logging()
    forwarded = (["--config", args.config] if args.config else []) + [x for s in args.set for x in ("--set", s)]
    outcome = run_all(config, forwarded)
    if "ran" in outcome.values():  # the page of what this run now holds
        from .report import build_report

        build_report(config.root)
    print(json.dumps(outcome))
    return outcome


if __name__ == "__main__":
    main()
