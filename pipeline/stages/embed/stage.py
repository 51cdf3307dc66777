"""The embed stage: CLIP embeddings of every image and caption, streamed through Ray Data.

    shards --map_batches(decode_shards, CPU tasks: read a tar, decode to CLIP's size)--> uint8 pixels    read.py
           --map_batches(ClipEmbedder, actor pool; GPUs on a cluster)--> embeddings                     embedder.py
           --map_batches(write_parts, CPU tasks)--> per-shard scratch parts --> driver: part rows       writer.py
Every row says its kind (rows.py): a sample, a shard's end (the samples read) or its failure. Once a shard's end
row and all of those samples are in parts (tracker.py), a Ray task, at most embed.write_concurrency at once
(the distributor's BoundedTasks), writes its outputs (clip-retrieval's files, the aligned files, then its
ledger record: writer.py). Corrupt images, non-finite embeddings, bad and duplicate keys are skipped and
counted; an unreadable shard fails alone. The start-up and rate figures: timing.py.
"""

from __future__ import annotations

import logging

from dalle2.faults import crash_point
from pipeline.execution.session import RaySession, require_session
from pipeline.formats.queries import ShardInfo, complete_shards
from pipeline.run.config import EmbedConfig
from pipeline.run.layout import RunLayout
from pipeline.run.ledger import Ledger
from pipeline.run.storage import remove
from pipeline.stages.embed.embedder import ACTOR_CALLS, ClipEmbedder
from pipeline.stages.embed.read import decode_shards
from pipeline.stages.embed.rows import SAMPLE, SHARD, TAR, part_rows
from pipeline.stages.embed.timing import Clock
from pipeline.stages.embed.tracker import ShardTracker
from pipeline.stages.embed.writer import STAGE, finish_shard, fingerprint, write_parts

__all__ = ["STAGE", "fingerprint", "plan_embed", "run_embed"]  # fingerprint: writer.py's, which records it

log = logging.getLogger(__name__)


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


def run_embed(config: EmbedConfig, root: str, session: RaySession) -> dict:
    """Embed every downloaded shard that is not embedded yet; returns the stage summary."""
    require_session(session, "run_embed")
    import ray

    from dalle2.clip_spec import clip_input_spec, clip_model_config, text_tower_unsupported

    clock = Clock()
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
    clock.mark("planning_s")
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
        session.connect(config.resources, "embed.resources")
        quiet_ray_data()
        clock.mark("ray_s")
        placed = {"resources": config.resources} if config.resources else {}  # on the node type that embeds
        items = [{SHARD: s, TAR: infos[s].tar} for s in todo]
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
        tracker = ShardTracker(infos)
        log.info("embed: pipeline started (%d decode tasks, %d CLIP actors)", config.decode_concurrency, config.actors)
        failures = drive(ds, tracker, clock, root, config, embed_dim)
        timing = clock.summary()
    for shard, error in failures.items():  # rows: what the parquet lists, else the samples read (if known)
        info = infos[shard]
        ledger.fail(shard, rows=info.expected if info.expected is not None else tracker.samples_read(shard), error=error)
    if todo and not failures:
        remove(layout.scratch(STAGE), recursive=True)
    summary = ledger.summarize(clock.started, timing)
    return summary


def drive(ds, tracker: ShardTracker, clock: Clock, root: str, config: EmbedConfig, embed_dim: int) -> dict[str, str]:
    """The driver's loop: the part rows (names and counts only) into the tracker, a finish task for each shard it
    finds ready (the parts it lists), and each task's outcome back to it; {shard: error} of the failed shards."""
    import ray

    from pipeline.execution.console import progress_bar
    from pipeline.execution.distributor import BoundedTasks

    remote = ray.remote(finish_shard).options(num_cpus=config.decode_cpus, max_retries=2, retry_exceptions=True,
                                              resources=config.resources)
    # crash point: the driver lost with shards being written and parts in scratch
    finishing = BoundedTasks(remote, config.write_concurrency, on_start=lambda _: crash_point("embed.after_submit"))
    started = clock.start_shards()
    progress = progress_bar(total=len(tracker.infos), desc="embed", unit="shard")  # shards written or failed

    def advance() -> None:
        if tracker.ended() > progress.n:
            progress.update(tracker.ended() - progress.n)

    def settle(wait: float | None, every: bool) -> None:
        for done in finishing.wait(wait, every):
            tracker.finish(done.key, done.error)
        advance()

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for row in part_rows(batch):
            counted = tracker.add(row) and row.kind == SAMPLE  # False: a replay, of a shard already released
            clock.saw(row, counted)
            for shard, parts in tracker.take_ready():
                finishing.submit(shard, root, config, tracker.infos[shard], embed_dim, parts, started)
        settle(0, every=True)
    while finishing:
        settle(None, every=False)
    failures = tracker.close()
    advance()
    progress.close()
    return failures
