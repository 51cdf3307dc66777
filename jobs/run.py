"""Run every stage of a run in order, skipping the ones already complete.

    dalle2 run --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

import json
import logging
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    forwarded = (["--config", args.config] if args.config else []) + [x for s in args.set for x in ("--set", s)]
    outcome = run_all(config, forwarded)
    print(json.dumps(outcome))
    return outcome


if __name__ == "__main__":
    main()
