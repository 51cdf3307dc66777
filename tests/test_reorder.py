"""The reorder stage: clip-retrieval output in any order -> the same aligned layout embed writes."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.execution.session import RaySession
from pipeline.formats.aligned import read_aligned
from pipeline.run.config import DownloadConfig, EmbedConfig, ReorderConfig
from pipeline.stages.download.stage import run_download
from pipeline.stages.embed.stage import run_embed
from pipeline.run.layout import RunLayout
from pipeline.stages.reorder import run_reorder
from pipeline.run.storage import filesystem, list_files, read_npy, read_parquet, write_npy, write_parquet


def shuffle_into_parts(src: RunLayout, dest_folder: str, parts: int, seed: int = 0) -> int:
    """Rewrite clip-retrieval files as `parts` files with all rows shuffled across them."""
    metas, imgs, texts = [], [], []
    for url in list_files(f"{src.embeddings}/metadata", ".parquet"):
        n = url.rsplit("_", 1)[-1].split(".")[0]
        files = src.clip_retrieval_files(int(n))
        metas.append(read_parquet(files["metadata"]).to_pandas())
        imgs.append(read_npy(files["img_emb"]))
        texts.append(read_npy(files["text_emb"]))
    meta, img, text = pd.concat(metas, ignore_index=True), np.concatenate(imgs), np.concatenate(texts)
    order = np.random.default_rng(seed).permutation(len(meta))
    for p, rows in enumerate(np.array_split(order, parts)):
        write_npy(f"{dest_folder}/img_emb/img_emb_{p}.npy", img[rows])
        write_npy(f"{dest_folder}/text_emb/text_emb_{p}.npy", text[rows])
        write_parquet(f"{dest_folder}/metadata/metadata_{p}.parquet", pa.Table.from_pandas(meta.iloc[rows], preserve_index=False))
    return len(meta)


def copy_shards(src: RunLayout, dest: RunLayout) -> None:
    fs_src, _ = filesystem(src.shards)
    for url in list_files(src.shards):
        data = fs_src.cat_file(url)
        fs_dest, path = filesystem(f"{dest.shards}/{url.rsplit('/', 1)[-1]}")
        fs_dest.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs_dest.pipe_file(path, data)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, image_server, ray_local):
    root = tmp_path_factory.mktemp("reorder") / "run"
    url_list = root.parent / "urls.csv"
    pd.DataFrame(image_server.rows()).to_csv(url_list, index=False)
    run_download(DownloadConfig(url_list=str(url_list), image_size=32, samples_per_shard=25, threads=8, timeout=4,
                                allow_private_network=True), str(root), RaySession())
    summary = run_embed(EmbedConfig(batch_size=32), str(root), RaySession())
    assert summary["written"] == 61  # the 60 shapes and the very large image (resized); 4 failures
    return RunLayout(str(root))


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_reorder_rebuilds_the_aligned_layout(embedded, tmp_path, storage, request):
    root = str(tmp_path / "reordered") if storage == "local" else request.getfixturevalue("s3_server")() + "/run"
    dest = RunLayout(root)
    copy_shards(embedded, dest)  # the shards let reorder infer the key width and slot counts
    rows = shuffle_into_parts(embedded, f"{root}/clip-retrieval", parts=3)
    summary = run_reorder(ReorderConfig(source=f"{root}/clip-retrieval"), root, RaySession())
    assert summary["input_rows"] == rows == summary["written"] == 61 and not summary["failed_shards"]
    for shard in ("00000", "00001", "00002"):
        expected, got = read_aligned(embedded, shard), read_aligned(dest, shard, mmap=False)
        np.testing.assert_array_equal(got.img_emb, expected.img_emb)
        np.testing.assert_array_equal(got.text_emb, expected.text_emb)
        np.testing.assert_array_equal(got.present, expected.present)
        assert got.keys == expected.keys and got.captions == expected.captions
    assert run_reorder(ReorderConfig(source=f"{root}/clip-retrieval"), root, RaySession())["written"] == 61  # idempotent


def test_reorder_needs_a_width_it_can_infer(tmp_path):
    folder = str(tmp_path / "emb")
    write_npy(f"{folder}/img_emb/img_emb_0.npy", np.zeros((2, 4), np.float16))
    write_parquet(f"{folder}/metadata/metadata_0.parquet", pa.table({"key": ["000010", "000011"], "caption": ["a", "b"]}))
    with pytest.raises(ValueError, match="reorder.index_width"):
        run_reorder(ReorderConfig(source=folder), str(tmp_path / "run"), RaySession(), distributor="local")
    summary = run_reorder(ReorderConfig(source=folder, index_width=1), str(tmp_path / "run"), RaySession(), distributor="local")
    assert summary["written"] == 2 and summary["per_shard"]["00001"]["rows_in"] == 2
