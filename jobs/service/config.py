"""The `serve` section of a run's config: where the service listens, its replicas, and what one request may ask."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from dalle2.configs import StrictModel
from pipeline.run.config import Resources


class ServeConfig(StrictModel):
    """`dalle2 serve`: Ray Serve replicas of the run's model and index, and the limits every request is held to."""

    host: str = "127.0.0.1"  # 0.0.0.0 on a cluster's head node serves beyond it (put a proxy with TLS in front)
    port: int = Field(default=8000, ge=1, le=65535)
    min_replicas: PositiveInt = 1
    max_replicas: PositiveInt = 2  # the autoscaler adds replicas up to this while requests wait
    cpus_per_replica: PositiveFloat = 1.0
    num_gpus_per_replica: float = Field(default=0, ge=0, le=8)  # a cluster: 1, and resources {gpu_pool: 0.001}
    resources: Resources = {}  # custom resources of a replica (cluster.yaml's node pools)
    max_ongoing_requests: PositiveInt = 2  # requests one replica holds at once (it samples one at a time)
    max_queued_requests: PositiveInt = 32  # requests waiting for a replica; beyond, 503
    request_timeout_s: PositiveFloat = 300.0  # a request not answered by then gets 408
    max_images: int = Field(default=16, ge=1, le=256)  # images one request may ask for (n, or frames)
    max_steps: int = Field(default=100, ge=1, le=1000)  # sampling steps one request may ask for
    max_candidates: int = Field(default=8, ge=1, le=64)  # prior candidates per image one request may ask for
    max_prompt_chars: int = Field(default=500, ge=1, le=10_000)
    max_body_bytes: int = Field(default=8 * 2**20, ge=1024, le=256 * 2**20)  # a request's body (an image in base64)
    # per client address (as each replica sees it: a proxy in front is one client) and replica; beyond, 429
    requests_per_minute: PositiveInt = 60
    max_hits: int = Field(default=32, ge=1, le=1000)  # search results one request may ask for

    @model_validator(mode="after")
    def _replicas_in_order(self) -> "ServeConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"serve.max_replicas ({self.max_replicas}) is below serve.min_replicas ({self.min_replicas})")
        return self
