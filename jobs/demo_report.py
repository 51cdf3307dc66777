"""What the demo judges its samples on, and its report page: the built-in set's prompts scored off the pixels,
a user's list's own held-out captions generated beside their real images, the filter's catch, text-image agreement.
"""

from __future__ import annotations

from typing import Optional


def held_out_prompts(root: str, count: int, per_prompt: int, image_size: int):
    """(prompts, real images, distinct real images): up to `count` distinct captions of the run's held-out rows
    (pipeline/formats/holdout.py), for a user's list, whose own captions are what its model should answer; each with
    `per_prompt` of its held-out images ([count * per_prompt, 3, H, W] in [0, 1], repeated when it has fewer: the
    grid and R-precision), and every held-out image of those captions once (the distances)."""
    import torch

    from pipeline.formats.holdout import load_holdout
    from pipeline.loaders.batches import ShardImageBatches
    from pipeline.loaders.plan import SamplePlan

    plan = SamplePlan.from_shards(root, part="held_out")
    if not plan.size:
        raise ValueError(f"{root}/holdout.parquet lists no downloaded row: holdout.rows is 0, or the run has too few "
                         "rows to hold any out (it needs 4); the prompts of a --url-list run are its held-out captions")
    batch = next(ShardImageBatches(root, plan, plan.size, shuffle_buffer=1, image_size=image_size).epoch(0))
    images: dict[str, list] = {}
    for caption, image in zip(batch["caption"], batch["image"]):
        images.setdefault(caption, []).append(image)
    prompts = [caption for caption in load_holdout(root).distinct_captions() if caption in images][:count]
    real = torch.stack([images[p][i % len(images[p])] for p in prompts for i in range(per_prompt)])
    return prompts, real, torch.stack([image for p in prompts for image in images[p]])


def filter_check(config, planted: Optional[list[str]]) -> Optional[dict]:
    """How the filter stage did on the rows the demo planted with a wrong caption (None when it did not run)."""
    from pipeline.stages.filter.guard import clip_rules
    from pipeline.run.layout import KEY, REASON, URL, RunLayout
    from pipeline.run.storage import exists, list_files, read_json, read_parquet

    layout = RunLayout(config.root)
    if not config.filter.enabled or not exists(layout.ledger_summary("filter")):
        return None
    summary = read_json(layout.ledger_summary("filter"))
    out = {"rows_in": summary["rows_in"], "kept": summary["written"], "dropped_by_reason": summary["failed_by_reason"],
           "clip_check": summary.get("clip_check")}
    if planted is None:
        return out
    planted_paths = set(planted)
    planted_keys = set()
    for url in list_files(layout.shards, ".parquet"):
        shard = read_parquet(url, columns=[URL, KEY]).to_pydict()
        planted_keys.update(k for u, k in zip(shard[URL], shard[KEY]) if u.split("/", 3)[-1] in planted_paths)
    reasons = {}
    for url in list_files(layout.filter, ".parquet"):
        mask = read_parquet(url, columns=[KEY, REASON]).to_pydict()
        reasons.update(zip(mask[KEY], mask[REASON]))
    clip_reasons = set(clip_rules(config.filter).values())
    out.update(planted_mismatched=len(planted_keys),
               planted_dropped=sum(1 for k in planted_keys if reasons.get(k) in clip_reasons),
               other_dropped_by_clip=sum(1 for k, r in reasons.items() if r in clip_reasons and k not in planted_keys))
    return out


def drawn_prompts(prompts: list[str], per_prompt: int, size: int):
    """Real images of built-in prompts ([len(prompts) * per_prompt, 3, H, W] in [0, 1]), drawn as the set draws them."""
    import random

    import numpy as np
    import torch

    from jobs.shapes import draw, spec_of

    rng = random.Random(1)
    return torch.stack([torch.from_numpy(np.asarray(draw(spec_of(p), size, jitter=0.08, rng=rng), np.float32) / 255)
                        .permute(2, 0, 1) for p in prompts for _ in range(per_prompt)])


def agreement(config, images, prompts: list[str], per_prompt: int, real=None, real_set=None) -> dict:
    """R-precision, CLIP score (the run's CLIP) and CMMD of the samples, beside the same figures on `real` images
    of the same prompts (default: drawn as the built-in set draws them)."""
    import torch

    from .evaluation import caption_pool, inception_of, score_samples, scoring_clip

    real = drawn_prompts(prompts, per_prompt, images.shape[-1]) if real is None else real
    index = torch.arange(len(images)) // per_prompt
    clip = scoring_clip(config)
    captions = [prompts[i] for i in index.tolist()]
    out = score_samples(clip, images, real, captions, caption_pool(config.root, prompts), config.eval,
                        inception_of(config.eval), real_set=real_set)
    if len(prompts) > 1:
        out.update(paired_similarity(clip, images, real, index))
    return out


def paired_similarity(clip, images, real, index) -> dict:
    """How alike (CLIP image cosine) each sample is to the real images of its own prompt, and to those of another
    prompt (prompts rolled by one): the shuffled baseline a model that ignores its prompt cannot beat."""
    import torch

    with torch.no_grad():
        generated = torch.nn.functional.normalize(clip.embed_image(images).float(), dim=-1)
        actual = torch.nn.functional.normalize(clip.embed_image(real).float(), dim=-1)
    prompts = int(index.max()) + 1
    centre = torch.stack([actual[index == p].mean(0) for p in range(prompts)])  # each prompt's real images, pooled
    own = (generated * centre[index]).sum(-1).mean().item()
    other = (generated * centre[(index + 1) % prompts]).sum(-1).mean().item()
    return {"similarity_to_own_real": own, "similarity_to_other_real": other}


def render_report(report: dict) -> str:
    """The report as a short Markdown page (every value from the run's files escaped: md_cell)."""
    from .report import md_cell

    lines = ["# Demo report", "", f"Total time: {report['seconds']} s", "", "| stage | outcome | seconds |", "|---|---|---|"]
    for stage, outcome in report["stages"].items():
        lines.append(f"| {md_cell(stage)} | {md_cell(outcome)} | {md_cell(report['seconds_per_stage'].get(stage, ''))} |")
    lines += ["", "## Data", ""]
    for stage, info in report["status"].items():
        if "rows_in" in info:
            lines.append(f"- {md_cell(stage)}: {md_cell(info['rows_in'])} rows in, {md_cell(info['written'])} written, "
                         f"{md_cell(info['failed'])} failed {md_cell(info.get('failed_by_reason') or '')}")
    filtered = report.get("filter")
    if filtered:
        lines += ["", "## Filter", "", f"- {md_cell(filtered['rows_in'])} rows in, {md_cell(filtered['kept'])} kept, "
                  f"dropped: {md_cell(filtered['dropped_by_reason'] or 'none')}"]
        check = filtered.get("clip_check") or {}
        if check.get("checked"):
            skipped = check.get("skipped_rules", check["rules"] if check.get("skipped") else [])
            lines.append(f"- the run's CLIP picks a held-out image's own caption among {check['captions']} held-out "
                         f"captions {check['retrieval']:.0%} of the time (chance {check['chance']:.0%}), against 9 "
                         f"others {check.get('retrieval_of_10', float('nan')):.0%} (chance 10%); the CLIP rules judge "
                         f"from {check['min_clip_retrieval']:.0%}: "
                         + (f"{md_cell(', '.join(skipped))} skipped" if skipped
                            else "rules applied" if check.get("rules") else "no CLIP rule set"))
        elif check:
            lines.append(f"- CLIP not checked: {md_cell(check.get('why', ''))}")
        if "planted_mismatched" in filtered:
            lines.append(f"- captions planted on the wrong image: {filtered['planted_mismatched']}, dropped by the CLIP "
                         f"checks: {filtered['planted_dropped']}; other rows they dropped: {filtered['other_dropped_by_clip']}")
    lines += ["", "## Training", ""]
    for stage, info in report["status"].items():
        if "step" in info:
            metrics = {k: round(v, 4) for k, v in info.items() if isinstance(v, float)}
            lines.append(f"- {md_cell(stage)}: step {md_cell(info['step'])}, {md_cell(metrics)}")
    if report.get("prompt_match"):  # the built-in set alone: its prompts name what the pixels can be read for
        lines += ["", "## Do the samples match their prompts?", "",
                  "Colour, shape and position read off the pixels of each sample; withheld prompts name combinations "
                  "the data set left out (each attribute seen in training, the combination never).", "",
                  "| prompts | colour | shape | position | all three |", "|---|---|---|---|---|"]
        for label, match in (("seen", report["prompt_match"]), ("withheld", report.get("withheld_match"))):
            if match:
                lines.append(f"| {label} | {match['color_match']:.0%} | {match['shape_match']:.0%} | "
                             f"{match['position_match']:.0%} | {match['all_match']:.0%} |")
        chance = report["prompt_match"]
        lines.append(f"| chance | {chance['chance_color']:.0%} | {chance['chance_shape']:.0%} | "
                     f"{chance['chance_position']:.0%} | {chance['chance_all']:.0%} |")
    else:
        lines += ["", "## Prompts: captions of held-out rows", "",
                  "Captions of rows no stage trained on, each drawn beside a real image of it in samples.png:", ""]
        lines += [f"- {md_cell(prompt)}" for prompt in report["prompts"]]
    agree = report.get("text_image_agreement")
    if agree:
        lines += agreement_rows(agree)
    sampling = report.get("sampling")
    if sampling:  # what `dalle2 sample --root` defaults to as well
        lines += ["", "Sampled with: " + ", ".join(f"{md_cell(k)} {md_cell(v if v is not None else 'the model config')}"
                                                   for k, v in sampling.items())]
    lines += ["", "![samples](samples.png)", ""]
    return "\n".join(lines)


def agreement_rows(agree: dict) -> list[str]:
    """The text-image agreement table: each figure with its noise and what it is compared with."""
    def pm(key: str, digits: int = 3, percent: bool = False) -> str:
        value, noise = agree.get(key), agree.get(f"{key}_se", agree.get(f"{key}_std"))
        if value is None:
            return ""
        shown = f"{value:.0%}" if percent else f"{value:.{digits}f}"
        return shown + (f" ± {noise:.0%}" if percent and noise is not None else f" ± {noise:.{digits}f}" if noise is not None else "")

    lines = ["", "## Text-image agreement", "", "Scored by the run's CLIP unless eval.clip names another; ± one standard "
             "error (KID: its standard deviation over subsets).", "", "| | generated | real |", "|---|---|---|"]
    if "r_precision_chance" in agree:  # runs from before it ranked among the prompts alone
        lines.append(f"| R-precision, 1 of {agree['r_precision_candidates']:.0f} captions (chance "
                     f"{agree['r_precision_chance']:.0%}) | {pm('r_precision', percent=True)} | "
                     f"{pm('real_r_precision', percent=True)} |")
    else:
        lines.append(f"| R-precision | {agree['r_precision']:.0%} | {agree['real_r_precision']:.0%} |")
    lines.append(f"| CLIP score | {agree['clip_score']:.1f} | {agree.get('real_clip_score', float('nan')):.1f} |")
    if "similarity_to_own_real" in agree:
        lines.append(f"| CLIP image similarity to real images of its own prompt / of another prompt (shuffled "
                     f"baseline) | {agree['similarity_to_own_real']:.3f} / {agree['similarity_to_other_real']:.3f} | |")
    for key, label in (("clip_fd", "Fréchet distance on CLIP features, to real (0 is best)"),
                       ("clip_kid", "KID on CLIP features, to real (0 for one distribution)"),
                       ("inception_fd", "FID (Inception v3), to real"), ("inception_kid", "KID (Inception v3), to real"),
                       ("cmmd", "CMMD to real, as the paper's code (x1000, above 0 on small sets)"),
                       ("cmmd_unbiased", "CMMD to real, unbiased (x1000, 0 for one distribution)")):
        if key in agree:
            lines.append(f"| {label} | {pm(key, digits=4 if 'kid' in key else 3)} | |")
    return lines
