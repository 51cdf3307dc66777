"""The filter stage: planted mismatched captions, near-duplicates (in a shard and across shards) and bad
captions are dropped with their reasons and nothing else is; the ledger and `dalle2 status` reconcile; a
re-run changes nothing; the loaders never hand a dropped row to training."""

import os

import numpy as np
import pytest

from jobs.status import run_status
from pipeline.execution.session import RaySession
from pipeline.formats.aligned import align, write_aligned
from pipeline.run.config import FilterConfig
from pipeline.stages.filter.rules import NEAR_DUPLICATE, caption_ranks, first_of_each_group, low_rank, low_similarity
from pipeline.stages.filter.stage import run_filter
from pipeline.run.layout import RunLayout, make_key
from pipeline.run.ledger import StaleRunError
from pipeline.loaders.batches import EmbeddingBatches
from pipeline.loaders.plan import SamplePlan
from pipeline.run.storage import read_parquet

DIM, PER_SHARD, SHARDS = 16, 40, 3


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_run(root: str) -> dict[str, str]:
    """Three aligned shards of random image embeddings whose captions' embeddings lie close to them, with
    planted faults; returns {key: the reason it must be dropped}."""
    rng = np.random.default_rng(0)
    expected: dict[str, str] = {}
    earlier_images = []
    for shard_id in range(SHARDS):
        image = unit(rng.standard_normal((PER_SHARD, DIM)))
        text = unit(image + 0.3 * unit(rng.standard_normal((PER_SHARD, DIM))))  # cosine about 0.95
        captions = [f"a photo of thing {shard_id}-{i}" for i in range(PER_SHARD)]
        key = lambda i: make_key(shard_id, i, 5, 2)  # noqa: E731
        for i in (3, 17):  # a caption that belongs to another image
            text[i] = unit(rng.standard_normal(DIM))
            expected[key(i)] = low_similarity(0.5)
        # row 2 posted again, as a near copy with the same caption
        image[9], text[9], captions[9] = unit(image[2] + 0.01 * rng.standard_normal(DIM)), text[2], captions[2]
        expected[key(9)] = NEAR_DUPLICATE
        if earlier_images:  # a near copy of a kept row of the shard before
            image[25] = unit(earlier_images[-1][30] + 0.01 * rng.standard_normal(DIM))
            text[25] = unit(image[25] + 0.1 * unit(rng.standard_normal(DIM)))
            expected[key(25)] = NEAR_DUPLICATE
        captions[5], captions[6] = "  ", "x" * 300
        expected[key(5)], expected[key(6)] = "caption too short", "caption too long"
        present = np.ones(PER_SHARD, dtype=bool)
        present[38] = False  # a failed download: absent, not an input row of the filter
        rows = np.nonzero(present)[0]
        aligned = align(shard_id, PER_SHARD, 5, 2, rows, image[rows].astype(np.float16),
                        text[rows].astype(np.float16), [captions[i] for i in rows])
        write_aligned(RunLayout(root), f"{shard_id:05d}", aligned)
        earlier_images.append(image)
    return expected


CONFIG = dict(min_similarity=0.5, duplicate_threshold=0.97, max_caption_chars=200, distributor="local")


def dropped(root: str) -> dict[str, str]:
    out = {}
    for shard in range(SHARDS):
        mask = read_parquet(RunLayout(root).filter_mask(f"{shard:05d}")).to_pydict()
        assert mask["index"] == list(range(PER_SHARD))  # one row per aligned row
        out.update({k: r for k, keep, r in zip(mask["key"], mask["keep"], mask["reason"]) if not keep and r != "absent"})
    return out


# Flat: exact; IVF1: trained on the first shard's kept rows, the last shard searched approximately; the cluster
# example's IVF4096,SQ8 never sees enough rows to train here, so it searches its warm-up flat index, exactly
@pytest.mark.parametrize("index", ["Flat", "IVF1,Flat", "IVF1,SQ8", "IVF4096,SQ8"])
def test_planted_faults_are_dropped_with_their_reasons_and_nothing_else(tmp_path, index):
    root = str(tmp_path / "run")
    expected = planted_run(root)
    config = FilterConfig(**CONFIG, duplicate_index=index)
    summary = run_filter(config, root, RaySession())
    found = dropped(root)
    assert found == expected
    present = SHARDS * (PER_SHARD - 1)
    assert summary["rows_in"] == present and summary["written"] == present - len(expected)
    assert summary["failed_by_reason"] == {"caption too short": 3, "caption too long": 3, low_similarity(0.5): 6,
                                           NEAR_DUPLICATE: 5}
    # the in-shard duplicate names the row it copies; the cross-shard one a row of the shard before
    mask = read_parquet(RunLayout(root).filter_mask("00001")).to_pydict()
    assert mask["duplicate_of"][9] == make_key(1, 2, 5, 2) and mask["duplicate_of"][25] == make_key(0, 30, 5, 2)
    assert abs(mask["similarity"][0] - 0.95) < 0.05 and mask["similarity"][3] < 0.5

    # dalle2 status shows and reconciles it
    status = run_status(root)
    assert status["filter"]["written"] == summary["written"] and status["problems"] == []

    # a re-run changes nothing; other settings are refused rather than mixed in
    again = run_filter(config, root, RaySession())
    assert dropped(root) == expected and again["written"] == summary["written"]
    with pytest.raises(StaleRunError, match="min_similarity was 0.5, now 0.3"):
        run_filter(config.model_copy(update={"min_similarity": 0.3}), root, RaySession())


def test_a_caption_that_is_not_clips_first_choice_for_its_image_is_dropped(tmp_path):
    root = str(tmp_path / "run")
    expected = planted_run(root)
    run_filter(FilterConfig(max_caption_rank=1, duplicate_threshold=0.97, max_caption_chars=200, distributor="local"), root, RaySession())
    # the same rows as the absolute threshold finds here, named for the rank rule
    assert dropped(root) == {k: low_rank(1) if r == low_similarity(0.5) else r for k, r in expected.items()}


def test_caption_ranks_count_the_captions_clip_prefers():
    image = unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]]))
    text = unit(np.array([[1.0, 0.1], [0.1, 1.0], [0.1, 1.0]]))  # row 2 carries row 1's caption
    ranks = caption_ranks(image, text, ["a", "b", "b"], np.arange(3), block=2)
    assert ranks.tolist() == [1, 1, 2]  # row 2's image is closer to caption "a" than to its own "b"


def test_the_loaders_never_hand_a_dropped_row_to_training(tmp_path):
    root = str(tmp_path / "run")
    expected = planted_run(root)
    run_filter(FilterConfig(**CONFIG), root, RaySession())
    plan = SamplePlan.from_aligned(root, filtered=True)
    assert plan.size == SHARDS * (PER_SHARD - 1) - len(expected)
    seen = set()
    for rank in range(2):
        for epoch in range(2):
            for batch in EmbeddingBatches(root, plan, batch_size=8, rank=rank, world_size=2, shuffle_buffer=4).epoch(epoch):
                seen.update(batch["key"])
    assert seen and not seen & set(expected)
    assert len(seen) == plan.size  # and every kept row is seen
    unfiltered = SamplePlan.from_aligned(root)
    assert unfiltered.size == SHARDS * (PER_SHARD - 1)


def test_training_refuses_to_start_before_the_filter_ran(tmp_path):
    root = str(tmp_path / "run")
    planted_run(root)
    with pytest.raises(FileNotFoundError, match="no filter mask .*00000.parquet: run the filter stage"):
        SamplePlan.from_aligned(root, filtered=True)


def tiny_language_model(folder) -> str:
    """A fastText language id model trained here on a few English and French captions (lid.176.bin's format)."""
    fasttext = pytest.importorskip("fasttext", reason="filter.language_model needs fasttext-wheel (the dev extra)")
    english = ["a red circle on the left", "the cat sits on the mat", "a photo of a dog in the park",
               "blue sky over the sea", "a man riding a bike", "two people walking on the beach"]
    french = ["un cercle rouge à gauche", "le chat est sur le tapis", "une photo d'un chien dans le parc",
              "ciel bleu sur la mer", "un homme à vélo", "deux personnes marchent sur la plage"]
    corpus = folder / "languages.txt"
    corpus.write_text("".join(f"__label__en {a}\n__label__fr {b}\n" for _ in range(40) for a, b in zip(english, french)))
    model = fasttext.train_supervised(str(corpus), epoch=25, minn=2, maxn=4, dim=16, verbose=0, thread=1, seed=0)
    model.save_model(str(folder / "lid.bin"))
    return str(folder / "lid.bin")


def test_captions_in_another_language_are_dropped(tmp_path):
    model = tiny_language_model(tmp_path)
    root = str(tmp_path / "run")
    planted_run(root)
    aligned = RunLayout(root).aligned_files("00001")
    meta = read_parquet(aligned["metadata"]).to_pydict()
    meta["caption"][11], meta["caption"][12] = "une photo d'un chat sur la plage", "le chien sur le tapis rouge"
    meta["caption"][13] = "a photo of a cat on the beach"
    import pyarrow as pa

    from pipeline.run.storage import write_parquet

    write_parquet(aligned["metadata"], pa.table(meta))
    run_filter(FilterConfig(language_model=model, languages=["en"], distributor="local"), root, RaySession())
    mask = read_parquet(RunLayout(root).filter_mask("00001")).to_pydict()
    # the French captions, and row 6's 300 x's, which are no language at all; the English ones are kept
    assert [i for i, r in enumerate(mask["reason"]) if r == "caption language"] == [6, 11, 12] and mask["keep"][13]


def test_in_shard_duplicates_keep_the_first_of_each_group():
    rng = np.random.default_rng(1)
    base = unit(rng.standard_normal((4, 8)))
    rows = unit(np.stack([base[0], base[1], base[0] + 0.001, base[2], base[1] + 0.001, base[0] - 0.001, base[3]]))
    assert first_of_each_group(rows, 0.99, block=3) == {2: 0, 4: 1, 5: 0}
    assert first_of_each_group(rows, 0.99999999) == {}


def test_the_filter_config_is_checked_at_start():
    from jobs.config_io import ConfigError, load_config
    from jobs.run_config import RunConfig

    for override, field in [("filter.min_similarity=1.5", "filter.min_similarity"),
                            ("filter.duplicate_threshold=1.0", "filter.duplicate_threshold"),
                            ("filter.min_language_score=-1", "filter.min_language_score")]:
        with pytest.raises(ConfigError, match=field):
            load_config(RunConfig, overrides=[override])


def test_run_redoes_the_filter_when_its_settings_change(tmp_path):
    from jobs.run_config import RunConfig
    from jobs.stages import STAGES

    root = str(tmp_path / "run")
    planted_run(root)
    run_filter(FilterConfig(**CONFIG), root, RaySession())
    stage = next(s for s in STAGES if s.name == "filter")
    same = RunConfig(root=root, filter=FilterConfig(**CONFIG))
    changed = RunConfig(root=root, filter=FilterConfig(**{**CONFIG, "min_similarity": 0.3}))
    assert stage.complete(same) and not stage.complete(changed)  # not skipped: the stage refuses, saying why


def test_a_fresh_start_after_a_failed_shard_reuses_nothing_of_the_old_settings(tmp_path):
    import shutil

    root = str(tmp_path / "run")
    expected = planted_run(root)
    layout = RunLayout(root)
    npy = layout.aligned_files("00002")["img_emb"]
    shutil.move(npy, f"{npy}.away")  # the last shard cannot be read: it fails, the others' first pass is kept
    summary = run_filter(FilterConfig(**{**CONFIG, "min_similarity": 0.99}), root, RaySession())
    assert list(summary["failed_shards"]) == ["00002"] and summary["failed_shards"]["00002"]["rows"] == PER_SHARD - 1
    # as the error message says to start over with other settings: delete the masks and the ledger
    shutil.move(f"{npy}.away", npy)
    shutil.rmtree(layout.filter, ignore_errors=True)
    shutil.rmtree(layout.ledger_dir("filter"))
    os.remove(layout.ledger_fingerprint("filter"))
    os.remove(layout.ledger_summary("filter"))
    run_filter(FilterConfig(**CONFIG), root, RaySession())
    assert dropped(root) == expected  # under 0.99 most rows would have gone


def test_a_shard_added_later_is_checked_against_every_kept_row(tmp_path):
    import shutil

    root = str(tmp_path / "run")
    planted_run(root)
    layout = RunLayout(root)
    away = tmp_path / "away"
    away.mkdir()
    for path in layout.aligned_files("00001").values():  # shard 00001 arrives after 00000 and 00002 are filtered
        shutil.move(path, away / os.path.basename(path))
    run_filter(FilterConfig(**CONFIG), root, RaySession())
    for path in layout.aligned_files("00001").values():
        shutil.move(away / os.path.basename(path), path)
    run_filter(FilterConfig(**CONFIG), root, RaySession())
    mask = read_parquet(layout.filter_mask("00001")).to_pydict()
    assert mask["reason"][25] == NEAR_DUPLICATE and mask["duplicate_of"][25] == make_key(0, 30, 5, 2)
    # shard 00002's copy of 00001's row 30 was kept before 00001 came: now 00001's row 30 is the copy
    assert mask["reason"][30] == NEAR_DUPLICATE and mask["duplicate_of"][30] == make_key(2, 25, 5, 2)
