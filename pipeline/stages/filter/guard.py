"""When the filter's CLIP rules may judge a run, and how much they may drop before the stage stops and asks.

The rules that judge a row with a model (CLIP similarity, caption rank, fastText language) are tuned on some data
and wrong on other data: a caption-rank rule tuned for a CLIP that ranks captions right 97% of the time drops most
rows of a run whose CLIP is right 20% of the time. So, before pass 1, the run's CLIP is tried on the held-out rows
(pipeline/formats/holdout.py) as each rule needs it (NEEDS): the rank rule, its own caption among the held-out captions;
the similarity rule, its own caption against 9 others. Below `filter.min_clip_retrieval` a rule is skipped (or
applied when told to) and the summary says why. After pass 1, when the model rules would drop more than `filter.max_clip_drop` of the run's
rows, the stage stops naming each rule and its share, unless `filter.on_large_clip_drop: continue`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

import numpy as np

from pipeline.formats.holdout import Holdout
from pipeline.run.config import FilterConfig
from pipeline.run.layout import REASON, RunLayout
from pipeline.run.ledger import StageStopped

log = logging.getLogger(__name__)

LANGUAGE = "caption language"


def clip_rules(config: FilterConfig) -> dict[str, str]:
    """{kind: drop reason} of the set rules that judge with CLIP (the ones a poor CLIP gets wrong): "rank", "similarity"."""
    from pipeline.stages.filter.rules import low_rank, low_similarity

    rules = {}
    if config.max_caption_rank is not None:
        rules["rank"] = low_rank(config.max_caption_rank)
    if config.min_similarity is not None:
        rules["similarity"] = low_similarity(config.min_similarity)
    return rules


def model_rules(config: FilterConfig) -> list[str]:
    """The drop reasons counted towards `max_clip_drop`: CLIP's and the language model's (not duplicates or length)."""
    return list(clip_rules(config).values()) + ([LANGUAGE] if config.language_model else [])


def held_out_retrieval(root: str, holdout: Holdout, rank: int = 1) -> Optional[dict]:
    """How often a held-out image's CLIP embedding picks its own caption's first among the held-out captions (each
    distinct caption once), and within the first `rank`, and against 9 others, beside chance; None when fewer than 2
    held-out rows have both embeddings (`why` says so)."""
    from pipeline.formats.aligned import read_aligned
    from pipeline.stages.filter.rules import caption_ranks, normalized

    layout = RunLayout(root)
    images, texts, captions = [], [], []
    for shard, rows in holdout.rows().items():
        try:
            aligned = read_aligned(layout, shard)
        except FileNotFoundError:
            continue  # a held-out shard without embeddings (embed failed there): the others still tell
        if aligned.text_emb is None:
            continue  # no text embeddings (a reorder of image-only embeddings): the CLIP rules cannot run there either
        rows = rows[rows < len(aligned.present)]
        rows = rows[np.asarray(aligned.present)[rows]]
        images.append(normalized(aligned.img_emb[rows]))
        texts.append(normalized(aligned.text_emb[rows]))
        captions += [aligned.captions[i] for i in rows.tolist()]
    if len(captions) < 2:
        return None
    image, text = np.concatenate(images), np.concatenate(texts)
    first = {}
    for i, caption in enumerate(captions):
        first.setdefault(caption, i)
    distinct = list(first)
    if len(distinct) < 2:
        return None
    candidates = text[[first[c] for c in distinct]]
    ranks = caption_ranks(image, text, captions, np.arange(len(captions)))  # as the rank rule ranks a shard's
    right = float(np.mean(ranks <= 1))
    import torch

    from dalle2.metrics import r_precision_sampled

    of_ten = r_precision_sampled(torch.from_numpy(image), torch.from_numpy(candidates),
                                 torch.tensor([distinct.index(c) for c in captions]), distractors=9, repeats=10)
    return {"retrieval": round(right, 4), "chance": round(1 / len(distinct), 4), "rows": len(captions),
            "captions": len(distinct), "rank": rank, "retrieval_at_rank": round(float(np.mean(ranks <= rank)), 4),
            "retrieval_of_10": round(of_ten["r_precision"], 4),
            "chance_of_10": round(of_ten["r_precision_chance"], 4)}


# What each CLIP rule needs of the run's CLIP. The caption-rank rule is itself a retrieval among the shard's
# captions: it drops a right row whenever CLIP ranks the caption below k, so it needs CLIP to find the own caption
# among the held-out ones (a pool like a shard's). The similarity rule needs only that CLIP tells a right caption
# from wrong ones: its own caption against 9 others (chance 10%), which a pretrained CLIP on web data passes.
NEEDS = {"rank": ("retrieval_at_rank", "own caption within the first {rank} of the {captions} held-out captions"),
         "similarity": ("retrieval_of_10", "own caption against 9 other held-out captions")}


def trusted_config(config: FilterConfig, root: str, holdout: Holdout) -> tuple[FilterConfig, dict]:
    """The settings pass 1 runs with, and the CLIP check that chose them (for the summary and the report): a CLIP
    rule is skipped when the run's CLIP retrieves held-out captions, as that rule needs, below `min_clip_retrieval`,
    unless `on_untrusted_clip: apply`."""
    rules = clip_rules(config)
    found = held_out_retrieval(root, holdout, rank=config.max_caption_rank or 1)
    if found is None:
        return config, {"checked": False, "why": "fewer than 2 held-out rows with image and text embeddings, or one "
                                                 "caption among them, to check CLIP on (holdout.rows)"}
    untrusted = [kind for kind in rules if found[NEEDS[kind][0]] < config.min_clip_retrieval]
    skipped = untrusted if config.on_untrusted_clip == "skip" else []
    check = {"checked": True, **found, "min_clip_retrieval": config.min_clip_retrieval, "trusted": not untrusted,
             "rules": list(rules.values()), "skipped_rules": [rules[k] for k in skipped], "skipped": bool(skipped)}
    if not untrusted:  # measured either way: the report says how well the run's CLIP knows its captions
        return config, check
    message = "; ".join(
        f"filter: the run's CLIP picks a held-out image's {NEEDS[kind][1].format(**found)} {found[NEEDS[kind][0]]:.0%} "
        f"of the time, below filter.min_clip_retrieval {config.min_clip_retrieval:.0%}: '{rules[kind]}' would drop "
        "good rows" for kind in untrusted)
    if not skipped:
        log.warning("%s; applied anyway (filter.on_untrusted_clip: apply)", message)
        return config, check
    log.warning("%s; skipped, no row is dropped for it (filter.on_untrusted_clip: apply to use it)", message)
    check["why"] = f"{message}; skipped: {', '.join(check['skipped_rules'])}"
    return config.model_copy(update={"min_similarity": None if "similarity" in skipped else config.min_similarity,
                                     "max_caption_rank": None if "rank" in skipped else config.max_caption_rank}), check


def model_drops(layout: RunLayout, masks: list[str], config: FilterConfig) -> tuple[int, Counter]:
    """(rows in, {model rule: rows it dropped}) over pass 1's masks (`masks`: their paths)."""
    from pipeline.run.storage import read_parquet

    rules, rows_in, dropped = set(model_rules(config)), 0, Counter()
    for path in masks:
        reasons = read_parquet(path, columns=[REASON]).column(REASON).to_pylist()
        rows_in += sum(1 for r in reasons if r != "absent")
        dropped.update(r for r in reasons if r in rules)
    return rows_in, dropped


def check_model_drops(config: FilterConfig, rows_in: int, dropped: Counter) -> None:
    """Stop the stage, naming each rule and its share, when the model rules drop more than `max_clip_drop` of the
    rows (unless `on_large_clip_drop: continue`)."""
    total = sum(dropped.values())
    if not rows_in or total <= config.max_clip_drop * rows_in:
        return
    rules = ", ".join(f"'{rule}' {count} ({count / rows_in:.0%})" for rule, count in dropped.most_common())
    message = (f"filter: the rules that judge with a model would drop {total} of {rows_in} rows ({total / rows_in:.0%}), "
               f"more than filter.max_clip_drop {config.max_clip_drop:.0%}: {rules}")
    if config.on_large_clip_drop == "continue":
        log.warning("%s; dropping them (filter.on_large_clip_drop: continue)", message)
        return
    raise StageStopped(f"{message}. Settings tuned on other data drop good rows here: loosen or unset "
                       "filter.min_similarity / filter.max_caption_rank / filter.language_model, or set "
                       "filter.on_large_clip_drop=continue to drop them anyway")
