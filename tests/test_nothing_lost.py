"""Every input row ends written or failed with a reason, and a re-run finishes the missing work: one test per
data-loss bug found in review (each failed before its fix)."""

import io
import json
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from jobs.cli import main as dalle2
from pipeline.execution.session import RaySession
from jobs import shapes
from pipeline.formats.aligned import read_aligned
from pipeline.run.config import DownloadConfig, EmbedConfig, ReorderConfig
from pipeline.stages.embed.embedder import ACTOR_CALLS, ClipEmbedder
from pipeline.stages.embed.stage import run_embed
from pipeline.run.layout import RunLayout, make_key
from pipeline.run.ledger import StaleRunError
from pipeline.stages.download.split import split_url_list
from pipeline.stages.reorder import run_reorder
from pipeline.run.storage import write_json, write_npy, write_parquet
from tests.servers import encode

DIM = 4


def write_part(folder: str, part: str, keys: list[str], img_emb: np.ndarray, text_emb: np.ndarray | None = None) -> None:
    """One clip-retrieval output part, named as clip-retrieval names it (`part` as given: "7", "07")."""
    write_npy(f"{folder}/img_emb/img_emb_{part}.npy", img_emb.astype(np.float16))
    if text_emb is not None:
        write_npy(f"{folder}/text_emb/text_emb_{part}.npy", text_emb.astype(np.float16))
    write_parquet(f"{folder}/metadata/metadata_{part}.parquet",
                  pa.table({"key": keys, "caption": [f"caption of {k}" for k in keys]}))


def embeddings_of(keys: list[str]) -> np.ndarray:
    """A distinct, checkable embedding per key."""
    return np.asarray([[int(k), int(k) % 7, 1, 2] for k in keys], dtype=np.float32) / 100


def reorder(folder: str, root: str) -> dict:
    return run_reorder(ReorderConfig(source=folder, index_width=1, samples_per_shard=3), root, RaySession(), distributor="local")


def test_reorder_gathers_nothing_while_a_part_failed_and_a_rerun_places_every_row(tmp_path, capsys):
    folder, root = str(tmp_path / "emb"), str(tmp_path / "run")
    part0, part1 = ["000000", "000011", "000002"], ["000010", "000001", "000012"]  # both parts touch both shards
    write_part(folder, "0", part0, embeddings_of(part0), embeddings_of(part0))
    write_part(folder, "1", part1, embeddings_of(part1)[:2], embeddings_of(part1))  # 2 embeddings for 3 keys

    summary = reorder(folder, root)
    assert list(summary["failed_shards"]) == ["part-1"] and "img_emb_1.npy has 2 rows" in summary["failed_shards"]["part-1"]["error"]
    assert summary["written"] == 0 and summary["shards"] == 0  # no shard marked done without part 1's rows
    assert summary["failed"] == 3 and summary["rows_in"] == 3  # part 1's rows, counted with its reason
    # status lists the failed part with its error and exits non-zero
    capsys.readouterr()
    assert dalle2(["status", "--root", root]) == 1
    assert "part-1: 3 rows" in capsys.readouterr().out

    write_part(folder, "1", part1, embeddings_of(part1), embeddings_of(part1))  # fixed: the re-run places all 6
    again = reorder(folder, root)
    assert again["written"] == 6 == again["input_rows"] and not again["failed_shards"] and again["failed"] == 0
    for shard in ("00000", "00001"):
        aligned = read_aligned(RunLayout(root), shard, mmap=False)
        assert aligned.present.all() and aligned.keys == [make_key(int(shard), i, 5, 1) for i in range(3)]
        np.testing.assert_allclose(aligned.img_emb.astype(np.float32), embeddings_of(aligned.keys), atol=1e-3)
    assert dalle2(["status", "--root", root]) == 0


def test_reorder_takes_zero_padded_part_files_as_listed(tmp_path):
    # clip-retrieval names parts img_emb_00.npy ... img_emb_10.npy once there are ten or more
    folder, root = str(tmp_path / "emb"), str(tmp_path / "run")
    keys = [make_key(s, i, 5, 1) for s in range(4) for i in range(3)][:11]
    for n, key in enumerate(keys):
        write_part(folder, f"{n:02d}", [key], embeddings_of([key]), embeddings_of([key]))
    summary = reorder(folder, root)
    assert summary["input_parts"] == 11 and summary["written"] == 11 == summary["input_rows"]
    assert not summary["failed_shards"]


def test_reorder_counts_non_finite_embeddings_and_checks_text_rows(tmp_path):
    folder, root = str(tmp_path / "emb"), str(tmp_path / "run")
    keys = ["000000", "000001", "000002"]
    img = embeddings_of(keys)
    img[1, 2] = np.nan
    text = embeddings_of(keys)
    text[2, 0] = np.inf
    write_part(folder, "0", keys, img, text)
    summary = reorder(folder, root)
    assert summary["written"] == 1 and summary["unplaced_rows_by_reason"] == {"non-finite embedding": 2}
    aligned = read_aligned(RunLayout(root), "00000", mmap=False)
    assert aligned.present.tolist() == [True, False, False] and np.isfinite(aligned.img_emb.astype(np.float32)).all()

    other = str(tmp_path / "emb2")
    write_part(other, "0", keys, embeddings_of(keys), embeddings_of(keys)[:2])
    failed = reorder(other, str(tmp_path / "run2"))
    assert "text_emb_0.npy has 2 rows" in failed["failed_shards"]["part-0"]["error"]


def png(color) -> bytes:
    return encode(Image.new("RGB", (16, 16), color))


def write_tar(path, samples: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (("png", image), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_shard_parquet(path, keys: list[str], statuses: list[str]) -> None:
    pd.DataFrame({"key": keys, "status": statuses, "caption": ["c"] * len(keys)}).to_parquet(path)


@pytest.fixture
def awkward_run(tmp_path):
    """Shards as real crawls leave them, with samples_per_shard = 12 (two index digits)."""
    root = tmp_path / "run"
    shards = root / "shards"
    shards.mkdir(parents=True)
    # 00000: every download failed (one dead domain): an empty tar, a parquet of 12 failures
    write_tar(shards / "00000.tar", [])
    write_shard_parquet(shards / "00000.parquet", [make_key(0, i, 5, 2) for i in range(12)], ["failed_to_download"] * 12)
    # 00001: the tar holds 3 samples but the parquet lists 2 successes
    write_tar(shards / "00001.tar", [(make_key(1, i, 5, 2), png((255, 0, 0)), "red") for i in range(3)])
    write_shard_parquet(shards / "00001.parquet", [make_key(1, i, 5, 2) for i in range(3)],
                        ["success", "success", "failed_to_download"])
    # 00002 (no parquet, as a plain img2dataset copy may come): a duplicate key and an unparsable one
    write_tar(shards / "00002.tar", [("0000200", png((0, 255, 0)), "green"), ("0000201", png((0, 0, 255)), "blue"),
                                     ("0000201", png((0, 0, 200)), "blue again"), ("00002xx", png((9, 9, 9)), "bad")])
    for shard in ("00000", "00001", "00002"):
        (shards / f"{shard}_stats.json").write_text("{}")
    write_json(str(root / "ledger" / "download.json"), {"index_width": 2})
    return str(root)


def test_embed_fails_or_counts_awkward_shards_instead_of_aborting(awkward_run, ray_local):
    config = EmbedConfig(batch_size=4)
    summary = run_embed(config, awkward_run, RaySession())
    per_shard = summary["per_shard"]
    # the all-failed shard: 12 slots keyed with the download's width, none present (make_key raised before)
    assert per_shard["00000"] == {"rows_in": 0, "written": 0, "failed": {}}
    aligned = read_aligned(RunLayout(awkward_run), "00000", mmap=False)
    assert len(aligned.keys) == 12 and aligned.keys[11] == "0000011" and not aligned.present.any()
    # more samples than the parquet lists: the shard fails with the reason, none silently dropped
    assert "holds 3 samples, its parquet lists 2" in summary["failed_shards"]["00001"]["error"]
    assert summary["failed_shards"]["00001"]["rows"] == 2
    # a duplicate and an unparsable key fail their rows; the shard is written
    assert per_shard["00002"] == {"rows_in": 4, "written": 2, "failed": {"duplicate key": 1, "unparsable key": 1}}
    assert summary["rows_in"] == summary["written"] + summary["failed"]

    # a different CLIP for the same run is refused before any work: embeddings of two CLIPs never mix
    with pytest.raises(StaleRunError, match="embed.clip back"):
        run_embed(EmbedConfig(batch_size=4, clip={"model_name": "ViT-B-32"}), awkward_run, RaySession())


def test_non_finite_embeddings_fail_their_rows(tiny_clip):
    embedder = ClipEmbedder(source={"model_name": "tiny-clip"}, use_gpu=False, autocast="none", output_dtype="float16")
    real = embedder.clip.embed_preprocessed

    def broken(pixels):  # a model that overflows on its second input
        out = real(pixels)
        out[1] = float("inf")
        return out

    embedder.clip.embed_preprocessed = broken
    size = embedder.clip.image_size
    batch = {"shard": np.asarray(["00000"] * 3, object), "key": np.asarray(["0", "1", "2"], object),
             "caption": np.asarray(["a", "b", "c"], object), "error": np.asarray(["", "", ""], object),
             "pixels": np.zeros((3, size, size, 3), np.uint8)}
    out = embedder(batch)
    assert list(out["error"]) == ["", "non-finite embedding", ""]
    assert np.isfinite(out["img_emb"].astype(np.float32)).all() and out["img_emb"][0].any()


def test_a_clip_whose_captions_the_stage_cannot_embed_is_refused_before_ray_starts(tmp_path, monkeypatch):
    shapes.write_shards(str(tmp_path), count=4)

    class NoRay(RaySession):
        def connect(self, *args, **kwargs):
            raise AssertionError("Ray was started for a CLIP the stage refuses")

    with pytest.raises(ValueError, match="embed.clip: ViT-B-16-SigLIP: its text tower pools by 'last'"):
        run_embed(EmbedConfig(clip={"model_name": "ViT-B-16-SigLIP"}), str(tmp_path), NoRay())


def test_concurrent_calls_embed_each_batch_as_alone_and_the_model_runs_one_batch_at_a_time(tiny_clip):
    embedder = ClipEmbedder(source={"model_name": "tiny-clip"}, use_gpu=False, autocast="none", output_dtype="float32")
    size, rng = embedder.clip.image_size, np.random.default_rng(0)
    words = ["red", "square", "on", "a", "blue", "circle", "small", "green", "triangle", "left"]
    batches = [{"shard": np.asarray(["00000"] * 5, object), "key": np.asarray([str(i) for i in range(5)], object),
                "caption": np.asarray([" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(5)], object),
                "error": np.asarray([""] * 5, object), "pixels": rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)}
               for _ in range(6)]
    alone = [embedder(batch) for batch in batches]

    running, most = [0], [0]

    def slowed(forward):  # long enough that two calls would overlap here without the lock
        def slow_forward(*args, **kwargs):
            running[0] += 1
            most[0] = max(most[0], running[0])
            time.sleep(0.05)
            out = forward(*args, **kwargs)
            running[0] -= 1
            return out
        return slow_forward

    embedder.clip.embed_preprocessed = slowed(embedder.clip.embed_preprocessed)
    embedder.clip.embed_text = slowed(embedder.clip.embed_text)
    with ThreadPoolExecutor(max_workers=ACTOR_CALLS) as pool:
        together = list(pool.map(embedder, batches))
    assert most[0] == 1
    for one, other in zip(alone, together):
        np.testing.assert_array_equal(one["img_emb"], other["img_emb"])
        np.testing.assert_array_equal(one["text_emb"], other["text_emb"])
    assert len({out["text_emb"][0].tobytes() for out in together}) == len(batches)  # each batch its own captions


def test_a_changed_url_list_or_shard_size_is_refused(tmp_path):
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\n" + "".join(f"http://127.0.0.1:9/{i}.png,c{i}\n" for i in range(10)))
    layout = RunLayout(str(tmp_path / "run"))
    assert split_url_list(DownloadConfig(url_list=str(url_list), samples_per_shard=5), layout) == {"00000": 5, "00001": 5}
    with pytest.raises(StaleRunError, match="samples_per_shard was 5, now 4"):
        split_url_list(DownloadConfig(url_list=str(url_list), samples_per_shard=4), layout)
    url_list.write_text("url,caption\n" + "".join(f"http://127.0.0.1:9/{i}.jpg,c{i}\n" for i in range(10)))
    with pytest.raises(StaleRunError, match="url_list_head_sha256"):
        split_url_list(DownloadConfig(url_list=str(url_list), samples_per_shard=5), layout)


@pytest.mark.parametrize("override,field", [
    ("train_prior.eval_every=0", "train_prior.eval_every"),
    ("train_decoder.checkpoint_every=0", "train_decoder.checkpoint_every"),
    ("download.shard_retries=-1", "download.shard_retries"),
    ("download.retries=-1", "download.retries"),
    ("download.timeout=0", "download.timeout"),
    ("embed.batch_size=0", "embed.batch_size"),
    ("train_prior.trainer.grad_accum_every=0", "train_prior.trainer.grad_accum_every"),
])
def test_out_of_range_settings_are_refused_before_any_work(tmp_path, capsys, override, field):
    root = tmp_path / "run"
    assert dalle2(["download", "--set", f"root={root}", "--set", override]) == 2
    assert field in capsys.readouterr().err
    assert not root.exists()  # refused before anything was written


def test_failed_shards_are_counted_and_listed_by_status(tmp_path, capsys):
    from pipeline.run.ledger import Ledger, ShardRecord

    layout = RunLayout(str(tmp_path / "run"))
    ledger = Ledger(layout, "download")
    ledger.record(ShardRecord("00000", 5, 4, {"failed_to_download: 404": 1}))
    ledger.fail("00001", rows=5, error="FileNotFoundError: /somewhere/inputs/00001.arrow")
    summary = ledger.summarize(0.0, {"input_rows": 10})
    assert summary["rows_in"] == 10 == summary["written"] + summary["failed"]
    assert summary["failed_by_reason"] == {"shard failed: FileNotFoundError: <path>": 5, "failed_to_download: 404": 1}
    capsys.readouterr()
    assert dalle2(["status", "--root", layout.root]) == 1
    out = capsys.readouterr().out
    assert "00001: 5 rows, FileNotFoundError" in out and "PROBLEM" in out
    ledger.record(ShardRecord("00001", 5, 5))  # done at last: the failure is gone
    assert ledger.summarize(0.0, {"input_rows": 10})["failed_shards"] == {}
    capsys.readouterr()
    assert dalle2(["status", "--root", layout.root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []


def sleep_unless_quick(shard: str):
    """A shard function: shard 'quick' finishes, any other hangs (a server that never answers)."""
    import time

    from pipeline.run.ledger import ShardRecord

    if shard != "quick":
        time.sleep(3600)
    return ShardRecord(shard, 1, 1)


def test_a_shard_past_its_deadline_is_cancelled_and_failed(ray_local):
    import time

    from pipeline.execution.distributor import run_shards

    started = time.monotonic()
    records, failures = run_shards(sleep_unless_quick, ["quick", "stuck"], session=RaySession(), num_cpus=0.5, retries=0, timeout=3)
    assert time.monotonic() - started < 30
    assert [r.shard for r in records] == ["quick"]
    assert list(failures) == ["stuck"] and "deadline exceeded" in failures["stuck"]


def test_file_urls_are_refused_and_a_mistyped_clip_leaves_nothing_to_refuse(tmp_path, awkward_run):
    from pipeline.formats.fetch import FetchPolicy, Refused, fetch

    image = tmp_path / "a.png"
    image.write_bytes(png((1, 2, 3)))
    with pytest.raises(Refused, match="^refused: scheme file$"):  # the download policy: http(s) only
        fetch(f"file://{image}", FetchPolicy(timeout=5, max_image_area=1e6, allow_private_network=True))

    with pytest.raises(Exception, match="nonexistent-clip"):
        run_embed(EmbedConfig(clip={"model_name": "nonexistent-clip"}), awkward_run, RaySession())
    assert not os.path.exists(RunLayout(awkward_run).ledger_fingerprint("embed"))


def test_status_reads_summaries_written_before_failure_records(tmp_path, capsys):
    layout = RunLayout(str(tmp_path / "run"))
    write_json(layout.ledger_summary("embed"), {"shards": 1, "rows_in": 3, "written": 3, "failed": 0,
                                               "failed_by_reason": {}, "failed_shards": {"00002": "unreadable tar"}})
    capsys.readouterr()
    assert dalle2(["status", "--root", layout.root]) == 1
    assert "unreadable tar" in capsys.readouterr().out


def test_a_failed_gather_counts_its_rows(tmp_path, monkeypatch):
    from pipeline.stages import reorder as reorder_module

    folder, root = str(tmp_path / "emb"), str(tmp_path / "run")
    keys = ["000000", "000001", "000010"]
    write_part(folder, "0", keys, embeddings_of(keys), embeddings_of(keys))
    real_gather = reorder_module.Reorder.gather

    def failing_gather(self, shard):
        if shard == "00001":
            raise OSError("disk full")
        return real_gather(self, shard)

    monkeypatch.setattr(reorder_module.Reorder, "gather", failing_gather)
    summary = reorder(folder, root)
    assert summary["failed_shards"]["00001"] == {"rows": 1, "error": "OSError: disk full"}
    assert summary["rows_in"] == 3 == summary["written"] + summary["failed"]
    monkeypatch.setattr(reorder_module.Reorder, "gather", real_gather)
    again = reorder(folder, root)
    assert again["written"] == 3 and not again["failed_shards"]


def test_input_shards_lost_to_an_older_version_are_split_again(tmp_path):
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\n" + "".join(f"http://127.0.0.1:9/{i}.png,c{i}\n" for i in range(10)))
    layout = RunLayout(str(tmp_path / "run"))
    config = DownloadConfig(url_list=str(url_list), samples_per_shard=5)
    shards = split_url_list(config, layout)
    before = open(layout.input_shard("00001"), "rb").read()
    os.remove(layout.input_shard("00001"))  # what img2dataset did to every shard it finished
    assert split_url_list(config, layout) == shards
    assert open(layout.input_shard("00001"), "rb").read() == before
