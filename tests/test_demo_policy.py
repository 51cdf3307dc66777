"""The demo lets the download policy through for its own 127.0.0.1 server only, never for a user's --url-list."""

import pytest


class Stop(Exception):
    """Raised in place of the stages: the test needs only the config the demo would run them with."""


def test_the_demo_allows_private_addresses_for_its_own_server_only(tmp_path, monkeypatch):
    import jobs.stages
    from jobs import demo

    captured = {}

    def run_all(config, forwarded, timings=None):
        captured.update(config=config, forwarded=forwarded)
        raise Stop

    monkeypatch.setattr(jobs.stages, "run_all", run_all)
    with pytest.raises(Stop):
        demo.main(["--root", str(tmp_path / "built-in"), "--images", "54"])
    assert captured["config"].download.allow_private_network is True
    assert "download.allow_private_network=true" in captured["forwarded"]  # the stages' own processes too

    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\nhttp://127.0.0.1:9/a.png,a\n")
    with pytest.raises(Stop):
        demo.main(["--root", str(tmp_path / "mine"), "--url-list", str(url_list)])
    assert captured["config"].download.allow_private_network is False
    assert not any("allow_private_network" in x for x in captured["forwarded"])
