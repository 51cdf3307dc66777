"""Download the run's URL list into webdataset shards (img2dataset on Ray).

    python -m jobs.download --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

from typing import Optional

from pipeline.stages.download.stage import run_download

from .run_config import stage_main


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the download stage of the run described by --config."""
    return stage_main(argv, __doc__.splitlines()[0], lambda c: run_download(c.download, c.root, c.ray))


if __name__ == "__main__":
    main()
