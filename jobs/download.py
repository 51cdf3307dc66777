"""Download the run's URL list into webdataset shards (img2dataset on Ray).

    python -m jobs.download --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

from typing import Optional

from .run_config import RunConfig
from .stage import Stage, ledger_complete


def run(config: RunConfig, session) -> dict:
    """Split the URL list (once) and download every shard not done yet."""
    from pipeline.stages.download.stage import run_download

    return run_download(config.download, config.root, session)


def complete(run: RunConfig) -> bool:
    """Every input shard of the split has a download record, and none failed."""
    from pipeline.run.layout import DOWNLOAD, RunLayout
    from pipeline.run.storage import exists, read_json

    layout = RunLayout(run.root)
    if not ledger_complete(run, DOWNLOAD) or not exists(layout.split_marker):
        return False
    return read_json(layout.ledger_summary(DOWNLOAD))["shards"] == len(read_json(layout.split_marker)["shards"])


STAGE = Stage("download", "download the URL list into webdataset shards", run, complete,
              wanted=lambda run: bool(run.download.url_list) or complete(run))


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the download stage of the run described by --config."""
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
