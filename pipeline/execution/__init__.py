"""Where work runs: the Ray session, the per-shard distributor and the console's progress bars."""
