"""The embed stage: CLIP embeddings of every image and caption, streamed through Ray Data.

    shards --map_batches(decode_shards, CPU tasks: read a tar, decode to CLIP's size)--> uint8 pixels
           --map_batches(ClipEmbedder, actor pool; GPUs on a cluster)--> embeddings
           --map_batches(write_parts, CPU tasks)--> per-shard scratch parts --> driver: names and counts
Once a shard's end row (carrying the number of samples read) and all of those samples are in parts, a
Ray task writes its outputs (clip-retrieval's files, the aligned files, then its ledger record): see
embed_writer. Corrupt images, non-finite embeddings, bad and duplicate keys are skipped and counted;
an unreadable shard fails alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterator, Optional

import numpy as np

from pipeline.run.config import ClipSource, EmbedConfig, RayConfig
from pipeline.run.layout import CAPTION, EMBED, KEY, SHARD, RunLayout
from pipeline.formats.queries import ShardInfo, complete_shards
from pipeline.run.ledger import Ledger
from pipeline.formats.shard_reader import ShardReadError, image_of, iter_samples
from pipeline.run.storage import remove

log = logging.getLogger(__name__)

STAGE = EMBED
ERROR = "error"
SHARD_FAILED = "shard failed: "  # prefix of the error of the marker row an unreadable shard emits
SHARD_END = "shard end: "  # the error of the row that follows a shard's last sample: "shard end: <samples read>"
# batches a CLIP actor works on at once: one tokenizes its captions (Python: a fifth of a tiny CLIP's time on CPU,
# measured) while the other runs the model, which runs one batch at a time (ClipEmbedder.model_lock), so a GPU holds
# one batch of activations; Ray Data then queues up to twice as many blocks an actor (in the object store)
ACTOR_CALLS = 2
READ_AHEAD = 32  # rows a decode task's reader thread reads ahead of its decoding (their image bytes are held)


def read_shard(item: dict) -> Iterator[dict]:
    """Rows (shard, key, image bytes, caption, error) of one tar; a marker row if the tar is unreadable."""
    shard, tar = item[SHARD], item["tar"]
    read = 0
    try:
        for key, fields in iter_samples(tar):
            image = image_of(fields)
            caption = fields.get("txt", b"").decode("utf-8", errors="replace")
            read += 1
            yield {SHARD: shard, KEY: key, "image": image or b"", CAPTION: caption,
                   ERROR: "" if image else "no image in sample"}
    except Exception as error:  # noqa: BLE001 - reported as the shard's failure, the others go on
        # The first line, the kind of damage from the reader's fixed vocabulary (or the exception's type), keys the
        # stage's count of failed rows; the detail (the tar's bytes and offsets) follows, kept in the ledger's
        # failed-shard error and the log only.
        kind, reason = (error.kind, error.reason) if isinstance(error, ShardReadError) else (type(error).__name__, error)
        log.warning("embed: shard %s unreadable (%s): %s: %s", shard, kind, tar, reason)
        yield {SHARD: shard, KEY: "", "image": b"", CAPTION: "",
               ERROR: f"{SHARD_FAILED}unreadable shard: {kind}\n{tar}: {reason}"}
        return
    yield {SHARD: shard, KEY: "", "image": b"", CAPTION: "", ERROR: f"{SHARD_END}{read}"}


def decode_rows(rows: list[dict], image_size: int) -> dict[str, np.ndarray]:
    """A block of read rows with their images decoded to CLIP's input size as uint8 (no torch here, so a decode
    task starts fast); an undecodable image gets an error and zero pixels."""
    from pipeline.formats.decode import decode_resized

    errors = [row[ERROR] for row in rows]
    pixels = np.zeros((len(rows), image_size, image_size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        if errors[i]:
            continue
        try:
            pixels[i] = decode_resized(row["image"], image_size)
        except Exception as error:  # noqa: BLE001 - a corrupt image is skipped and counted
            errors[i] = f"corrupt image: {type(error).__name__}"
    block = {column: np.asarray([row[column] for row in rows], dtype=object) for column in (SHARD, KEY, CAPTION)}
    return {**block, ERROR: np.asarray(errors, dtype=object), "pixels": pixels}


class _Budget:
    """Seconds left to read and decode a shard, spent only while the task works on it: the time it waits for
    CLIP to take its blocks (Ray Data's backpressure holds a generator at its yield) is not the shard's fault."""

    def __init__(self, seconds: Optional[float]):
        self.left, self.since = seconds, time.monotonic()

    def remaining(self) -> Optional[float]:
        return None if self.left is None else max(0.0, self.left - (time.monotonic() - self.since))

    def pause(self) -> None:
        self.left = self.remaining()

    def resume(self) -> None:
        self.since = time.monotonic()


def _read_ahead(rows: Iterator[dict], budget: _Budget) -> Iterator[Optional[dict]]:
    """`rows` read by a thread of their own, so that a read blocked for ever (a stalled object store, a FIFO that
    never delivers) cannot hold the task past its budget; yields None when the budget runs out first. The
    thread is then told to stop; one blocked inside a read stays blocked (threads cannot be killed), a daemon
    holding one open file, and the task goes on to its next shard."""
    ahead: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    stop, done = threading.Event(), object()

    def pump() -> None:
        try:
            for row in rows:
                ahead.put(row)
                if stop.is_set():
                    return
        finally:
            if not stop.is_set():
                ahead.put(done)

    threading.Thread(target=pump, daemon=True, name="embed-read-shard").start()
    try:
        while True:
            try:
                row = ahead.get(timeout=budget.remaining())
            except queue.Empty:
                yield None
                return
            if row is done:
                return
            yield row
    finally:  # unblock a pump waiting on a full queue, so that it sees `stop` and closes the tar
        stop.set()
        while not ahead.empty():
            ahead.get_nowait()


def decode_shards(batch: dict[str, np.ndarray], image_size: int, block_rows: int,
                  shard_timeout: Optional[float] = None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task over shards: each one read and decoded in the same task (the tar's bytes never cross the
    object store), sent on `block_rows` rows at a time; its end (or failure) row comes last. A shard not read
    and decoded within `shard_timeout` seconds fails with a marker row naming the deadline."""
    for shard, tar in zip(batch[SHARD].tolist(), batch["tar"].tolist()):
        rows: list[dict] = []
        budget = _Budget(shard_timeout)
        for row in _read_ahead(read_shard({SHARD: shard, "tar": tar}), budget):
            if row is not None:
                rows.append(row)
                if len(rows) < block_rows and not row[ERROR].startswith((SHARD_END, SHARD_FAILED)):
                    continue
                block, rows = decode_rows(rows, image_size), []
            if row is None or budget.remaining() == 0:  # the read, or the decode, ran the budget out
                log.error("embed: shard %s not read and decoded within embed.shard_timeout", shard)
                yield decode_rows([{SHARD: shard, KEY: "", "image": b"", CAPTION: "",
                                    ERROR: f"{SHARD_FAILED}{tar} not read and decoded within embed.shard_timeout "
                                           f"({shard_timeout:g} s)"}], image_size)
                break
            budget.pause()
            yield block
            budget.resume()


class ClipEmbedder:
    """Ray Data actor: loads CLIP once, embeds batches of uint8 pixels and captions; thread-safe (ACTOR_CALLS)."""

    def __init__(self, source: dict, use_gpu: bool, autocast: str, output_dtype: str, torch_threads: Optional[int] = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from dalle2.clip import load_clip

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.clip = load_clip(**ClipSource(**source).model_dump()).to(self.device).eval()
        self.autocast, self.output_dtype = autocast, np.dtype(output_dtype)
        self.model_lock = threading.Lock()
        self.loaded_at = time.time()  # for the stage's start-up figures

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from einops import rearrange

        from dalle2.clip import clip_preprocess
        from dalle2.precision import autocast_context

        ok = np.asarray([not e for e in batch[ERROR]], dtype=bool)
        dim = self.clip.embed_dim
        img_emb = np.zeros((len(ok), dim), dtype=self.output_dtype)
        text_emb = np.zeros((len(ok), dim), dtype=self.output_dtype)
        if ok.any():
            with torch.inference_mode(), autocast_context(self.device, self.autocast):
                # outside the lock, beside the other call's forward: the tokenizer, and the uint8 [B, H, W, 3]
                # pixels from the decode tasks
                tokens = self.clip.tokenize([str(c) for c in batch[CAPTION][ok]])
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device)
                with self.model_lock:  # scaled and normalised on the actor's device
                    pixels = rearrange(pixels, "b h w c -> b c h w").float() / 255
                    pixels = clip_preprocess(pixels, self.clip.image_size, self.clip.mean, self.clip.std)
                    img_emb[ok] = self.clip.embed_preprocessed(pixels).float().cpu().numpy()
                    text_emb[ok] = self.clip.embed_text(tokens, trim_padding=True).text_embed.float().cpu().numpy()
        # NaN / inf (a broken model, or float16 overflow) must never reach reorder or training
        finite = np.isfinite(img_emb).all(axis=1) & np.isfinite(text_emb).all(axis=1)
        errors = np.asarray([e if (e or finite[i]) else "non-finite embedding" for i, e in enumerate(batch[ERROR])],
                            dtype=object)
        img_emb[~finite], text_emb[~finite] = 0, 0
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out[ERROR] = errors
        out["img_emb"], out["text_emb"] = img_emb, text_emb
        out["embedded_at"] = np.full(len(ok), time.time())  # for the stage's steady-rate figure
        out["loaded_at"] = np.full(len(ok), self.loaded_at)
        return out


def fingerprint(config: EmbedConfig) -> dict:
    """What a run's embeddings are made with: the CLIP (a trained checkpoint's path included) and the dtype."""
    return {"clip": config.clip.model_dump(mode="json"), "output_dtype": config.output_dtype}


def plan_embed(layout: RunLayout, shards: list[str]) -> dict[str, ShardInfo]:
    """What the download says of each of `shards` not embedded yet: its ledger records (read concurrently) give
    each shard's samples and slots; only shards made elsewhere (no record) have their parquet read."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.formats.queries import LOST_IN_IMG2DATASET, run_index_width, shard_info
    from pipeline.run.layout import DOWNLOAD

    done = Ledger(layout, STAGE).done()
    todo = [s for s in shards if s not in done]
    digits = run_index_width(layout)
    records = Ledger(layout, DOWNLOAD).records_of(todo) if digits else {}
    infos = {s: ShardInfo(s, layout.shard_tar(s), r.written, r.rows_in - r.failed.get(LOST_IN_IMG2DATASET, 0), digits)
             for s, r in records.items()}
    unrecorded = [s for s in todo if s not in records]
    with ThreadPoolExecutor(max_workers=16) as pool:
        infos.update(zip(unrecorded, pool.map(lambda s: shard_info(layout, s, digits), unrecorded)))
    return {s: infos[s] for s in todo}


def quiet_ray_data() -> None:
    """Ray Data's own progress off, and its notes kept to its log file, unless the user asked for Ray's output:
    the stage shows one bar of its own, and in a log file Ray Data writes a dozen lines every 10 s (a slow
    machine's log grew with its wall time)."""
    import ray

    from pipeline.execution.console import verbose

    if verbose():
        return
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def run_embed(config: EmbedConfig, root: str, ray_config: Optional[RayConfig] = None) -> dict:
    """Embed every downloaded shard that is not embedded yet; returns the stage summary."""
    import ray

    from dalle2.clip_spec import clip_input_spec, clip_model_config, text_tower_unsupported

    from pipeline.execution.distributor import ensure_ray
    from pipeline.stages.embed.writer import ShardTracker, write_parts

    started = time.time()
    layout = RunLayout(root)
    ledger = Ledger(layout, STAGE)
    shards = complete_shards(layout)
    if not shards:
        raise FileNotFoundError(f"no downloaded shards under {layout.shards} (no *_stats.json): run download first")
    ledger.check_fingerprint(fingerprint(config),
                             remedy=f"embeddings of two CLIPs must not mix: set embed.clip back, or delete "
                                    f"{layout.embeddings}, {layout.aligned} and {layout.ledger_dir(STAGE)}* to re-embed")
    infos = plan_embed(layout, shards)
    todo = list(infos)
    marks = {"planning_s": time.time()}
    log.info("embed: %d shards, %d to do", len(shards), len(todo))
    failures: dict[str, str] = {}
    timing: dict = {}
    if todo:
        if config.clip.checkpoint:  # reads the checkpoint's config: imports torch, not open_clip
            from dalle2.clip import checkpoint_model_name

            model_name = checkpoint_model_name(config.clip.checkpoint)
        else:
            model_name = config.clip.model_name
        unsupported = text_tower_unsupported(model_name)
        if unsupported:  # refused here, not by every CLIP actor after its model loads
            raise ValueError(f"embed.clip: {model_name}: {unsupported}; the embed stage embeds captions with open_clip's "
                             "own text transformer pooled at its end-of-text token (ViT-B-32, ViT-L-14, ViT-H-14, ...)")
        image_size, _, _ = clip_input_spec(model_name)
        embed_dim = int(clip_model_config(model_name)["embed_dim"])
        ensure_ray(ray_config, config.resources, "embed.resources")
        quiet_ray_data()
        marks["ray_s"] = time.time()
        placed = {"resources": config.resources} if config.resources else {}  # on the node type that embeds
        items = [{SHARD: s, "tar": infos[s].tar} for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # a task per shard reads and decodes it; capped, or a big cluster would open a tar per free CPU at once
        ds = ds.map_batches(decode_shards, fn_kwargs=dict(image_size=image_size, block_rows=config.decode_block_rows,
                                                          shard_timeout=config.shard_timeout),
                            batch_size=1, num_cpus=config.decode_cpus,
                            compute=ray.data.TaskPoolStrategy(size=config.decode_concurrency), **placed)
        ds = ds.map_batches(
            ClipEmbedder, batch_size=config.batch_size,
            fn_constructor_kwargs=dict(source=config.clip.model_dump(), use_gpu=config.num_gpus_per_actor > 0,
                                       autocast=config.autocast, output_dtype=config.output_dtype,
                                       torch_threads=config.torch_threads),
            num_cpus=config.cpus_per_actor, num_gpus=config.num_gpus_per_actor or None,
            compute=ray.data.ActorPoolStrategy(size=config.actors, max_concurrent_calls_per_actor=ACTOR_CALLS,
                                               enable_true_multi_threading=True), **placed,
        )
        # CLIP's blocks gathered back to decode-sized ones: fewer, larger scratch parts
        ds = ds.map_batches(write_parts, fn_kwargs=dict(root=root, output_dtype=config.output_dtype),
                            batch_size=config.decode_block_rows, num_cpus=config.decode_cpus,
                            compute=ray.data.TaskPoolStrategy(size=config.write_concurrency), **placed)
        tracker = ShardTracker(root, infos, config, embed_dim)
        log.info("embed: pipeline started (%d decode tasks, %d CLIP actors)", config.decode_concurrency, config.actors)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):  # part names and counts only
            tracker.add(batch)
        failures = tracker.close()
        timing = tracker.steady_timing(started, marks)
    for shard, error in failures.items():  # rows: what the parquet lists, else the samples read (if known)
        info = infos[shard]
        ledger.fail(shard, rows=info.expected if info.expected is not None else tracker.ends.get(shard, 0), error=error)
    if todo and not failures:
        remove(layout.scratch(STAGE), recursive=True)
    summary = ledger.summarize(started, timing)
    return summary
