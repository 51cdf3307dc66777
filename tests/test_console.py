"""Output a person can follow: open_clip's chatter dropped, a repeated warning shown once and counted, Ray's
worker output kept out of the terminal unless asked for."""

import logging
import os

import pytest

from pipeline.console import VERBOSE_ENV, QuietFilter


def record(level: int, message: str, pathname: str = "/x/pipeline/embed.py", name: str = "pipeline.embed"):
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
