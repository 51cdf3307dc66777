"""Our prior and decoder against lucidrains' DALLE2-pytorch 1.15.6, at the configs of bench/train_step.py.

One JSON line per case: both implementations' samples/s and peak RSS (MB), side by side, with
ratio = ours / theirs (samples/s). Each case runs once per implementation, each in its own process
(ours: this interpreter; theirs: the bench venv), so each peak RSS is its own. Usage:
    python bench/vs_dalle2_pytorch.py                     # build the venv if missing, then every case
    python bench/vs_dalle2_pytorch.py --case NAME --impl ours|theirs [--max-text-len N]   # one run

Their venv, built on first use at bench/.venvs/dalle2-pytorch: torch 2.14.1 + torchvision 0.29.1, then
dalle2-pytorch==1.15.6 and setuptools<81 under a constraints file pinning torch/torchvision.

How the figures are made comparable:
- Same threads (2), seed, warmup/iters (bench/train_step.timed), dims, batch, 100 timesteps; theirs
  is trained through their DiffusionPriorTrainer / DecoderTrainer (AdamW + EMA), set to our trainer's
  settings: lr 3e-4, wd 1e-2, grad-norm clip 1.0, EMA beta 0.99 updated every step from step 0
  (ema_pytorch's defaults, update_after_step=100 / update_every=10, would skip EMA work here).
- Prior training, theirs twice: default max_text_len=256 (their net pads absent text encodings with
  256 learned null tokens, so it attends over 260 tokens) and max_text_len=0 (4 tokens, as ours:
  the fair comparison, used for `ratio`). Their net must have dim == image_embed_dim, so the dim512
  case embeds to 512 there (ours: 256, projected to the width).
- Prior sampling: 64 texts, DDIM 64 steps, eta 0, cond_scale 1, max_text_len=0 only (256 would cost
  ~65x more tokens). Both draw 2 candidates per text and keep the one closest to the text embed (ours:
  PriorConfig.num_samples_per_batch=2; theirs: sample()'s default, reproduced around p_sample_loop
  because their sample() needs a CLIP). samples_per_s = candidate embeds drawn / s = 64 * 2 / s.
  Their DDIM makes 63 network calls for "64 steps", ours 64.
- Decoder: learned variance on for unet 1 only (both defaults), cosine schedule, eps prediction,
  dynamic thresholding 0.95 when sampling, self-attention at the lowest level only, 4 heads x 32,
  7x7 init conv, 2 resnet blocks per level (their num_resnet_blocks=1 plus their per-level first
  block), lowres blur + noise augmentation with noise-level conditioning for unet 2.
  Left different (their Unet cannot be set so): theirs cross-attends (8 heads x 64) inside every
  resnet block but the top level, ours only at the lowest level and the middle (4 x 32); their
  self-attention has one key/value head; their unet 2 ignores the image embed (their Decoder
  conditions only unet 1 on it), ours uses it; their lowres resize is nearest, ours bilinear;
  their DecoderTrainer keeps an EMA and optimizer for every unet, ours only for the trained one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import train_step as ts  # bench/train_step.py (this folder is sys.path[0]); torch-only at import time

log = logging.getLogger("vs_dalle2_pytorch")
VENV = Path(__file__).resolve().parent / ".venvs" / "dalle2-pytorch"
THEIRS_PYTHON = VENV / "bin" / "python"
PINS = ["torch==2.14.1", "torchvision==0.29.1"]
PACKAGES = ["dalle2-pytorch==1.15.6", "setuptools<81"]
# their trainers set to our TrainerConfig defaults (ema_* keys go to ema_pytorch.EMA)
THEIR_TRAINER = dict(lr=3e-4, wd=1e-2, max_grad_norm=1.0, ema_beta=0.99, ema_update_after_step=0, ema_update_every=1)
PRIOR_SAMPLES_PER_TEXT = 2


def build_venv() -> None:
    """Create their venv; torch comes first, then dalle2-pytorch under constraints that keep it."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(THEIRS_PYTHON), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + PINS, check=True)
    constraints = VENV / "constraints.txt"
    constraints.write_text("\n".join(PINS) + "\n")
    subprocess.run(pip + ["-c", str(constraints)] + PACKAGES, check=True)
    log.info("built %s in %.0f s", VENV, time.perf_counter() - start)


# ---- theirs: imports only torch and dalle2_pytorch --------------------------------------------------

def their_prior_training(dim: int, depth: int, heads: int, dim_head: int, batch: int, max_text_len) -> dict:
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork, DiffusionPriorTrainer

    extra = {} if max_text_len is None else {"max_text_len": max_text_len}
    net = DiffusionPriorNetwork(dim=dim, depth=depth, heads=heads, dim_head=dim_head, **extra)
    prior = DiffusionPrior(net=net, image_embed_dim=dim, timesteps=100, cond_drop_prob=0.2,
                           condition_on_text_encodings=False, clip=None)
    trainer = DiffusionPriorTrainer(prior, **THEIR_TRAINER)
    text_embed, image_embed = torch.randn(batch, dim), torch.randn(batch, dim)

    def step() -> None:
        trainer(text_embed=text_embed, image_embed=image_embed.clone())  # their forward scales image_embed in place
        trainer.update()

    seconds = ts.timed(step, warmup=3, iters=20)
    return {"samples_per_s": batch / seconds, "params": sum(p.numel() for p in net.parameters()), "batch": batch,
            "max_text_len": net.max_text_len}


def their_prior_sampling(max_text_len) -> dict:
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    net = DiffusionPriorNetwork(dim=256, depth=4, heads=8, dim_head=32, max_text_len=max_text_len or 0)
    prior = DiffusionPrior(net=net, image_embed_dim=256, timesteps=100, condition_on_text_encodings=False).eval()
    texts, n = torch.randn(64, 256), PRIOR_SAMPLES_PER_TEXT

    @torch.no_grad()
    def sample() -> torch.Tensor:  # their DiffusionPrior.sample without the CLIP text encoding
        text_embed = texts.repeat_interleave(n, dim=0)
        embeds = prior.p_sample_loop((len(text_embed), 256), text_cond=dict(text_embed=text_embed), timesteps=64, eta=0.0)
        embeds, text_embed = embeds.view(-1, n, 256), text_embed.view(-1, n, 256)
        sims = torch.einsum("brd,brd->br", torch.nn.functional.normalize(text_embed, dim=-1),
                            torch.nn.functional.normalize(embeds, dim=-1))
        return embeds[torch.arange(len(embeds)), sims.argmax(dim=1)]

    seconds = ts.timed(sample, warmup=1, iters=3)
    return {"samples_per_s": 64 * n / seconds, "params": sum(p.numel() for p in net.parameters()), "batch": 64,
            "max_text_len": net.max_text_len}


def their_unet(index: int, dim: int, dim_mults: tuple, cond_dim=None):
    """Their Unet built as our UnetConfig(..., image_embed_dim=256) of stage `index` (see the docstring)."""
    from dalle2_pytorch import Unet

    upsampler = index > 0
    return Unet(
        dim=dim, dim_mults=dim_mults, cond_dim=cond_dim, image_embed_dim=256, attn_heads=4, attn_dim_head=32,
        self_attn=(False,) * (len(dim_mults) - 1) + (True,), num_resnet_blocks=1, init_cross_embed=False,
        # what their Decoder would otherwise rebuild the unet with
        lowres_cond=upsampler, lowres_noise_cond=upsampler, cond_on_image_embeds=not upsampler,
        channels_out=3 if upsampler else 6,  # learned variance on unet 1
    )


def their_decoder(unet_kwargs: list, image_sizes: tuple, **kwargs):
    from dalle2_pytorch import Decoder

    unets = [their_unet(i, **kw) for i, kw in enumerate(unet_kwargs)]
    return Decoder(unet=unets, image_sizes=image_sizes, timesteps=100, beta_schedule="cosine", learned_variance=True,
                   use_noise_for_lowres_cond=True, use_dynamic_thres=True, **kwargs)


def their_decoder_training(unet_kwargs: list, image_sizes: tuple, unet_number: int, batch: int) -> dict:
    from dalle2_pytorch import DecoderTrainer

    decoder = their_decoder(unet_kwargs, image_sizes)
    trainer = DecoderTrainer(decoder, **THEIR_TRAINER)
    size = image_sizes[-1]
    image, image_embed = torch.rand(batch, 3, size, size), torch.randn(batch, 256)

    def step() -> None:
        trainer(image, image_embed=image_embed, unet_number=unet_number)
        trainer.update(unet_number=unet_number)

    seconds = ts.timed(step, warmup=2, iters=8)
    params = sum(p.numel() for p in decoder.unets[unet_number - 1].parameters())
    return {"samples_per_s": batch / seconds, "params": params, "batch": batch}


def their_decoder_sampling() -> dict:
    decoder = their_decoder([ts.BASE_UNET], (64,), sample_timesteps=50).eval()
    embeds = torch.randn(4, 256)
    seconds = ts.timed(lambda: decoder.sample(image_embed=embeds, cond_scale=1.0), warmup=1, iters=2)
    return {"samples_per_s": 4 / seconds, "params": sum(p.numel() for p in decoder.unets[0].parameters()), "batch": 4}


# ---- the cases: (ours from bench/train_step.py, theirs, max_text_len values theirs runs with) -------

UPSAMPLER = dict(dim=16, dim_mults=(1, 2, 4, 8))
CASES = {
    "prior_train_dim256_depth4": (ts.prior_train_dim256_depth4,
                                  lambda m: their_prior_training(256, 4, 8, 32, 64, m), [None, 0]),
    "prior_train_dim512_depth6": (ts.prior_train_dim512_depth6,
                                  lambda m: their_prior_training(512, 6, 8, 64, 32, m), [None, 0]),
    "prior_sample_ddim64": (ts.prior_sample_ddim64, their_prior_sampling, [0]),
    "decoder_train_unet1_64px": (ts.decoder_train_unet1_64px,
                                 lambda m: their_decoder_training([ts.BASE_UNET], (64,), 1, 8), [None]),
    "decoder_train_unet2_64_to_128px": (ts.decoder_train_unet2_64_to_128px,
                                        lambda m: their_decoder_training([ts.BASE_UNET, UPSAMPLER], (64, 128), 2, 8),
                                        [None]),
    "decoder_sample_64px_ddim50": (ts.decoder_sample_64px_ddim50, lambda m: their_decoder_sampling(), [None]),
}


def run_case(name: str, impl: str, max_text_len) -> dict:
    torch.set_num_threads(ts.THREADS)
    torch.manual_seed(0)
    load = os.getloadavg()[0]  # the machine is shared: a busy one skews the figures
    ours, theirs, _ = CASES[name]
    if impl == "ours":
        result = ours()
        if name == "prior_sample_ddim64":  # train_step counts texts/s; count candidate embeds drawn
            from dalle2.configs import PriorConfig

            result["samples_per_s"] *= PriorConfig().num_samples_per_batch
    else:
        result = theirs(max_text_len)
    return {**{k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads(), "load_1m_at_start": round(load, 2)}


def run_subprocess(python: Path, name: str, impl: str, max_text_len) -> dict:
    """One case in a fresh process of `python`; its last stdout line is the result."""
    cmd = [str(python), __file__, "--case", name, "--impl", impl]
    if max_text_len is not None:
        cmd += ["--max-text-len", str(max_text_len)]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"}).stdout  # their sampling loops use tqdm
    log.info("%s %s max_text_len=%s: %.0f s", name, impl, max_text_len, time.perf_counter() - start)
    return json.loads(out.strip().splitlines()[-1])


def compare(name: str) -> dict:
    ours = run_subprocess(Path(sys.executable), name, "ours", None)
    line = {"case": name, "ours": ours}
    for max_text_len in CASES[name][2]:
        key = "theirs" if max_text_len is None else f"theirs_max_text_len_{max_text_len}"
        theirs = line[key] = run_subprocess(THEIRS_PYTHON, name, "theirs", max_text_len)
        suffix = "" if max_text_len is None else f"_max_text_len_{max_text_len}"
        line[f"ratio{suffix}"] = round(ours["samples_per_s"] / theirs["samples_per_s"], 3)
        line[f"rss_mb{suffix}"] = [ours["peak_rss_mb"], theirs["peak_rss_mb"]]
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument("--impl", choices=["ours", "theirs"], default="ours")
    parser.add_argument("--max-text-len", type=int, help="their DiffusionPriorNetwork's max_text_len (default: theirs)")
    parser.add_argument("--build-only", action="store_true",
                        help="only build their venv (tests/fixtures/dalle2_pytorch/make.py runs in it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.case:
        print(json.dumps(run_case(args.case, args.impl, args.max_text_len)), flush=True)
        return
    start = time.perf_counter()
    if not THEIRS_PYTHON.exists():
        build_venv()
    if args.build_only:
        return
    version = subprocess.run([str(THEIRS_PYTHON), "-c", "import torch; print(torch.__version__)"], check=True,
                             stdout=subprocess.PIPE, text=True).stdout.strip()
    if version.split("+")[0] != PINS[0].split("==")[1]:
        raise SystemExit(f"{VENV} has torch {version}, not {PINS[0]}: delete it to rebuild")
    for name in CASES:
        print(json.dumps(compare(name)), flush=True)
    log.info("all cases in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
