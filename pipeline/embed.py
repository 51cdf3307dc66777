"""The embed stage: CLIP embeddings of every image and caption, streamed through Ray Data.

    shards --flat_map(read_shard)--> rows --map_batches(preprocess_batch, CPU tasks)--> pixels
           --map_batches(ClipEmbedder, actor pool; GPUs on a cluster)--> embeddings --> driver
The driver assembles rows per shard and writes a shard's outputs (clip-retrieval's files, the
aligned files, then its ledger record) once its end-of-shard row (carrying the number of samples
read) and all of those samples have arrived, so memory holds only shards in flight. Corrupt images,
non-finite embeddings, bad and duplicate keys are skipped and counted; an unreadable shard fails alone.
"""

from __future__ import annotations

import io
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .config import ClipSource, EmbedConfig, RayConfig
from .faults import crash_point
from .layout import CAPTION, INDEX, KEY, SHARD, RunLayout, parse_key, shard_id_of
from .ledger import Ledger, ShardRecord
from .shard_reader import image_of, iter_samples
from .storage import exists, list_files, read_parquet

log = logging.getLogger(__name__)

STAGE = "embed"
ERROR = "error"
SHARD_FAILED = "shard failed: "  # prefix of the error of the marker row an unreadable shard emits
SHARD_END = "shard end: "  # the error of the row that follows a shard's last sample: "shard end: <samples read>"


@dataclass
class ShardInfo:
    """What the download stage says a shard holds."""

    name: str
    tar: str
    expected: Optional[int]  # samples in the tar (successes in its parquet); None if unknown
    slots: Optional[int]  # rows of the shard's parquet (its aligned length); None if unknown
    index_digits: Optional[int]  # digits of the in-shard index of its keys; None if unknown


def complete_shards(layout: RunLayout) -> list[str]:
    """Shards whose download finished: recorded in the download ledger when the run has one (a shard whose
    download died after img2dataset's stats file is downloaded again, so it is not final yet), else, for
    plain img2dataset output, those with img2dataset's stats file (written last)."""
    stats = [url.rsplit("/", 1)[-1][: -len("_stats.json")] for url in list_files(layout.shards, "_stats.json")]
    recorded = list_files(layout.ledger_dir("download"), ".json")
    if not recorded:
        return stats
    done = {url.rsplit("/", 1)[-1][: -len(".json")] for url in recorded}
    return [shard for shard in stats if shard in done]


def shard_info(layout: RunLayout, name: str, index_digits: Optional[int]) -> ShardInfo:
    """What the shard's parquet says; the key width from the download config (`index_digits`), else from the
    parquet's keys (img2dataset keys every row, failed ones too), never from the samples that made it."""
    expected = slots = None
    if exists(layout.shard_parquet(name)):
        table = read_parquet(layout.shard_parquet(name), columns=["key", "status"]).to_pydict()
        expected, slots = sum(s == "success" for s in table["status"]), len(table["status"])
        if index_digits is None and table["key"]:
            index_digits = len(table["key"][0]) - len(name)
    return ShardInfo(name, layout.shard_tar(name), expected, slots, index_digits)




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
        yield {SHARD: shard, KEY: "", "image": b"", CAPTION: "", ERROR: f"{SHARD_FAILED}unreadable shard {tar}: {error}"}
        return
    yield {SHARD: shard, KEY: "", "image": b"", CAPTION: "", ERROR: f"{SHARD_END}{read}"}


def preprocess_batch(batch: dict[str, np.ndarray], image_size: int, mean: tuple, std: tuple) -> dict[str, np.ndarray]:
    """Decode images and apply CLIP's preprocessing (CPU); undecodable images get an error, zero pixels."""
    import torch
    from PIL import Image

    from dalle2.clip import clip_preprocess

    errors = list(batch[ERROR])
    pixels = np.zeros((len(errors), 3, image_size, image_size), dtype=np.float32)
    for i, data in enumerate(batch["image"]):
        if errors[i]:
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
            pixels[i] = clip_preprocess(tensor, image_size, mean, std)[0].numpy()
        except Exception as error:  # noqa: BLE001 - a corrupt image is skipped and counted
            errors[i] = f"corrupt image: {type(error).__name__}"
    out = {k: v for k, v in batch.items() if k != "image"}
    out[ERROR] = np.asarray(errors, dtype=object)
    out["pixels"] = pixels
    return out


class ClipEmbedder:
    """Ray Data actor: loads CLIP once, embeds batches of preprocessed pixels and captions."""

    def __init__(self, source: dict, use_gpu: bool, autocast: str, output_dtype: str, torch_threads: Optional[int] = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from dalle2.clip import load_clip

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.clip = load_clip(**ClipSource(**source).model_dump()).to(self.device).eval()
        self.autocast, self.output_dtype = autocast, np.dtype(output_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import contextlib

        import torch

        ok = np.asarray([not e for e in batch[ERROR]], dtype=bool)
        dim = self.clip.embed_dim
        img_emb = np.zeros((len(ok), dim), dtype=self.output_dtype)
        text_emb = np.zeros((len(ok), dim), dtype=self.output_dtype)
        if ok.any():
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast)
            amp = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
                img_emb[ok] = self.clip.embed_preprocessed(pixels).float().cpu().numpy()
                captions = [str(c) for c in batch[CAPTION][ok]]
                text_emb[ok] = self.clip.embed_text(captions).text_embed.float().cpu().numpy()
        # NaN / inf (a broken model, or float16 overflow) must never reach reorder or training
        finite = np.isfinite(img_emb).all(axis=1) & np.isfinite(text_emb).all(axis=1)
        errors = np.asarray([e if (e or finite[i]) else "non-finite embedding" for i, e in enumerate(batch[ERROR])],
                            dtype=object)
        img_emb[~finite], text_emb[~finite] = 0, 0
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out[ERROR] = errors
        out["img_emb"], out["text_emb"] = img_emb, text_emb
        out["embedded_at"] = np.full(len(ok), time.time())  # for the stage's steady-rate figure
        return out


class ShardAssembler:
    """Collects embedded rows per shard on the driver and writes each shard once it is complete."""

    def __init__(self, layout: RunLayout, infos: dict[str, ShardInfo], embed_dim: int, config: EmbedConfig):
        self.layout, self.infos, self.embed_dim, self.config = layout, infos, embed_dim, config
        self.rows: dict[str, list[dict]] = defaultdict(list)
        self.ends: dict[str, int] = {}  # samples read from each shard whose end row has arrived
        self.failures: dict[str, str] = {}
        self.finished: set[str] = set()
        self.ledger = Ledger(layout, STAGE)
        self.started = {name: time.time() for name in infos}
        self.embed_times: list[np.ndarray] = []  # when each row left CLIP

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.embed_times.append(np.asarray(batch["embedded_at"], dtype=np.float64))
        for i, shard in enumerate(batch[SHARD]):
            error = str(batch[ERROR][i])
            if error.startswith(SHARD_FAILED):
                self.failures[shard] = error[len(SHARD_FAILED):]
                self.rows.pop(shard, None)
                log.error("embed: shard %s failed: %s", shard, self.failures[shard])
                continue
            if shard in self.failures:
                continue
            if error.startswith(SHARD_END):
                self.ends[shard] = int(error[len(SHARD_END):])
            else:
                self.rows[shard].append({KEY: str(batch[KEY][i]), CAPTION: str(batch[CAPTION][i]), ERROR: error,
                                         "img_emb": batch["img_emb"][i], "text_emb": batch["text_emb"][i]})
            if shard in self.ends and len(self.rows[shard]) == self.ends[shard]:
                self.finish_or_fail(shard)

    def close(self) -> dict[str, str]:
        """Fail the shards whose samples did not all arrive; returns {shard: error} of every failed shard."""
        for shard, info in self.infos.items():
            if shard not in self.finished and shard not in self.failures:
                got = len(self.rows.pop(shard, []))
                self.failures[shard] = f"only {got} of {self.ends.get(shard, '?')} samples of {info.tar} came back"
        return self.failures

    def finish_or_fail(self, shard: str) -> None:
        """Write the shard, or fail it alone with the reason (the other shards go on)."""
        info, read = self.infos[shard], self.ends[shard]
        if info.expected is not None and read != info.expected:
            self.failures[shard] = f"tar {info.tar} holds {read} samples, its parquet lists {info.expected}"
            self.rows.pop(shard, None)
            return
        try:
            self.finish(shard)
        except Exception as error:  # noqa: BLE001 - e.g. a write error: this shard fails, with its reason
            self.failures[shard] = f"{type(error).__name__}: {error}"
            log.error("embed: shard %s failed: %s", shard, self.failures[shard])

    def finish(self, shard: str) -> None:
        from .aligned import align, write_aligned
        from .storage import write_npy, write_parquet

        self.ledger.keep_fingerprint(fingerprint(self.config))
        info = self.infos[shard]
        rows = sorted(self.rows.pop(shard, []), key=lambda r: r[KEY])
        index_digits = info.index_digits or (len(rows[0][KEY]) - len(shard) if rows else 1)
        seen: set[int] = set()
        for r in rows:  # keys that do not name a slot of this shard, and repeated keys, fail their row
            if r[ERROR]:
                continue
            try:
                shard_id, r[INDEX] = parse_key(r[KEY], index_digits)
            except ValueError:
                r[ERROR] = "unparsable key"
                continue
            if shard_id != shard_id_of(shard) or (info.slots is not None and r[INDEX] >= info.slots):
                r[ERROR] = "key outside the shard"
            elif r[INDEX] in seen:
                r[ERROR] = "duplicate key"
            seen.add(r[INDEX])
        good = [r for r in rows if not r[ERROR]]
        dtype = np.dtype(self.config.output_dtype)
        img_emb = np.stack([r["img_emb"] for r in good]).astype(dtype) if good else np.zeros((0, self.embed_dim), dtype)
        text_emb = np.stack([r["text_emb"] for r in good]).astype(dtype) if good else np.zeros((0, self.embed_dim), dtype)
        keys, captions = [r[KEY] for r in good], [r[CAPTION] for r in good]
        if self.config.write_clip_retrieval:
            import pyarrow as pa

            files = self.layout.clip_retrieval_files(shard_id_of(shard))
            write_npy(files["img_emb"], img_emb)
            write_npy(files["text_emb"], text_emb)
            write_parquet(files["metadata"], pa.table({KEY: pa.array(keys, pa.string()), CAPTION: pa.array(captions, pa.string())}))
        crash_point("embed.between_files")
        indices = np.asarray([r[INDEX] for r in good], dtype=np.int64)
        slots = info.slots if info.slots is not None else (int(indices.max()) + 1 if len(indices) else 0)
        aligned = align(shard_id_of(shard), slots, len(shard), index_digits, indices, img_emb, text_emb, captions)
        write_aligned(self.layout, shard, aligned)
        crash_point("embed.after_outputs")
        failed: dict[str, int] = defaultdict(int)
        for r in rows:
            if r[ERROR]:
                failed[r[ERROR]] += 1
                log.warning("embed: skipped %s in shard %s: %s", r[KEY], shard, r[ERROR])
        record = ShardRecord(shard, len(rows), len(good), dict(failed), round(time.time() - self.started[shard], 3))
        self.ledger.record(record)
        self.finished.add(shard)


def fingerprint(config: EmbedConfig) -> dict:
    """What a run's embeddings are made with: the CLIP (a trained checkpoint's path included) and the dtype."""
    return {"clip": config.clip.model_dump(mode="json"), "output_dtype": config.output_dtype}


def steady_timing(embed_times: list[np.ndarray], started: float) -> dict:
    """Startup (until CLIP's first batch: workers importing torch, actors loading the model) and the
    rate after it, which is what a long run sees; small runs are dominated by the startup."""
    times = np.sort(np.concatenate(embed_times)) if embed_times else np.zeros(0)
    first_batch = times == times[0] if len(times) else times
    later = times[~first_batch]
    if not len(later):
        return {}
    span = later[-1] - times[0]
    return {"startup_s": round(float(times[0] - started), 2),
            "steady_rows_per_s": round(len(later) / span, 1) if span > 0 else None}


def plan_embed(layout: RunLayout, shards: list[str]) -> dict[str, ShardInfo]:
    """What the download says of each of `shards` not embedded yet."""
    from .download import run_index_width

    ledger = Ledger(layout, STAGE)
    digits = run_index_width(layout)
    return {s: shard_info(layout, s, digits) for s in shards if not ledger.is_done(s)}


def run_embed(config: EmbedConfig, root: str, ray_config: Optional[RayConfig] = None) -> dict:
    """Embed every downloaded shard that is not embedded yet; returns the stage summary."""
    import ray

    from dalle2.clip import checkpoint_model_name, clip_input_spec

    from .distributor import ensure_ray

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
    log.info("embed: %d shards, %d to do", len(shards), len(todo))
    failures: dict[str, str] = {}
    timing: dict = {}
    if todo:
        model_name = checkpoint_model_name(config.clip.checkpoint) if config.clip.checkpoint else config.clip.model_name
        image_size, mean, std = clip_input_spec(model_name)
        import open_clip

        embed_dim = int(open_clip.get_model_config(model_name)["embed_dim"])
        ensure_ray(ray_config)
        items = [{SHARD: s, "tar": infos[s].tar} for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(read_shard, num_cpus=config.decode_cpus)
        ds = ds.map_batches(preprocess_batch, fn_kwargs=dict(image_size=image_size, mean=mean, std=std),
                            batch_size=config.batch_size, num_cpus=config.decode_cpus,
                            compute=ray.data.TaskPoolStrategy(size=config.decode_concurrency))
        ds = ds.map_batches(
            ClipEmbedder, batch_size=config.batch_size,
            fn_constructor_kwargs=dict(source=config.clip.model_dump(), use_gpu=config.num_gpus_per_actor > 0,
                                       autocast=config.autocast, output_dtype=config.output_dtype,
                                       torch_threads=config.torch_threads),
            num_cpus=config.cpus_per_actor, num_gpus=config.num_gpus_per_actor or None,
            compute=ray.data.ActorPoolStrategy(size=config.actors),
        )
        assembler = ShardAssembler(layout, infos, embed_dim, config)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            assembler.add(batch)
        failures = assembler.close()
        timing = steady_timing(assembler.embed_times, started)
    for shard, error in failures.items():  # rows: what the parquet lists, else the samples read (if known)
        info = infos[shard]
        ledger.fail(shard, rows=info.expected if info.expected is not None else assembler.ends.get(shard, 0), error=error)
    summary = ledger.summarize(started, timing)
    return summary
