"""Our embed stage against clip-retrieval's clip_inference: same shards, same open_clip model and weights.

For each model (tiny-clip: the model is cheap, so decoding and overheads dominate, as on a GPU; ViT-B-32
on fewer images: the model dominates), write img2dataset-style shards of generated 64 px JPEGs
(jobs.shapes.write_shards, the download stage's default shard size, as bench/embed.py does), save one
random-init state dict, then time two commands, each from its start to its exit after all outputs are written:
  theirs  clip_retrieval.clip_inference.main.main(...) in its own venv (bench/.venvs/clip-retrieval, built
          here on first use: clip-retrieval pins numpy<2, pyarrow<16, open_clip<3), the model given as
          "open_clip:<name>/<weights file>"; input_format="webdataset", enable_text=True,
          enable_metadata=False (it needs a .json per sample), num_prepro_workers=2 (1 for one shard),
          distribution "sequential"
  ours    `dalle2 embed --config run.yaml` (run_embed with the run's EmbedConfig, as bench/embed.py runs it),
          which starts its own local Ray (pipeline.execution.session.RaySession); EmbedConfig defaults but for the
          weights (clip.pretrained: the same file), batch_size and the threads (torch_threads, cpus_per_actor)
Both get the same batch size and the same torch threads for the model (--threads; 0: each side's own default,
on 2 cores 1 for ours and 2 for theirs, whose 2 DataLoader workers then fight its model for the cores).
Prints one JSON line per model: wall times, images/s and their ratio, rows written by each, and the max cosine
difference (1 - cos) between the two sides' image and text embeddings of every key both wrote.

    python bench/vs_clip_retrieval.py [--images 20000] [--vit-images 256] [--batch-size 256] [--vit-batch-size 32]
        [--threads 1]

Differences in the work done that remain:
  - ours writes more: clip-retrieval's files per shard (theirs: one img_emb_0 / text_emb_0 / metadata_0 for the
    run) plus the aligned per-shard files and the ledger; metadata columns are key+caption (theirs
    image_path+caption, image_path holding the key). Both store float16.
  - preprocessing: both PIL bicubic on the shortest side, centre crop, normalise (theirs open_clip's transform
    in DataLoader workers, ours pipeline.formats.decode in Ray tasks, normalised on the actor), but ours decodes a
    JPEG at least twice the model's size in PIL's draft mode (DCT scaling): tiny-clip's 32 px from 64 px
    JPEGs differ slightly, hence a small image cosine difference; ViT-B-32 (upscaled to 224) gets equal pixels.
  - text: theirs open_clip's encode_text; ours dalle2.clip's embed_text (same pooled token and projection,
    per-token encodings computed and dropped) on captions trimmed to their longest in the batch, where theirs
    runs the whole context (77 tokens for ViT-B-32): same embeddings (causal mask), less text-tower work.
    Theirs tokenizes in its DataLoader workers, ours on the CLIP actor (tokenizing in our decode tasks made
    each of their worker processes import open_clip, which cost more than it saved on runs of this size).
  - theirs warms the model up (all_clip: 2 image and text forwards of a full batch of fake inputs) and imports
    its whole package (flask, faiss, sentence-transformers, wandb) in its main and two spawned logger
    processes; ours starts Ray (workers, one CLIP actor, decode and write tasks), no warm-up.
  - theirs counts no failures and writes no per-shard record: a crash means starting over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

log = logging.getLogger("vs_clip_retrieval")

VENV = Path(__file__).parent / ".venvs" / "clip-retrieval"
TIMEOUT_S = 1800  # per side and model
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]  # the local-disk build; pinned in every later install too
# What `import clip_retrieval.clip_inference.main` needs (its package __init__ imports every subcommand), found by
# trying; each with its own dependencies, under the torch pin. open_clip is ours (3.3), not clip-retrieval's <3.
DEPS = ["open_clip_torch==3.3.0", "webdataset<0.3", "braceexpand", "fire<0.6", "pandas<3", "pyarrow", "tqdm",
        "wandb", "clip-anytorch", "setuptools<81",  # clip-anytorch imports pkg_resources, gone from setuptools 81
        "sentence-transformers<3", "flask", "flask_restful", "flask_cors", "faiss-cpu", "h5py", "prometheus-client"]

# Run in the clip-retrieval venv: make our tiny configs known to open_clip, set the threads, call clip_inference.
THEIRS = """
import json, sys
import open_clip, torch
args = json.loads(sys.argv[1])
open_clip.add_model_config(args.pop("config_dir"))
threads = args.pop("threads")
if threads:
    torch.set_num_threads(threads)
from clip_retrieval.clip_inference.main import main
main(**args)
"""
DALLE2 = os.path.join(os.path.dirname(sys.executable), "dalle2")  # our command, in this venv


def ensure_venv() -> float | None:
    """Build the clip-retrieval venv if it is missing or half built; returns the seconds it took (None: it was there)."""
    done = VENV / ".complete"
    if done.exists():
        return None
    shutil.rmtree(VENV, ignore_errors=True)
    log.info("building %s (torch from local disk, then clip-retrieval --no-deps and what its import needs)", VENV)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    python = str(VENV / "bin" / "python")
    pin = VENV / "torch-pin.txt"
    pin.write_text("\n".join(TORCH) + "\n")
    pip = [python, "-m", "pip", "install", "-q", "-c", str(pin)]
    subprocess.run(pip + TORCH, check=True)
    subprocess.run(pip + ["--no-deps", "clip-retrieval", "all_clip"], check=True)
    subprocess.run(pip + DEPS, check=True)
    subprocess.run([python, "-c", "import torch, open_clip; from clip_retrieval.clip_inference.main import main;"
                    f"assert torch.__version__.startswith('{TORCH[0][7:]}'), torch.__version__"], check=True)
    done.touch()
    return round(time.perf_counter() - start, 1)


def timed(command: list[str], name: str, env: dict | None = None) -> float:
    """Seconds from starting `command` to its exit; its output goes to the log only if it fails."""
    start = time.perf_counter()
    # its own process group: a clip_inference whose worker failed waits for ever on its logger processes, which
    # a timeout must stop too
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        log.error("%s did not end within %d s:\n%s", name, TIMEOUT_S, output[-4000:])
        raise SystemExit(1) from None
    seconds = time.perf_counter() - start
    if process.returncode:
        log.error("%s failed (exit %d):\n%s", name, process.returncode, output[-4000:])
        raise SystemExit(1)
    return seconds


def run_theirs(root: str, model: str, weights: str, batch_size: int, threads: int) -> tuple[float, str]:
    shards = sorted(p.stem for p in Path(root, "shards").glob("*.tar"))
    pattern = shards[0] if len(shards) == 1 else "{" + ",".join(shards) + "}"  # braceexpand'ed by clip_inference
    out = f"{root}/clip_retrieval"
    args = dict(input_dataset=f"{root}/shards/{pattern}.tar", output_folder=out, input_format="webdataset",
                clip_model=f"open_clip:{model}/{weights}",  # all_clip: name / pretrained (here an absolute path)
                # a DataLoader worker per shard at most: a worker given no shard fails, and clip_inference then
                # waits for ever on its logger processes
                batch_size=batch_size, num_prepro_workers=min(2, len(shards)), enable_text=True, enable_metadata=False,
                config_dir=str(resources.files("dalle2") / "model_configs" / "clip"), threads=threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}  # nothing may reach the network
    return timed([str(VENV / "bin" / "python"), "-c", THEIRS, json.dumps(args)], "clip-retrieval", env), out


def run_ours(root: str, model: str, weights: str, batch_size: int, threads: int) -> tuple[float, dict]:
    import yaml

    embed = {"clip": {"model_name": model, "pretrained": weights}, "batch_size": batch_size}
    if threads:
        embed.update(torch_threads=threads, cpus_per_actor=threads)
    config = Path(root, "run.yaml")
    config.write_text(yaml.safe_dump({"root": root, "embed": embed}))
    seconds = timed([DALLE2, "embed", "--config", str(config)], "dalle2 embed")
    return seconds, json.loads(Path(root, "ledger", "embed.json").read_text())  # the stage's summary


def read_outputs(folder: str, key_column: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (image embedding, text embedding)} of a clip-retrieval layout (img_emb/, text_emb/, metadata/)."""
    import pyarrow.parquet as pq

    rows = {}
    for meta in sorted(Path(folder, "metadata").glob("metadata_*.parquet")):
        n = meta.stem.split("_", 1)[1]
        img = np.load(Path(folder, "img_emb", f"img_emb_{n}.npy")).astype(np.float32)
        txt = np.load(Path(folder, "text_emb", f"text_emb_{n}.npy")).astype(np.float32)
        keys = pq.read_table(meta, columns=[key_column]).column(key_column).to_pylist()
        assert len(keys) == len(img) == len(txt), (meta, len(keys), len(img), len(txt))
        rows.update((k, (img[i], txt[i])) for i, k in enumerate(keys))
    return rows


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def max_cos_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest 1 - cosine over the rows of two [N, D] arrays."""
    return float((1 - (unit(a) * unit(b)).sum(axis=1)).max())


def compare(model: str, images: int, batch_size: int, threads: int) -> dict:
    import torch

    from dalle2.clip import build_open_clip
    from jobs import shapes
    from pipeline.run.config import DownloadConfig

    with tempfile.TemporaryDirectory() as root:
        shapes.write_shards(root, images, per_shard=DownloadConfig().samples_per_shard)
        weights = f"{root}/{model}.pt"  # one random-init state dict, read by open_clip on both sides
        torch.manual_seed(0)
        torch.save(build_open_clip(model).state_dict(), weights)
        log.info("%s: %d images, clip-retrieval ... (load average %.1f)", model, images, os.getloadavg()[0])
        theirs_s, out = run_theirs(root, model, weights, batch_size, threads)
        log.info("%s: %.1fs; our embed stage ...", model, theirs_s)
        ours_s, summary = run_ours(root, model, weights, batch_size, threads)
        log.info("%s: %.1fs", model, ours_s)
        ours, theirs = read_outputs(f"{root}/embeddings", "key"), read_outputs(out, "image_path")
        stats = json.loads(Path(out, "stats", "0.json").read_text())  # clip-retrieval's own per-batch timings
    both = sorted(set(ours) & set(theirs))  # every key both wrote, compared row by row
    ours_img, ours_txt = (np.stack([ours[k][i] for k in both]) for i in (0, 1))
    theirs_img, theirs_txt = (np.stack([theirs[k][i] for k in both]) for i in (0, 1))
    return {
        "model": model, "images": images, "batch_size": batch_size, "threads": threads,
        "ours_s": round(ours_s, 2), "theirs_s": round(theirs_s, 2),
        "ours_images_per_s": round(images / ours_s, 1), "theirs_images_per_s": round(images / theirs_s, 1),
        "ratio_ours_over_theirs": round(theirs_s / ours_s, 3),  # of images/s: > 1 means ours is faster
        # the stage's own start-up figure: to CLIP's first embeddings (planning, Ray's start, model load, 1st batch)
        "ours_startup_s": summary.get("startup_s"), "ours_startup_steps": summary.get("startup_steps"),
        # clip-retrieval's own sums over its batch loop (after its imports, model loads and warm-ups)
        "theirs_loop_s": round(stats["total_duration"], 2), "theirs_read_s": round(stats["read_duration"], 2),
        "theirs_inference_s": round(stats["inference_duration"], 2),
        "ours_written": summary["written"], "theirs_written": len(theirs), "images_checked": len(both),
        "max_image_cos_diff": round(max_cos_diff(ours_img, theirs_img), 6),
        "max_text_cos_diff": round(max_cos_diff(ours_txt, theirs_txt), 6),
        # the scale to read the image difference against: 1 - the least cosine between two of our images
        "image_cos_spread": round(float(1 - (lambda a: a @ a.T)(unit(ours_img[:256])).min()), 6),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000,
                        help="tiny-clip images (a few thousand measure mostly the start-up of each side)")
    parser.add_argument("--vit-images", type=int, default=256, help="ViT-B-32 images (about 10 img/s per core on CPU)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="tiny-clip's, both sides (our EmbedConfig default and theirs)")
    parser.add_argument("--vit-batch-size", type=int, default=32,
                        help="ViT-B-32's, both sides: a few hundred CPU images in 256s would be one batch, and "
                             "clip-retrieval's warm-up (two full batches) would weigh more than its work")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the model, both sides (1: our default, and steady on 2 cores where "
                             "decoding needs the other); 0: each side's default (ours 1, clip-retrieval one per core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    build_s = ensure_venv()
    if build_s is not None:
        log.info("clip-retrieval venv built in %.0fs", build_s)
    # untimed: read both venvs' libraries once, so neither side's first run pays for a cold page cache
    subprocess.run([str(VENV / "bin" / "python"), "-c", "from clip_retrieval.clip_inference.main import main"],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-c", "import ray, ray.data, torch, open_clip, pipeline.stages.embed.stage, jobs.embed"],
                   check=True)
    for model, images, batch_size in (("tiny-clip", args.images, args.batch_size),
                                      ("ViT-B-32", args.vit_images, args.vit_batch_size)):
        if images <= 0:  # 0: skip this model (clip_inference given no shard waits for ever)
            continue
        result = compare(model=model, images=images, batch_size=batch_size, threads=args.threads)
        print(json.dumps({**result, "venv_build_s": build_s}), flush=True)


if __name__ == "__main__":
    main()
