"""Read and write formats the stages share: tar shards, aligned files, image decoding, fetching, and read-side queries."""
