"""Read the records of an offline W&B run file (run-<id>.wandb): wandb 0.31 writes them from its Go core and ships
no Python reader. The format is LevelDB's log: a 7-byte file header, then 32 KiB blocks of records, each a 7-byte
header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last piece) and a piece of one protobuf Record."""

from __future__ import annotations

import struct

BLOCK = 32768
HEADER = 7


def records(path: str) -> list:
    """Every wandb_internal_pb2.Record in the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, index, pieces = [], HEADER, b""
    while index + HEADER <= len(data):
        left = BLOCK - index % BLOCK
        if left < HEADER:  # a block's tail too short for a record header: padding
            index += left
            continue
        _, length, kind = struct.unpack("<IHB", data[index:index + HEADER])
        if kind == 0 and length == 0:
            break
        pieces += data[index + HEADER:index + HEADER + length]
        index += HEADER + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            out.append(record)
            pieces = b""
    return out


def history(path: str) -> list[dict]:
    """The logged rows ({key: value}, with `_step`) of an offline run file."""
    import json

    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows
