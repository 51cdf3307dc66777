"""How the driver's cost grows with the number of shards: planning, ledger summaries, status, the sample plan.

Builds synthetic run roots (what the stages would have written, no images): for each shard its download
parquet, stats file and ledger record, one clip-retrieval part, aligned embeddings of width 8, a filter mask
and ledger records, in the state of a run whose embed stopped half way (records for the even shards) and
whose reorder split every part and gathered none. Then, each in a fresh process, it times and takes the peak
RSS of:

    download_plan   what is left to download (the split's shard list, done markers, stats files)
    embed_plan      what is left to embed and what the download says of each such shard
    reorder_plan    the parts left to split and the shards left to gather
    ledger_summary  the filter stage's summary over every shard record
    status          `dalle2 status`
    train_plan      one rank's (of 64) sample plan of epoch 0: the filter's kept rows, held-out split

    python bench/scale.py                       # 1k, 5k, 20k shards on local disk + 1k on moto's S3
    python bench/scale.py --sizes 1000 5000 --no-s3

Prints one JSON line per (root, operation) and the growth factor of each figure between sizes. Roots are
kept under --workdir (default /tmp/dalle2-scale-bench) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROWS_PER_SHARD = 1000
DIM = 8
WORLD_SIZE = 64
OPERATIONS = ("download_plan", "embed_plan", "reorder_plan", "ledger_summary", "status", "train_plan")


def build_root(root: str, shards: int) -> None:
    """Write a synthetic run root of `shards` x ROWS_PER_SHARD rows (local disk or any fsspec URL)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.formats.aligned import align, write_aligned
    from pipeline.run.layout import FILTER
    from pipeline.stages.filter.shards import mask_table, shard_record
    from pipeline.run.layout import RunLayout, index_width, make_key, shard_name
    from pipeline.run.ledger import Ledger, ShardRecord
    from pipeline.stages.reorder import STAGE as REORDER
    from pipeline.run.storage import write_atomic, write_json, write_npy, write_parquet

    layout = RunLayout(root)
    digits = index_width(ROWS_PER_SHARD)
    rng = np.random.default_rng(0)
    download, embed, filtered = Ledger(layout, "download"), Ledger(layout, "embed"), Ledger(layout, FILTER)
    empty_arrow = pa.BufferOutputStream()
    with pa.ipc.new_file(empty_arrow, pa.schema([("url", pa.string()), ("caption", pa.string())])):
        pass
    names = [shard_name(s) for s in range(shards)]
    for shard_id, name in enumerate(names):
        ok = rng.random(ROWS_PER_SHARD) > 0.1  # a tenth of the downloads failed
        keys = [make_key(shard_id, i, 5, digits) for i in range(ROWS_PER_SHARD)]
        write_atomic(layout.input_shard(name), empty_arrow.getvalue().to_pybytes())
        write_parquet(layout.shard_parquet(name), pa.table({
            "key": keys, "status": ["success" if o else "failed_to_download" for o in ok],
            "error_message": [None if o else "timed out" for o in ok]}))
        write_atomic(layout.shard_tar(name), b"")
        write_json(layout.shard_stats(name), {"count": ROWS_PER_SHARD, "successes": int(ok.sum())})
        download.record(ShardRecord(name, ROWS_PER_SHARD, int(ok.sum()), {"failed_to_download: timed out": int((~ok).sum())}))
        indices = np.nonzero(ok)[0]
        emb = rng.standard_normal((len(indices), DIM)).astype(np.float16)
        captions = [f"caption {shard_id} {i}" for i in indices]
        files = layout.clip_retrieval_files(shard_id)
        write_npy(files["img_emb"], emb)
        write_npy(files["text_emb"], emb)
        write_parquet(files["metadata"], pa.table({"key": [keys[i] for i in indices], "caption": captions}))
        write_json(layout.scratch(REORDER, "_parts", f"{shard_id}.json"),
                   {"shards": [name], "record": {"shard": f"part-{shard_id}", "rows_in": len(indices),
                                                 "written": len(indices), "failed": {}, "seconds": 0.0}})
        write_aligned(layout, name, align(shard_id, ROWS_PER_SHARD, 5, digits, indices, emb, emb, captions))
        if shard_id % 2 == 0:
            embed.record(ShardRecord(name, len(indices), len(indices)))
        reasons = [None if o and rng.random() > 0.2 else ("absent" if not o else "near duplicate") for o in ok]
        write_parquet(layout.filter_mask(name), mask_table(keys, reasons, np.zeros(ROWS_PER_SHARD), [None] * ROWS_PER_SHARD))
        filtered.record(shard_record(name, reasons, 0.0))
    write_json(f"{layout.inputs}/_SUCCESS.json", {"shards": {n: ROWS_PER_SHARD for n in names}})
    for ledger, extra in ((download, {"index_width": digits, "samples_per_shard": ROWS_PER_SHARD,
                                      "input_rows": shards * ROWS_PER_SHARD}), (embed, {}), (filtered, {})):
        ledger.summarize(time.time(), extra)
    write_json(f"{root}/_BENCH_COMPLETE.json", {"shards": shards})


def measure(operation: str, root: str) -> dict:
    """Run one operation on `root` in this process: its seconds and this process's peak RSS."""
    import logging
    import resource

    logging.disable(logging.INFO)
    from pipeline.run.config import DownloadConfig
    from pipeline.run.layout import RunLayout

    layout = RunLayout(root)
    started = time.perf_counter()
    if operation == "download_plan":
        from pipeline.stages.download.stage import plan_download

        shards, todo = plan_download(DownloadConfig(samples_per_shard=ROWS_PER_SHARD), layout)
        result = {"shards": len(shards), "todo": len(todo)}
    elif operation == "embed_plan":
        from pipeline.formats.queries import complete_shards
        from pipeline.stages.embed.stage import plan_embed

        infos = plan_embed(layout, complete_shards(layout))
        result = {"todo": len(infos), "expected_rows": sum(i.expected for i in infos.values())}
    elif operation == "reorder_plan":
        from pipeline.stages.reorder import parts_to_split, shards_to_gather, source_parts, split_markers

        parts = source_parts(layout.embeddings)
        todo = parts_to_split(layout, parts)
        pending = shards_to_gather(layout, split_markers(layout, parts))
        result = {"parts": len(parts), "todo": len(todo), "to_gather": len(pending)}
    elif operation == "ledger_summary":
        from pipeline.run.ledger import Ledger

        summary = Ledger(layout, "filter").summarize(time.time())
        result = {"shards": summary["shards"], "rows_in": summary["rows_in"]}
    elif operation == "status":
        from jobs.status import run_status

        status = run_status(root)
        result = {"stages": sorted(k for k in status if k != "problems"), "problems": len(status["problems"])}
    elif operation == "train_plan":
        from pipeline.loaders.plan import SamplePlan

        train = SamplePlan.from_aligned(root, filtered=True, part="train")
        runs, padded = train.rank_slice(0, WORLD_SIZE, 0, 0)
        result = {"rank_samples": sum(len(i) for _, i in runs), "padded": padded}
    else:
        raise ValueError(f"unknown operation {operation!r}")
    seconds = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"operation": operation, "seconds": round(seconds, 3), "peak_rss_mb": round(rss_mb, 1), **result}


def in_child(*args: str) -> str:
    """Run this script with `args` in a fresh process (so each figure has its own peak RSS); its last line."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=os.environ)
    if done.returncode:
        raise RuntimeError(f"{args}: {done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--s3-size", type=int, default=1000)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--workdir", default="/tmp/dalle2-scale-bench")
    parser.add_argument("--measure", nargs=2, metavar=("OPERATION", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, metavar=("ROOT", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    if args.build:
        build_root(args.build[0], int(args.build[1]))
        print("{}")
        return

    from pipeline.run.storage import exists

    roots = [(f"local-{n}", os.path.join(args.workdir, f"local-{n}"), n) for n in args.sizes]
    server = None
    if not args.no_s3:
        server, bucket = start_moto()
        roots.append((f"s3-{args.s3_size}", f"{bucket}/run", args.s3_size))
    figures: dict[str, dict] = {}
    try:
        for label, root, shards in roots:
            if label.startswith("s3-"):  # the same synthetic files as the local root of that size, uploaded
                local = os.path.join(args.workdir, f"local-{shards}")
                if not exists(f"{local}/_BENCH_COMPLETE.json"):
                    in_child("--build", local, str(shards))
                started = time.time()
                upload(local, root)
                print(f"# uploaded {label} in {time.time() - started:.0f} s", file=sys.stderr)
            if not exists(f"{root}/_BENCH_COMPLETE.json"):
                started = time.time()
                in_child("--build", root, str(shards))
                print(f"# built {label} in {time.time() - started:.0f} s", file=sys.stderr)
            for operation in OPERATIONS:
                figure = {"root": label, "shards": shards, **json.loads(in_child("--measure", operation, root))}
                figures[f"{label}/{operation}"] = figure
                print(json.dumps(figure), flush=True)
    finally:
        if server is not None:
            server.stop()
    local = [n for n in args.sizes]
    for small, big in zip(local, local[1:]):
        for operation in OPERATIONS:
            a, b = figures[f"local-{small}/{operation}"], figures[f"local-{big}/{operation}"]
            print(json.dumps({"growth": f"{small}->{big} shards", "operation": operation,
                              "shards_x": round(big / small, 2), "seconds_x": round(b["seconds"] / a["seconds"], 2),
                              "rss_x": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2)}))


def upload(local: str, url: str) -> None:
    """Copy a local root to an object store, many PUTs in flight."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    files = [os.path.join(folder, name) for folder, _, names in os.walk(local) for name in names]
    fs.put(files, [f"{path}/{os.path.relpath(f, local)}" for f in files])


def start_moto():
    """moto's S3 server on a free loopback port, the AWS variables pointing at it; (server, bucket URL)."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="scale-bench")
    return server, "s3://scale-bench"


if __name__ == "__main__":
    main()
