"""The `dalle2` command: one subcommand per stage (jobs/stages.py) or tool, each forwarding its arguments to its main(argv)."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

# the commands that are not stages: subcommand -> (module with main(argv), one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "sample": ("jobs.sample", "generate images from the run's latest checkpoints"),
    "import": ("jobs.import_weights", "import DALLE2-pytorch / LAION checkpoints into a run, or --export its models"),
    "run": ("jobs.run", "run every stage in order, skipping complete ones"),
    "status": ("jobs.status", "print the run's ledger and checkpoints"),
    "report": ("jobs.report", "write the run's dataset report: report.html with plots and samples"),
    "serve": ("jobs.serve", "serve a run's model and data index: an HTTP API and a page, on Ray Serve"),
    "demo": ("jobs.demo", "the whole pipeline on a built-in data set, served on 127.0.0.1"),
    "toy-prior": ("jobs.toy_prior", "train the prior on generated embeddings and print its metrics"),
}


def commands() -> dict[str, tuple[str, str]]:
    """Every subcommand: the stages (from their registry, in run order), then the tools."""
    from .stages import MODULES, STAGES

    return {**{stage.name: (MODULES[stage.name], stage.help) for stage in STAGES}, **TOOLS}


def usage() -> str:
    known = commands()
    width = max(len(name) for name in known)
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in known.items()]
    return ("usage: dalle2 COMMAND [--config run.yaml] [--set section.field=value ...] [--verbose]\n\n"
            "--verbose also shows Ray's own worker output (otherwise in Ray's session folder)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: Optional[list[str]] = None) -> int:
    """Dispatch `dalle2 COMMAND ...` to the job module's main."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # Ray's own worker output too (it goes to Ray's session folder otherwise)
        import os

        from pipeline.execution.console import VERBOSE_ENV

        argv.remove("--verbose")
        os.environ[VERBOSE_ENV] = "1"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    known = commands()
    if command not in known:
        print(f"dalle2: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from pipeline.run.ledger import StaleRunError

    from .config_io import ConfigError
    from .stages import StageStopped

    module = importlib.import_module(known[command][0])
    try:
        result = module.main(rest)
    except (ConfigError, StaleRunError) as error:  # a bad config or root, stale outputs: one line, no traceback
        print(f"dalle2 {command}: {error}", file=sys.stderr)
        return 2
    except StageStopped as error:  # the run stopped after a stage, for a reason the stage counted
        print(f"dalle2 {command}: {error}", file=sys.stderr)
        return 1
    if isinstance(result, dict) and (result.get("failed_shards") or result.get("problems")):
        failed = result.get("failed_shards") or {}
        print(f"dalle2 {command}: " + (f"{len(failed)} shards failed (re-run to retry them): {sorted(failed)[:10]}"
                                       if failed else f"{len(result['problems'])} problems"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
