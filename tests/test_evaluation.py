"""How samples are scored (jobs/evaluation.py): every figure beside its noise, its chance or its real-image twin,
by the CLIP the config names."""

import numpy as np
import pytest
import torch

from jobs.evaluation import EvalConfig, caption_pool, score_samples, scoring_clip
from jobs.shapes import all_specs, draw


def shape_images(captions, size=32, seed=0):
    import random

    rng = random.Random(seed)
    specs = {spec.caption: spec for spec in all_specs()}
    return torch.stack([torch.from_numpy(np.asarray(draw(specs[c], size, jitter=0.08, rng=rng), np.float32) / 255)
                        .permute(2, 0, 1) for c in captions])


def test_scores_of_real_images_as_samples_equal_the_real_figures_and_their_distances_are_zero(tiny_clip):
    pool = [spec.caption for spec in all_specs()]  # 54 distinct captions
    captions = [pool[i % 9] for i in range(18)]
    real = shape_images(captions)
    scores = score_samples(tiny_clip, real, real, captions, pool, EvalConfig(repeats=4))
    assert scores["r_precision_chance"] == pytest.approx(1 / 54) and scores["r_precision_candidates"] == 54
    assert scores["r_precision"] == scores["real_r_precision"] and scores["clip_score"] == scores["real_clip_score"]
    assert 0 <= scores["r_precision_se"] <= 0.13  # at most 0.5 / sqrt(17) for 18 images
    assert scores["clip_fd"] == pytest.approx(0, abs=1e-4) and scores["cmmd"] == pytest.approx(0, abs=1e-4)
    assert scores["cmmd_unbiased"] < 0  # small sets of one distribution: the unbiased figure dips below 0
    assert "inception_fd" not in scores  # no weights configured: no FID, and nothing downloaded

    # other images (another seed's jitter and other captions) are further from the real ones, by more than FD's noise
    others = shape_images([pool[9 + i % 9] for i in range(18)], seed=1)
    apart = score_samples(tiny_clip, others, real, captions, pool, EvalConfig(repeats=4))
    assert apart["clip_fd"] > scores["clip_fd"] + 3 * apart["clip_fd_se"] and apart["clip_kid"] > 0


class ColourClip:
    """A CLIP whose image embedding is the mean colour of the shape (centred) and whose text embedding is the caption's colour:
    text-image cosines that are known, not a random model's."""

    def embed_image(self, images):
        saturated = (images.amax(dim=1, keepdim=True) - images.amin(dim=1, keepdim=True) > 0.3).float()
        return (images * saturated).sum(dim=(2, 3)) / saturated.sum(dim=(2, 3)).clamp(min=1) - 0.5

    def embed_text(self, captions):
        from types import SimpleNamespace

        from jobs.shapes import COLORS

        rgb = {name: torch.tensor(value, dtype=torch.float32) / 255 - 0.5 for name, value in COLORS.items()}
        return SimpleNamespace(text_embed=torch.stack([rgb[c.split()[1]] for c in captions]))


def test_the_real_images_figures_are_theirs_alone_and_colour_follows_the_caption():
    pool = [spec.caption for spec in all_specs()]
    captions = [pool[i % 9] for i in range(18)]
    real = shape_images(captions)
    wrong = shape_images([pool[(i + 27) % 54] for i in range(18)], seed=1)  # other colours
    right = score_samples(ColourClip(), real, real, captions, pool, EvalConfig(repeats=4))
    apart = score_samples(ColourClip(), wrong, real, captions, pool, EvalConfig(repeats=4))
    assert apart["real_clip_score"] == right["real_clip_score"] == right["clip_score"] > apart["clip_score"] + 5
    assert apart["real_r_precision"] == right["real_r_precision"]


def test_the_caption_pool_is_the_prompts_then_every_held_out_caption_once(tmp_path):
    from pipeline.run.config import HoldoutConfig
    from pipeline.stages.holdout import ensure_holdout
    from tests.runs import make_training_run

    root = str(tmp_path / "run")
    make_training_run(root, count=120, per_shard=40, size=32, dim=8)
    held = ensure_holdout(root, HoldoutConfig(rows=30)).distinct_captions()
    pool = caption_pool(root, ["a prompt no row has", held[0]])
    assert pool == ["a prompt no row has"] + held and len(set(pool)) == len(pool)


def test_the_scoring_clip_is_the_one_eval_clip_names_else_the_runs(tmp_path, tiny_clip):
    from dalle2.clip import ClipAdapter
    from jobs.run_config import RunConfig

    torch.manual_seed(7)
    other = ClipAdapter("tiny-clip")
    other.save(str(tmp_path / "judge"))
    run = RunConfig(root=str(tmp_path / "run"), eval={"clip": {"checkpoint": str(tmp_path / "judge")}})
    judge = scoring_clip(run)
    assert all(torch.equal(a, b) for a, b in zip(judge.state_dict().values(), other.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(judge.state_dict().values(), tiny_clip.state_dict().values()))


def _rank_zero_scores_alone(rank: int, init_file: str, out: str) -> None:
    """One of two gloo processes, as Ray Train's workers are: rank 0 computes FD and KID alone, then both meet."""
    import datetime

    import torch.distributed as dist

    from dalle2.metrics import frechet_distance, kernel_distance

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # a metric waiting for rank 1 fails, not hangs
    if rank == 0:
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(20, 4, generator=generator), torch.randn(20, 4, generator=generator) + 1
        with open(out, "w") as f:
            f.write(f"{frechet_distance(x, y)} {kernel_distance(x, y, subsets=5)[0]}")
    dist.barrier()
    dist.destroy_process_group()


def test_image_distances_on_one_rank_of_a_process_group_do_not_wait_for_the_others(tmp_path):
    # torchmetrics syncs a metric over the default process group when one exists: the decoder's rank 0, scoring
    # every rank's samples alone, waited for ever on the other rank (found by the quick demo)
    import torch.multiprocessing as mp

    out = tmp_path / "scores"
    mp.spawn(_rank_zero_scores_alone, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    fd, kid = map(float, out.read_text().split())
    assert fd > 1 and kid > 0  # two sets a whole unit apart in each of 4 dimensions
