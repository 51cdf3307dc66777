"""The demo lets the download policy through for its own 127.0.0.1 server only, never for a user's --url-list."""

import pytest


class Stop(Exception):
    """Raised in place of the stages: the test needs only the config the demo would run them with."""


def test_the_demo_allows_private_addresses_for_its_own_server_only(tmp_path, monkeypatch):
    import jobs.stages
    from jobs import demo
    from jobs.run_config import load_run_config

    captured = {}

    def run_all(config, session, timings=None):
        captured.update(config=config, session=session)
        raise Stop

    monkeypatch.setattr(jobs.stages, "run_all", run_all)
    with pytest.raises(Stop):
        demo.main(["--root", str(tmp_path / "built-in"), "--images", "54"])
    assert captured["config"].download.allow_private_network is True
    # the config the stages run with, kept in the root (as `dalle2 <stage> --root` and `sample` read it back)
    assert load_run_config(str(tmp_path / "built-in")).download.allow_private_network is True

    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\nhttp://127.0.0.1:9/a.png,a\n")
    with pytest.raises(Stop):
        demo.main(["--root", str(tmp_path / "mine"), "--url-list", str(url_list)])
    assert captured["config"].download.allow_private_network is False
    assert load_run_config(str(tmp_path / "mine")).download.allow_private_network is False


@pytest.mark.slow
def test_a_users_list_of_loopback_urls_stops_after_download_naming_the_flag(tmp_path, image_server):
    # a new user's own server on 127.0.0.1: every row is refused (no connection is made), and the run stops after
    # the download with the reason and the flag that allows it, not as an empty sample plan stages later
    import os
    import subprocess
    import sys

    import pandas as pd

    url_list = tmp_path / "mine.csv"
    pd.DataFrame(image_server.rows(with_failures=False)[:12]).to_csv(url_list, index=False)
    dalle2 = os.path.join(os.path.dirname(sys.executable), "dalle2")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    root = tmp_path / "run"
    done = subprocess.run([dalle2, "demo", "--root", str(root), "--url-list", str(url_list)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    last = next(line for line in done.stderr.splitlines() if line.startswith("dalle2 demo: "))
    assert "download wrote none of its 12 rows" in last and "download.allow_private_network" in last, last
    assert "(12)" in last and "Traceback" not in done.stderr
    assert not (root / "train").exists()  # no training started on nothing
