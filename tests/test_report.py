"""The dataset report: every plot drawn from the run's own files, kept and dropped rows shown with their
captions and reasons, and a page that a real browser renders with every image decoded."""

import base64
import html
import io
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from jobs.report import build_report
from pipeline.run.config import FilterConfig
from pipeline.run.layout import RunLayout
from pipeline.run.ledger import Ledger, ShardRecord
from tests.runs import make_training_run


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("report") / "run")
    # make_training_run's caption embeddings are a random map of the image's: about half fall below 0
    make_training_run(root, count=60, per_shard=20, size=32, dim=16,
                      filter_config=FilterConfig(min_similarity=0.0, duplicate_threshold=0.999, distributor="local"))
    download = Ledger(RunLayout(root), "download")
    for shard in range(3):
        download.record(ShardRecord(f"{shard:05d}", 24, 20, {"timeout": 3, "image decoding error": 1}))
    download.summarize(started=time.time())
    return root


def test_the_report_draws_each_plot_from_the_run_and_shows_kept_and_dropped_rows(report_run):
    result = build_report(report_run, samples=5)
    assert result["plots"] == ["download_outcomes", "image_sizes", "caption_lengths", "clip_similarity",
                               "duplicate_groups"]  # no training ran: no curves
    for name in result["plots"]:
        png = Image.open(os.path.join(report_run, "report", f"{name}.png"))
        assert png.size[0] > 300 and png.size[1] > 200
    with open(result["html"]) as f:
        page = f.read()
    for name in result["plots"]:
        assert f'id="{name}"' in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    for encoded in images:
        Image.open(io.BytesIO(base64.b64decode(encoded))).verify()  # every inline image is a PNG
    assert len(images) == 5 + 5 + 5  # the plots, five kept rows, five dropped rows
    assert page.count('class="note">clip similarity below 0 (similarity -') == 5  # each dropped row: its reason
    assert len(re.findall(r"<p>an? \w+ (circle|square|triangle) ", page)) == 10  # each row shown: its caption
    assert "rows in" in page and "download" in page  # the ledger table


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def chromium() -> str:
    """The browser, or the test is skipped saying why."""
    found = find_chromium()
    if not found:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; `make test` does it as root): "
                    "the report's browser check is skipped")
    return found


def render(html_path: str, out_png: str) -> str:
    """The DOM after the page loaded (and its screenshot) as headless Chromium sees them."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=5000", "--window-size=1200,4000"]
    subprocess.run(flags + [f"--screenshot={out_png}", html_path], capture_output=True, timeout=120, check=True)
    return subprocess.run(flags + ["--dump-dom", html_path], capture_output=True, text=True, timeout=120, check=True).stdout


def test_a_browser_renders_the_report_with_every_image(report_run, tmp_path):
    result = build_report(report_run, samples=5)
    dom = render(result["html"], str(tmp_path / "shot.png"))
    shutil.copy(tmp_path / "shot.png", os.path.join(report_run, "report", "screenshot.png"))
    shown = re.search(r'data-images-shown="(\d+)/(\d+)"', dom)
    assert shown and shown.group(1) == shown.group(2) == "15", shown
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).astype(int)
    # matplotlib's first colour (#1f77b4) fills the bars of the plots on screen
    blue = (abs(shot - np.array([31, 119, 180])).sum(-1) < 30).sum()
    assert blue > 5000, blue


HOSTILE = "<script>alert(1)</script> | $x$ *bold*"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A small run whose shard 00000 holds a hostile caption and one image that does not decode, and whose download
    ledger counts a hostile reason (a web server's error text)."""
    import tarfile

    root = str(tmp_path_factory.mktemp("hostile") / "run")
    make_training_run(root, count=20, per_shard=10, size=32, dim=16,
                      filter_config=FilterConfig(min_similarity=0.0, on_large_clip_drop="continue", distributor="local"))
    tar_path = RunLayout(root).shard_tar("00000")
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    hostile_key, broken_key = keys[1], keys[2]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            if member.name == f"{hostile_key}.txt":
                data = HOSTILE.encode()
            if member.name == f"{broken_key}.jpg":
                data = b"\xff\xd8 not a jpeg at all"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    download = Ledger(RunLayout(root), "download")
    for shard in range(2):
        download.record(ShardRecord(f"{shard:05d}", 12, 10, {"<img src=x onerror=alert(2)>": 2}))
    download.summarize(started=time.time())
    return root, hostile_key, broken_key


def test_hostile_captions_and_reasons_are_escaped_and_an_undecodable_image_is_skipped_and_counted(hostile_run, capsys):
    from jobs import report

    root, hostile_key, broken_key = hostile_run
    result = report.main(["--root", root, "--samples", "20"])  # the entry point `dalle2 report` runs
    with open(result["html"]) as f:
        page = f.read()
    assert page.count("<script") == 1  # the page's own image counter, nothing from the data
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page  # the ledger table's reason
    assert html.escape(HOSTILE, quote=False) in page  # the caption, shown as text
    skipped = re.search(r'<p class="note" id="undecodable">(\d+) of the rows picked have an image that does not decode '
                        r"and are not shown: ([^<]*)</p>", page)
    assert skipped and skipped.groups() == ("1", broken_key), skipped
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(result["plots"]) + 20 - 1  # every row but the broken one, beside the plots
    assert hostile_key in page and f'alt="{broken_key}"' not in page


def test_the_demos_markdown_report_escapes_every_cell():
    from jobs.demo_report import render_report

    match = {"color_match": 1.0, "shape_match": 1.0, "position_match": 1.0, "all_match": 1.0, "chance_color": 0.2,
             "chance_shape": 0.3, "chance_position": 0.3, "chance_all": 0.01}
    page = render_report({"seconds": 1, "stages": {"download": "ran | <b>x</b>\n| injected | row |"}, "seconds_per_stage": {},
                          "status": {"download": {"rows_in": 3, "written": 1, "failed": 2,
                                                  "failed_by_reason": {HOSTILE + "\nsecond line": 2}}},
                          "prompt_match": match, "prompts": []})
    row = next(line for line in page.splitlines() if line.startswith("| download"))
    assert re.sub(r"\\\|", "", row).count("|") == 4 and "&lt;b&gt;x&lt;/b&gt;" in row  # three cells, whatever the text
    assert "injected" in row and not any(line.startswith("| injected") for line in page.splitlines())
    line = next(line for line in page.splitlines() if line.startswith("- download"))
    assert "&lt;script&gt;" in line and "\\$x\\$" in line and "\\*bold\\*" in line and line.endswith("second line': 2}")
    assert "<script>" not in page and "<b>" not in page
