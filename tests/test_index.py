"""`dalle2 index`: faiss over the rows training reads, searched by embedding, text or image, its hits' images read
back from their shards."""

import json
import tarfile

import numpy as np
import pytest

from jobs import cli
from pipeline.formats.shard_reader import image_of, iter_samples
from pipeline.run.config import FilterConfig, HoldoutConfig, IndexConfig
from pipeline.run.layout import RunLayout, index_width, make_key
from pipeline.stages.holdout import ensure_holdout
from pipeline.stages.index import DataIndex, ShardImages, build_index
from tests.runs import make_training_run

COUNT, PER_SHARD, DIM = 400, 100, 64


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A run of 400 rows whose image embeddings are random but for five planted next to five queries; row 350 is
    an exact copy of planted row 0 (the filter drops it as a near duplicate) and 10 rows are held out."""
    root = str(tmp_path_factory.mktemp("index") / "run")
    rng = np.random.default_rng(0)
    queries = unit(rng.standard_normal((5, DIM)))
    images = unit(rng.standard_normal((COUNT, DIM)))
    rows = [17, 120, 205, 299, 333]  # in every shard, the last one's last row among them
    images[rows] = unit(queries + 0.05 * rng.standard_normal((5, DIM)))
    images[350] = images[17]
    make_training_run(root, COUNT, PER_SHARD, embeddings=(images, images),
                      filter_config=FilterConfig(distributor="local", duplicate_threshold=0.999))
    holdout = ensure_holdout(root, HoldoutConfig(rows=10, max_shards=4, seed=1))
    keys = [make_key(r // PER_SHARD, r % PER_SHARD, 5, index_width(PER_SHARD)) for r in range(COUNT)]
    assert not set(holdout.keys) & {keys[r] for r in rows}, "the seed holds a planted row out: pick another"
    return root, queries, images, rows, keys, holdout


@pytest.mark.parametrize("kind", ["flat", "ivf_pq"])
def test_the_index_returns_the_planted_rows_and_only_rows_training_reads(planted, kind):
    root, queries, images, rows, keys, holdout = planted
    config = IndexConfig(kind=kind, part_rows=120, nlist=4, pq_bytes=16, pq_bits=4, nprobe=4)
    summary = build_index(root, config, filtered=True)
    trained = COUNT - 1 - len(holdout)  # the duplicate dropped, the held-out rows left out
    assert summary["rows"] == trained and summary["kind"] == kind
    assert [part["rows"] for part in summary["parts"]] == [120, 120, 120, trained - 360]  # parts of part_rows
    index = DataIndex(root)
    assert len(index) == trained
    hits = index.search(queries, k=5)
    assert [found[0].key for found in hits] == [keys[r] for r in rows]
    exact = queries @ unit(images[rows].astype(np.float16).astype(np.float64)).T  # as stored: float16
    for q, found in enumerate(hits):
        assert len(found) == 5 and [h.similarity for h in found] == sorted((h.similarity for h in found), reverse=True)
        if kind == "flat":  # the cosine itself; IVF-PQ's is its codes' estimate (coarse on 389 random rows)
            assert found[0].similarity == pytest.approx(exact[q, q], abs=1e-5)
    # the dropped copy of planted row 0 and the held-out rows are never found, even by their own embeddings
    own = index.search(images[[350] + [keys.index(k) for k in holdout.keys]], k=3)
    found_keys = {h.key for found in own for h in found}
    assert keys[350] not in found_keys and not found_keys & set(holdout.keys)
    assert own[0][0].key == keys[17]

    # a hit's image is its shard's own bytes, found by one ranged read
    images_of = ShardImages(root, shards=2)
    for found in hits:
        hit = found[0]
        expected = next(image_of(fields) for key, fields in iter_samples(RunLayout(root).shard_tar(hit.shard))
                        if key == hit.key)
        assert images_of.image(hit.shard, hit.key) == expected
    assert len(images_of.spans) == 2 and images_of.image("00000", "00099999") is None


def test_dalle2_index_builds_as_a_stage_and_searches_by_text_and_image(planted, tmp_path, capsys):
    import yaml

    root = planted[0]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"root": root, "ray": {"num_cpus": 2}, "holdout": {"rows": 10, "max_shards": 4,
                                                                                       "seed": 1}}))
    assert cli.main(["index", "--config", str(config)]) == 0
    from jobs.index import complete
    from jobs.run_config import load_run_config

    assert complete(load_run_config(root))
    assert cli.main(["index", "--root", root, "--set", "index.kind=flat"]) == 0  # the run's own config, one change
    assert load_run_config(root).index.kind == "flat" and complete(load_run_config(root))
    capsys.readouterr()
    image = tmp_path / "query.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 30, 30)).save(image)
    assert cli.main(["index", "--root", root, "--query", "a red circle", "--query-image", str(image), "--k", "4",
                     "--out", str(tmp_path / "hits.png")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["query"] for line in lines] == ["a red circle", str(image)]
    assert all(len(line["hits"]) == 4 for line in lines)
    grid = Image.open(tmp_path / "hits.png")
    assert grid.size[1] >= 2 * 32  # a row per query
    with pytest.raises(SystemExit, match="--k"):
        cli.main(["index", "--root", root, "--query", "x", "--k", "0"])


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_image_offsets_hold_after_long_name_headers_and_a_compressed_shard_is_read_through(tmp_path, tar_format):
    import gzip
    import io

    from pipeline.formats.shard_reader import image_spans, read_span

    samples = {"0000001": b"\xff\xd8\xff first image", "0000002": b"\x89PNG second image, longer" * 40}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for n, (key, data) in enumerate(samples.items()):
            folder = "deep/" * 30 if n == 0 else "é/"  # a name over 100 bytes, and one not ASCII: long-name headers
            for name, payload in ((f"{folder}{key}.jpg", data), (f"{folder}{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(buffer.getvalue())
    (shards / "00001.tar").write_bytes(gzip.compress(buffer.getvalue()))
    spans = image_spans(str(shards / "00000.tar"))
    assert set(spans) == set(samples)
    assert {key: read_span(str(shards / "00000.tar"), *span) for key, span in spans.items()} == samples
    assert image_spans(str(shards / "00001.tar")) is None  # no offset to seek to in a gzip stream
    images = ShardImages(str(tmp_path))
    assert [images.image("00001", key) for key in samples] == list(samples.values())
    assert images.image("00001", "0000009") is None
