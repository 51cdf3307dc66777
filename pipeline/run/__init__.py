"""The run's ground: its layout (paths, shard names, keys), storage through fsspec, the ledger, crash points, stage configs."""
