"""Output a person can follow: open_clip's chatter dropped, a repeated warning shown once and counted, Ray's
worker output kept out of the terminal unless asked for."""

import logging
import os

import pytest

from pipeline.execution.console import VERBOSE_ENV, QuietFilter


def record(level: int, message: str, pathname: str = "/x/pipeline/stages/embed/stage.py", name: str = "pipeline.stages.embed.stage"):
    return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_library_chatter_is_dropped_and_repeated_warnings_shown_once(monkeypatch, capsys):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    quiet = QuietFilter()
    clip_info = f"{os.sep}site-packages{os.sep}open_clip{os.sep}factory.py"
    assert not quiet.filter(record(logging.INFO, "Loading model config", clip_info, "root"))
    assert quiet.filter(record(logging.WARNING, "No pretrained weights loaded", clip_info, "root"))  # a warning stays
    assert quiet.filter(record(logging.INFO, "embed: 10 rows"))
    assert not quiet.filter(record(logging.INFO, "Using categorical units", name="matplotlib.category"))
    shown = [quiet.filter(record(logging.WARNING, "slow shard")) for _ in range(4)]
    assert shown == [True, False, False, False]
    assert quiet.filter(record(logging.WARNING, "another warning"))  # a different message is news
    quiet.report()
    assert "'slow shard' came 4 times (shown once)" in capsys.readouterr().err


def test_verbose_shows_everything(monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "1")
    quiet = QuietFilter()
    assert quiet.filter(record(logging.INFO, "x", f"{os.sep}open_clip{os.sep}factory.py"))
    assert all(quiet.filter(record(logging.WARNING, "again")) for _ in range(3))


@pytest.mark.parametrize("argv, verbose", [(["status", "--root", "{root}"], False),
                                           (["--verbose", "status", "--root", "{root}"], True),
                                           (["status", "--verbose", "--root", "{root}"], True)])
def test_the_cli_takes_verbose_anywhere(argv, verbose, tmp_path, monkeypatch):
    from jobs.cli import main

    monkeypatch.setenv(VERBOSE_ENV, "0")  # recorded, so what the CLI sets is undone after the test
    assert main([a.format(root=tmp_path) for a in argv]) == 0
    assert (os.environ.get(VERBOSE_ENV) == "1") == verbose


def test_progress_in_a_log_file_writes_at_quarters_of_the_work_whatever_the_clock(monkeypatch, capsys):
    # a slow machine must print the lines a fast one does: the README demo's line budget counts events, not seconds
    import pipeline.execution.console as console

    clock = iter(range(0, 10**6, 1000))  # every look at the clock is 1,000 s later
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: False, raising=False)
    with console.progress_bar(total=10, desc="download", unit="shard") as progress:
        for _ in range(10):
            progress.update(1)
            progress.set_postfix(loss="0.5")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == ["download:  30% 3/10 shard", "download:  50% 5/10 shard",
                                                       "download:  80% 8/10 shard", "download: 100% 10/10 shard"]
    assert lines[-1].endswith("loss=0.5]")
    # a training bar that jumps from step 0 to the end writes its end, once, not a line a second
    progress = console.progress_bar(total=400, desc="train-prior", unit="step")
    progress.update(400)
    progress.close()
    assert len(capsys.readouterr().err.splitlines()) == 1
    # one shard (the demo's stages have a few): its end written once
    with console.progress_bar(total=1, desc="embed", unit="shard") as progress:
        progress.update(1)
    assert [line.split(" [")[0] for line in capsys.readouterr().err.splitlines()] == ["embed: 100% 1/1 shard"]
    # an iterable of unknown length: its count at the end, once
    assert list(console.progress_bar(iterable=(i for i in range(7)), desc="filter", unit="shard")) == list(range(7))
    assert capsys.readouterr().err.splitlines()[0].startswith("filter: 7 shard [")
