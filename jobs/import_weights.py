"""Import DALLE2-pytorch / LAION checkpoints into a run, or export the run's models back to their format.

    dalle2 import --config run.yaml [--set root=RUN] --prior PRIOR.pth --prior-config prior.json
                  [--decoder DECODER.pth --decoder-config decoder.json] [--weights model|ema]
    dalle2 import --root RUN --export OUT_DIR      # the run's prior and decoder as their checkpoints + JSON

Their JSON configs are the files DALLE2-pytorch's train_diffusion_prior.py / train_decoder.py take (or just the
`prior` / `decoder` part of one). Checkpoints are a plain `torch.save(model.state_dict())` or a trainer's save, on any
fsspec path, loaded with weights_only=True. The imported weights become complete checkpoints of the jobs
`prior_imported` and `decoder_imported` under <root>/train, which `dalle2 sample` uses when the run has trained none
of its own, and which `train_prior.init_from` / `train_decoder.init_from` fine-tune from. The CLIP their config names
becomes the run's `embed.clip` unless the run sets one.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Optional

from .run_config import RunConfig

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_imported"


def their_clip(section: dict) -> Optional[dict]:
    """Their `clip` entry ({"make": "openai", "model": "ViT-L/14"}) as our embed.clip, or None when it names none."""
    clip = section.get("clip")
    if not clip:
        return None
    make, model = clip.get("make"), clip.get("model")
    if make == "openai":  # open_clip serves OpenAI's weights under its own names (ViT-L/14 -> ViT-L-14, tag openai),
        # with QuickGELU as they were trained (dalle2.clip.build_open_clip)
        return {"model_name": model.replace("/", "-"), "pretrained": "openai"}
    if make == "open_clip":  # their adapter takes `dict(open_clip.list_pretrained())[model]`: the last tag listed
        import open_clip

        tag = dict(open_clip.list_pretrained()).get(model)
        if tag is None:
            raise ValueError(f"their config's clip.model {model!r} has no pretrained weights in open_clip: set "
                             "embed.clip to the CLIP those weights were trained with")
        log.warning("their config names open_clip's %s without a tag; DALLE2-pytorch takes the last one open_clip "
                    "lists, here %r: set embed.clip.pretrained if theirs was another", model, tag)
        return {"model_name": model, "pretrained": tag}
    raise ValueError(f"their config's clip.make {make!r} is not an open_clip CLIP (x-clip and coca are not supported): "
                     "set embed.clip to the CLIP those weights were trained with")


def check_clip_widths(config: RunConfig, embed_dim: int, text_width: Optional[int], max_text_len: Optional[int],
                      what: str) -> None:
    """Refuse, naming both, a model whose widths do not fit the run's CLIP (read from its architecture, no weights)."""
    from dalle2.clip import checkpoint_model_name
    from dalle2.clip_spec import clip_model_config

    source = config.embed.clip
    name = checkpoint_model_name(source.checkpoint) if source.checkpoint else source.model_name
    arch = clip_model_config(name)
    clip_text = arch["text_cfg"]
    problems = []
    if arch["embed_dim"] != embed_dim:
        problems.append(f"it embeds to {arch['embed_dim']} dims, {what} takes {embed_dim}")
    if text_width is not None and clip_text.get("width") != text_width:
        problems.append(f"its text tokens are {clip_text.get('width')} wide, {what} takes {text_width}")
    if max_text_len is not None and clip_text.get("context_length", 77) > max_text_len:
        problems.append(f"it gives {clip_text.get('context_length', 77)} text tokens, {what} takes {max_text_len}")
    if problems:
        raise ValueError(f"embed.clip ({name}) does not fit {what}: {'; '.join(problems)}")


def write_imported(root: str, kind: str, model, source: str) -> str:
    """Save an imported model as a complete checkpoint of the job `<kind>_imported`; returns its folder. No EMA copy:
    loading EMA weights falls back to the model's."""
    from dalle2.checkpoint import save_checkpoint, trainable_state
    from pipeline.run.layout import TrainLayout
    from pipeline.run.storage import write_json

    layout, job = TrainLayout(root), TrainLayout.IMPORTED[kind]
    folder = f"{layout.job(job)}/{CHECKPOINT}"
    prefixes = ["net."] if kind == "prior" else [f"unets.{i}." for i in range(len(model.unets))]
    save_checkpoint(folder, trainable_state(model, prefixes), model.config.model_dump(mode="json"),
                    state={"steps": [0], "parts": prefixes, "imported_from": source})
    write_json(layout.summary(job), {"checkpoint": folder, "imported_from": source, "step": 0})
    return folder


def check_fits(config: RunConfig, kind: str, section: dict) -> None:
    """Their config converted (unsupported options refused by name) and checked against the run's CLIP."""
    from dalle2.interop.configs import decoder_config_from_theirs, prior_config_from_theirs

    if kind == "prior":
        prior = prior_config_from_theirs(section)
        net, text = prior.net, prior.condition_on_text_encodings
        check_clip_widths(config, net.dim, net.dim if text else None, net.max_text_len if text else None,
                          "the imported prior")
        return
    decoder = decoder_config_from_theirs(section)
    first = decoder.unets[0]
    if not decoder.unconditional:
        text = first.cond_on_text_encodings
        check_clip_widths(config, first.image_embed_dim, (first.text_encoding_dim or first.image_embed_dim) if text
                          else None, first.max_text_len if text else None, "the imported decoder")


def import_models(config: RunConfig, models: dict[str, tuple[str, str]], weights: str = "model") -> dict[str, str]:
    """Their models ({kind: (checkpoint, JSON config)}, kind "prior" or "decoder") into the run: every config checked
    and every weight loaded before anything is written; then the run config (with their CLIP) and one checkpoint
    each. Returns {kind: checkpoint folder}."""
    from dalle2.interop.configs import read_their_config
    from dalle2.interop.weights import decoder_from_theirs, prior_from_theirs

    from .run_config import save_run_config

    sections = {kind: read_their_config(their_config) for kind, (_, their_config) in models.items()}
    config = with_their_clip(config, sections)
    for kind, section in sections.items():
        check_fits(config, kind, section)  # refused here, before any weight is read
    build = {"prior": prior_from_theirs, "decoder": decoder_from_theirs}
    loaded = {kind: build[kind](models[kind][0], section, weights) for kind, section in sections.items()}
    save_run_config(config)
    return {kind: write_imported(config.root, kind, model, models[kind][0]) for kind, model in loaded.items()}


def export_run(config: RunConfig, out: str) -> dict[str, str]:
    """The run's latest prior and decoder (EMA weights) as their checkpoints (plain state dicts) and JSON configs in
    `out`: prior.pth + prior.json, decoder.pth + decoder.json. Only reference-architecture models export."""
    import io

    import torch

    from dalle2.checkpoint import write_bytes
    from dalle2.interop.weights import to_theirs

    from .checkpoints import load_models

    prior, decoder = load_models(config)  # no CLIP: theirs is named in their config, not saved with the weights
    written = {}
    for name, model in (("prior", prior), ("decoder", decoder)):
        state, section = to_theirs(model)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes(f"{out.rstrip('/')}/{name}.pth", buffer.getvalue())
        write_bytes(f"{out.rstrip('/')}/{name}.json", json.dumps(section, indent=1).encode())
        written[name] = f"{out.rstrip('/')}/{name}.pth"
    return written


def main(argv: Optional[list[str]] = None) -> dict:
    """Import their checkpoints into the run (or export the run's models); returns what was written."""
    from pipeline.execution.console import setup_logging

    from .config_io import ConfigError, load_config
    from .run_config import load_run_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the run's YAML config (local or any fsspec URL)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    parser.add_argument("--root", help="the run root (else the config's root)")
    parser.add_argument("--prior", help="their prior checkpoint (.pth / .pt, any fsspec path)")
    parser.add_argument("--prior-config", help="its JSON config (TrainDiffusionPriorConfig, or its `prior` part)")
    parser.add_argument("--decoder", help="their decoder checkpoint")
    parser.add_argument("--decoder-config", help="its JSON config (TrainDecoderConfig, or its `decoder` part)")
    parser.add_argument("--weights", choices=["model", "ema"], default="model",
                        help="of a trainer's save: the trained weights or their EMA")
    parser.add_argument("--export", metavar="OUT_DIR", help="write the run's models in their format instead")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = list(args.set) + ([f"root={args.root}"] if args.root else [])
    if args.export:
        config = load_run_config(args.root) if args.root and not args.config else load_config(RunConfig, args.config, overrides)
        written = export_run(config, args.export)
        print(json.dumps(written))
        return written
    for flag, config_flag in (("prior", "prior_config"), ("decoder", "decoder_config")):
        if bool(getattr(args, flag)) != bool(getattr(args, config_flag)):
            parser.error(f"--{flag} and --{config_flag.replace('_', '-')} go together")
    if not (args.prior or args.decoder):
        parser.error("give --prior (with --prior-config) and/or --decoder (with --decoder-config), or --export")
    config = load_config(RunConfig, args.config, overrides)
    models = {kind: (getattr(args, kind), getattr(args, f"{kind}_config")) for kind in ("prior", "decoder")
              if getattr(args, kind)}
    try:  # one line naming the file, option or field at fault, no traceback (UnsupportedOption is a ValueError)
        written = import_models(config, models, args.weights)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    print(json.dumps(written))
    log.info("imported %s into %s: `dalle2 sample --root %s --prompt ...` samples them; fine-tune with "
             "train_prior.init_from / train_decoder.init_from=%s", sorted(written), config.root, config.root, config.root)
    return written


def with_their_clip(config: RunConfig, sections: dict[str, dict]) -> RunConfig:
    """The run config with the CLIP their configs name as embed.clip, unless the run names its own."""
    from pipeline.run.config import ClipSource

    if config.embed.clip != ClipSource():
        return config
    for kind, data in sections.items():
        clip = their_clip(data.get(kind) or data)
        if clip:
            log.info("embed.clip from their %s config: %s", kind, clip)
            update = config.model_dump(mode="json")
            update["embed"]["clip"] = clip
            update["train_clip"]["enabled"] = False  # their models were trained on that CLIP: keep it
            return RunConfig.model_validate(update)
    return config


if __name__ == "__main__":
    main()
