"""Placing stages by custom resources (cluster.yaml's cpu_pool / gpu_pool): checked at start, never a silent hang."""

import logging

import pytest

from jobs.config_io import ConfigError, load_config
from jobs.run_config import RunConfig


def test_reserved_resource_names_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"download.resources.*\['CPU'\] have fields of their own"):
        load_config(RunConfig, None, ["download.resources={CPU: 2}"])
    with pytest.raises(ConfigError, match=r"train_prior.resources_per_worker"):
        load_config(RunConfig, None, ["train_prior.resources_per_worker={gpu_pool: -1}"])


def test_the_cluster_example_places_cpu_work_and_gpu_work_on_their_pools():
    import os

    config = load_config(RunConfig, os.path.join(os.path.dirname(__file__), "..", "configs", "cluster-run.yaml"))
    assert set(config.download.resources) == set(config.filter.resources) == {"cpu_pool"}
    assert set(config.embed.resources) == set(config.train_prior.resources_per_worker) == {"gpu_pool"}
    assert config.custom_resources() == {"cpu_pool", "gpu_pool"}


def test_missing_resources_fail_at_once_on_an_embedded_ray_and_warn_on_a_cluster(ray_local, monkeypatch):
    from pipeline.execution.session import RaySession

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    with pytest.raises(ValueError, match=r"embed.resources asks for \{'gpu_pool': 0.5\}, which no node .* has"):
        RaySession(embedded=True).require_resources({"gpu_pool": 0.5}, "embed.resources")
    cluster = RaySession(embedded=False)
    collect = Collect()
    logging.getLogger("pipeline.execution.session").addHandler(collect)
    try:
        cluster.require_resources({"gpu_pool": 0.5}, "embed.resources")
    finally:
        logging.getLogger("pipeline.execution.session").removeHandler(collect)
    assert any("waits until a node that has them joins" in m for m in collect.messages)
    cluster.require_resources({"CPU": 1}, "download.resources")  # what the cluster has passes quietly
