"""The embed stage on shards downloaded from the local HTTP server, on a real local Ray."""

import io
import shutil
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.execution.session import RaySession
from pipeline.formats.aligned import read_aligned
from pipeline.run.config import DownloadConfig, EmbedConfig
from pipeline.stages.download.stage import run_download
from pipeline.stages.embed.stage import run_embed
from pipeline.run.layout import RunLayout, parse_key
from pipeline.formats.shard_reader import iter_samples
from pipeline.run.storage import read_npy, read_parquet


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, image_server, ray_local):
    """A run root with 3 downloaded shards of 20 rows (60 images, no failures)."""
    root = tmp_path_factory.mktemp("embed") / "run"
    url_list = root.parent / "urls.parquet"
    pd.DataFrame(image_server.rows(with_failures=False)).to_parquet(url_list)
    summary = run_download(DownloadConfig(url_list=str(url_list), image_size=32, samples_per_shard=20, threads=8,
                                          allow_private_network=True), str(root), RaySession())
    assert summary["written"] == 60
    return root


def copy_run(src, dst):
    shutil.copytree(src / "shards", dst / "shards")
    return dst


def corrupt_one_image(tar_path, victim_index=3):
    """Rewrite a shard with the image bytes of one sample replaced by garbage; returns its key."""
    samples = list(iter_samples(str(tar_path)))
    victim = samples[victim_index][0]
    with tarfile.open(tar_path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                if key == victim and ext == "jpg":
                    data = b"\xff\xd8 definitely not a jpeg"
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return victim


def test_embed_writes_both_layouts_and_counts_bad_input(downloaded, tmp_path, tiny_clip):
    run = copy_run(downloaded, tmp_path)
    layout = RunLayout(str(run))
    victim = corrupt_one_image(run / "shards" / "00001.tar")
    (run / "shards" / "00002.tar").write_bytes(b"this is not a tar file at all" * 100)

    tiny_clip.save(str(tmp_path / "clip"))  # the stage loads these weights in its actors
    config = EmbedConfig(batch_size=16, output_dtype="float16", clip={"checkpoint": str(tmp_path / "clip")})
    summary = run_embed(config, str(run), RaySession())

    # shard 2 failed alone, naming its file; the others completed and reconcile
    assert list(summary["failed_shards"]) == ["00002"] and "00002.tar" in summary["failed_shards"]["00002"]["error"]
    # the failed shard's 20 rows are counted as failed, with its reason: every row is written or failed
    assert summary["rows_in"] == 60 == summary["written"] + summary["failed"] and summary["written"] == 39
    assert summary["failed_by_reason"] == {"shard failed: unreadable shard: bad checksum": 20,
                                           "corrupt image: UnidentifiedImageError": 1}

    for shard, n in (("00000", 0), ("00001", 1)):
        files = layout.clip_retrieval_files(n)
        img_emb, text_emb = read_npy(files["img_emb"]), read_npy(files["text_emb"])
        meta = read_parquet(files["metadata"]).to_pandas()
        expected = 20 if shard == "00000" else 19
        assert img_emb.shape == text_emb.shape == (expected, tiny_clip.embed_dim) and img_emb.dtype == np.float16
        assert list(meta.columns) == ["key", "caption"] and len(meta) == expected
        np.testing.assert_allclose(np.linalg.norm(img_emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

        aligned = read_aligned(layout, shard)
        assert aligned.img_emb.shape == (20, tiny_clip.embed_dim)
        assert aligned.present.sum() == expected
        for i, key in enumerate(aligned.keys):
            assert parse_key(key, 2) == (int(shard), i)
        if shard == "00001":
            slot = parse_key(victim, 2)[1]
            assert not aligned.present[slot] and not aligned.img_emb[slot].any()
        # the stage's embedding equals the adapter's own on the decoded image
        key, fields = next(iter_samples(layout.shard_tar(shard)))
        image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(fields["jpg"])).convert("RGB"))).permute(2, 0, 1)
        direct = tiny_clip.embed_image(image[None].float() / 255)[0].numpy()
        np.testing.assert_allclose(aligned.img_emb[parse_key(key, 2)[1]].astype(np.float32), direct, atol=3e-3)
        text = tiny_clip.embed_text([fields["txt"].decode()]).text_embed[0].numpy()
        np.testing.assert_allclose(aligned.text_emb[parse_key(key, 2)[1]].astype(np.float32), text, atol=3e-3)

    # a re-run redoes only the failed shard (still failing), never the finished ones
    again = run_embed(config, str(run), RaySession())
    assert again["written"] == 39 and list(again["failed_shards"]) == ["00002"]


def test_embed_accepts_plain_img2dataset_shards(tmp_path, image_server, ray_local):
    import img2dataset

    url_list = tmp_path / "urls.csv"
    pd.DataFrame(image_server.rows(with_failures=False)[:12]).to_csv(url_list, index=False)
    img2dataset.download(url_list=str(url_list), output_folder=str(tmp_path / "run" / "shards"), input_format="csv",
                         caption_col="caption", output_format="webdataset", image_size=32, processes_count=1,
                         thread_count=4, number_sample_per_shard=5, distributor="multiprocessing")
    summary = run_embed(EmbedConfig(batch_size=8), str(tmp_path / "run"), RaySession())
    assert summary["rows_in"] == summary["written"] == 12 and summary["shards"] == 3
    aligned = read_aligned(RunLayout(str(tmp_path / "run")), "00002")
    assert aligned.img_emb.shape[0] == 2 and aligned.present.all()  # the last shard holds 12 - 2*5 rows


def test_download_and_embed_on_s3(s3_server, image_server, ray_local, tmp_path):
    root = s3_server() + "/run"
    url_list = f"{root}/urls.jsonl"
    pd.DataFrame(image_server.rows()[-30:]).to_json(tmp_path / "urls.jsonl", orient="records", lines=True)
    from pipeline.run.storage import write_atomic

    write_atomic(url_list, (tmp_path / "urls.jsonl").read_bytes())
    download = run_download(DownloadConfig(url_list=url_list, image_size=32, samples_per_shard=16, threads=8, timeout=4,
                                           allow_private_network=True), root, RaySession())
    assert download["rows_in"] == 30 and download["written"] + download["failed"] == 30 and download["written"] >= 25
    embed = run_embed(EmbedConfig(batch_size=16), root, RaySession())
    assert embed["rows_in"] == embed["written"] == download["written"] and not embed["failed_shards"]
    aligned = read_aligned(RunLayout(root), "00001", mmap=False)
    assert aligned.img_emb.shape[0] == 14 and aligned.present.sum() == download["per_shard"]["00001"]["written"]
