"""The service: one Ray Serve deployment holding a run's model (jobs/generation.py) and data index (jobs/search.py)
behind a FastAPI app: the page, and a JSON API to generate, vary, interpolate and search.

    POST /api/generate     {prompt, n, seed, negative_prompt?, <sampling>}         -> {images: [data URLs], sampling}
    POST /api/vary         {source: {image | key}, n, seed, <sampling>}            -> {images, sampling}
    POST /api/interpolate  {start: {prompt | image | key}, end: ..., frames, seed}  -> {images, sampling}
    POST /api/search       {source: {prompt | image | key}, k}                     -> {hits: [{key, caption, similarity, image}]}
    GET  /api/image/{key}  a training row's image;  GET /api/info  the run, its defaults and the limits

<sampling>: prior_cond_scale, decoder_cond_scale, candidates, sampler, steps (each the run's when left out). An image
is a data URL (PNG, JPEG or WebP in base64); a key names a row of the index. Bad input gets a 4xx and the reason.
"""


import asyncio
import base64
import binascii
import io
import logging
import re
from importlib import resources
from typing import Literal, Optional

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from .config import ServeConfig
from .limits import BodyLimit, RateLimit, RateLimited

log = logging.getLogger(__name__)

DATA_URL = re.compile(r"data:image/(png|jpeg|webp);base64,([A-Za-z0-9+/=\s]+)")
KEY = r"^[0-9]{1,32}$"
MEDIA = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp"}
# the page's own script only; images from data URLs and this origin; nothing else loads or runs
PAGE_POLICY = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'"


class StrictBody(BaseModel):
    """A request body: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Source(StrictBody):
    """What to start from: exactly one of a prompt, an image (a data URL) or a training row's key."""

    prompt: Optional[str] = Field(default=None, min_length=1)
    image: Optional[str] = None
    key: Optional[str] = Field(default=None, pattern=KEY)

    @model_validator(mode="after")
    def _exactly_one(self) -> "Source":
        given = [name for name in ("prompt", "image", "key") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, image or key (got {given or 'none'})")
        return self


class Sampling(StrictBody):
    prior_cond_scale: Optional[float] = Field(default=None, ge=0, le=30)
    decoder_cond_scale: Optional[float] = Field(default=None, ge=0, le=30)
    candidates: Optional[int] = Field(default=None, ge=1, le=64)
    sampler: Optional[Literal["ddim", "ddpm", "dpmpp"]] = None
    steps: Optional[int] = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    def overrides(self) -> dict:
        fields = ("prior_cond_scale", "decoder_cond_scale", "candidates", "sampler", "steps")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


class Generate(Sampling):
    prompt: str = Field(min_length=1)
    negative_prompt: Optional[str] = Field(default=None, min_length=1)
    n: int = Field(default=4, ge=1)


class Vary(Sampling):
    source: Source
    n: int = Field(default=4, ge=1)


class Interpolate(Sampling):
    start: Source
    end: Source
    frames: int = Field(default=6, ge=2)


class Search(StrictBody):
    source: Source
    k: int = Field(default=8, ge=1)


api = FastAPI(title="dalle2", docs_url=None, redoc_url=None, openapi_url=None)


def png_data_url(array) -> str:
    """A uint8 image [H, W, 3] as a PNG data URL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@serve.deployment
@serve.ingress(api)
class RunService:
    """A replica: the run's model and index loaded once, requests sampled one at a time."""

    def __init__(self, root: str, settings: dict, device: str = "cpu"):
        from ..generation import RunModel

        from concurrent.futures import ThreadPoolExecutor

        self.settings = ServeConfig(**settings)
        # before the app runs (this replica's process holds its own `api`): the rate first, then the body's size
        api.add_middleware(BodyLimit, max_bytes=self.settings.max_body_bytes)
        api.add_middleware(RateLimited, limit=RateLimit(self.settings.requests_per_minute))
        self.model = RunModel(root, device)
        self.root, self.search, self.rows = root, None, {}
        try:
            from ..search import RunSearch

            self.search = RunSearch(root, device, clip=self.model.model.clip)
            self.rows = {key: shard for _, rows in self.search.index.parts  # a training row's key -> its shard
                         for key, shard in zip(rows["key"], rows["shard"])}
        except FileNotFoundError as error:  # generation works without an index; search says how to build one
            self.no_index = str(error)
            log.warning("%s", error)
        # one thread samples: a request cancelled (its client gone, or timed out) still finishes its sampling there,
        # so the model never runs twice at once; work waiting there is bounded
        self.sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampling")
        self.waiting = 0

    # ---- checks ----------------------------------------------------------------------------------

    def check(self, sampling: Sampling, images: int = 0, prompts: tuple = ()) -> dict:
        s = self.settings
        if images > s.max_images:
            raise HTTPException(400, f"{images} images asked for, at most {s.max_images} a request (serve.max_images)")
        if sampling.candidates is not None and sampling.candidates > s.max_candidates:
            raise HTTPException(400, f"candidates {sampling.candidates} is over the {s.max_candidates} allowed "
                                     "(serve.max_candidates)")
        if sampling.steps is not None and sampling.steps > s.max_steps:
            raise HTTPException(400, f"steps {sampling.steps} is over the {s.max_steps} allowed (serve.max_steps)")
        for prompt in prompts:
            if prompt is not None and len(prompt) > s.max_prompt_chars:
                raise HTTPException(400, f"a prompt of {len(prompt)} characters, at most {s.max_prompt_chars} "
                                         "(serve.max_prompt_chars)")
        try:
            return self.model.settings(sampling.overrides())
        except ValueError as error:
            raise HTTPException(400, f"sampling settings: {error}") from None

    def index_needed(self):
        if self.search is None:
            raise HTTPException(409, self.no_index)
        return self.search

    def image_of(self, source: Source):
        """An image source as pixels [3, H, W] in [0, 1]; 400 for a bad upload, 404 for an unknown key."""
        from ..generation import ImageError, decode_image

        if source.image is not None:
            found = DATA_URL.fullmatch(source.image.strip())
            if not found:
                raise HTTPException(400, "image: not a data URL of a PNG, JPEG or WebP image in base64")
            try:
                data = base64.b64decode(re.sub(r"\s", "", found.group(2)), validate=True)
            except binascii.Error:
                raise HTTPException(400, "image: its base64 does not decode") from None
            name = "image"
        else:
            data, name = self.row_image(source.key), f"key {source.key}"
        try:
            return decode_image(data, name)
        except ImageError as error:
            raise HTTPException(400, str(error)) from None

    def row_image(self, key: str) -> bytes:
        search = self.index_needed()
        if key not in self.rows:
            raise HTTPException(404, f"key {key} is not a row of the index")
        shard = self.rows[key]
        data = search.images.image(shard, key)
        if data is None:
            raise HTTPException(404, f"key {key}: its shard {shard} no longer holds its image")
        return data

    async def run(self, fn, *args):
        """Sample on the replica's one sampling thread; 503 when more than max_ongoing_requests wait there (work of
        cancelled requests included); ValueError is the caller's 400."""
        if self.waiting >= self.settings.max_ongoing_requests:
            raise HTTPException(503, "the replica is busy: try again shortly")
        self.waiting += 1
        future = asyncio.get_running_loop().run_in_executor(self.sampler, fn, *args)
        future.add_done_callback(lambda _: setattr(self, "waiting", self.waiting - 1))
        try:
            return await asyncio.shield(future)
        except ValueError as error:
            raise HTTPException(400, str(error)) from None

    async def pixels_of(self, source: Source):
        """image_of off the event loop (base64, decoding, a shard's first read)."""
        return await asyncio.to_thread(self.image_of, source)

    def images(self, images, used) -> dict:
        from dalle2.text_to_image import to_uint8

        return {"images": [png_data_url(a) for a in to_uint8(images)], "sampling": used.model_dump(mode="json")}

    async def endpoint(self, source: Source):
        return source.prompt if source.prompt is not None else await self.pixels_of(source)

    # ---- the API ---------------------------------------------------------------------------------

    @api.post("/api/generate")
    async def generate(self, body: Generate) -> dict:
        used = self.check(body, body.n, (body.prompt, body.negative_prompt))
        images = await self.run(self.model.text_to_image, [body.prompt], body.n, used, body.seed, body.negative_prompt)
        return self.images(images, used)

    @api.post("/api/vary")
    async def vary(self, body: Vary) -> dict:
        used = self.check(body, body.n)
        if body.source.prompt is not None:
            raise HTTPException(400, "source: variations start from an image or a key, not a prompt")
        image = await self.pixels_of(body.source)
        images = await self.run(self.model.variations, [image], body.n, used, body.seed)
        return self.images(images, used)

    @api.post("/api/interpolate")
    async def interpolate(self, body: Interpolate) -> dict:
        used = self.check(body, body.frames, (body.start.prompt, body.end.prompt))
        start, end = await self.endpoint(body.start), await self.endpoint(body.end)
        images = await self.run(self.model.interpolate, start, end, body.frames, used, body.seed)
        return self.images(images, used)

    @api.post("/api/search")
    async def search_rows(self, body: Search) -> dict:
        search = self.index_needed()
        if body.k > self.settings.max_hits:
            raise HTTPException(400, f"k {body.k} is over the {self.settings.max_hits} allowed (serve.max_hits)")
        self.check(Sampling(), prompts=(body.source.prompt,))
        if body.source.prompt is not None:
            hits = await self.run(search.by_text, [body.source.prompt], body.k)
        else:
            image = await self.pixels_of(body.source)
            hits = await self.run(search.by_image, image[None], body.k)
        return {"hits": [{"key": h.key, "caption": h.caption, "similarity": round(h.similarity, 4),
                          "image": f"/api/image/{h.key}"} for h in hits[0]]}

    @api.get("/api/image/{key}")
    async def row_image_response(self, key: str) -> Response:
        if not re.fullmatch(KEY, key):
            raise HTTPException(400, "key: digits only")
        data = await asyncio.to_thread(self.row_image, key)
        media = next((kind for magic, kind in MEDIA.items() if data.startswith(magic)), None)
        if media is None:
            raise HTTPException(404, f"key {key}: its shard holds no PNG, JPEG or WebP image for it")
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600",
                                                         "X-Content-Type-Options": "nosniff"})

    @api.get("/api/info")
    async def info(self) -> dict:
        return {"run": self.root.rstrip("/").rsplit("/", 1)[-1], "image_size": self.model.image_size,
                "index_rows": len(self.search.index) if self.search else 0,
                "sampling": self.model.settings().model_dump(mode="json"),
                "limits": {name: getattr(self.settings, name) for name in
                           ("max_images", "max_steps", "max_candidates", "max_prompt_chars", "max_body_bytes",
                            "requests_per_minute", "max_hits")}}

    # ---- the page --------------------------------------------------------------------------------

    @api.get("/")
    async def page(self) -> HTMLResponse:
        html = resources.files("jobs.service").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})

    @api.get("/page.js")
    async def script(self) -> Response:
        js = resources.files("jobs.service").joinpath("page.js").read_text(encoding="utf-8")
        return Response(js, media_type="text/javascript", headers={"X-Content-Type-Options": "nosniff"})


def service(root: str, settings: ServeConfig):
    """The bound application: RunService with the run's replica settings (autoscaling between min and max)."""
    device = "cuda" if settings.num_gpus_per_replica > 0 else "cpu"
    options = dict(
        autoscaling_config={"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
                            "target_ongoing_requests": 1},
        max_ongoing_requests=settings.max_ongoing_requests, max_queued_requests=settings.max_queued_requests,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": settings.num_gpus_per_replica,
                           "resources": dict(settings.resources)},
    )
    return RunService.options(**options).bind(root, settings.model_dump(mode="json"), device)


def app(args: dict):
    """`serve run jobs.service.app:app root=RUN`: the run's service with its config's `serve` settings."""
    from ..run_config import load_run_config

    run = load_run_config(args["root"])
    return service(run.root, run.serve)
