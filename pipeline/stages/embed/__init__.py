"""The embed stage: read and decode shards, CLIP on an actor pool, scratch parts, finished shards."""
