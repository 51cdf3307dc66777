"""The download stage: split the URL list into input shards, then fetch each shard into a webdataset tar (img2dataset)."""
