"""The filter's rules on one shard's arrays: drop reasons, where a caption ranks for its image, near-duplicate groups
(functions of the embeddings and captions alone), and the language model a worker loads once."""

from __future__ import annotations

import numpy as np

NEAR_DUPLICATE = "near duplicate"


def low_similarity(threshold: float) -> str:
    return f"clip similarity below {threshold:g}"


def low_rank(rank: int) -> str:
    return f"caption not in the image's top {rank}"


def caption_ranks(image: np.ndarray, text: np.ndarray, captions: list[str], rows: np.ndarray, block: int = 1024) -> np.ndarray:
    """For each of `rows`: where its own caption ranks (1 = first) among the shard's distinct captions by CLIP
    similarity with its image. Scale-free, so it works for a CLIP trained from scratch, whose cosines are
    compressed into a narrow band where an absolute threshold cannot tell a wrong caption from a right one."""
    first_row: dict[str, int] = {}
    for i in rows.tolist():
        first_row.setdefault(captions[i], i)
    distinct = list(first_row)
    column = {caption: j for j, caption in enumerate(distinct)}
    candidates = text[[first_row[c] for c in distinct]]
    ranks = np.zeros(len(rows), dtype=np.int64)
    for start in range(0, len(rows), block):
        chunk = rows[start : start + block]
        similarities = image[chunk] @ candidates.T
        own = similarities[np.arange(len(chunk)), [column[captions[i]] for i in chunk.tolist()]]
        ranks[start : start + block] = (similarities > own[:, None]).sum(axis=1) + 1
    return ranks


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    x = np.asarray(embeddings, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def first_of_each_group(image: np.ndarray, threshold: float, block: int = 1024) -> dict[int, int]:
    """{row: earlier kept row it duplicates} for unit rows [N, D], greedily in order: a row is dropped when
    an earlier kept row has cosine above `threshold` with it (as faiss's range search counts). Exact; [block, N]
    similarities at a time."""
    dropped: dict[int, int] = {}
    kept = np.zeros(len(image), dtype=bool)
    for start in range(0, len(image), block):
        similarities = image[start : start + block] @ image.T
        for offset, row in enumerate(similarities):
            i = start + offset
            earlier = np.nonzero(kept[:i] & (row[:i] > threshold))[0]
            if len(earlier):
                dropped[i] = int(earlier[0])
            else:
                kept[i] = True
    return dropped


_LANGUAGE_MODELS: dict = {}  # per worker process: one load serves every shard task it runs


def load_language_model(url: str):
    """A fastText language id model (e.g. lid.176.bin) from any fsspec URL, loaded once per process (a remote
    one is fetched once per machine, into the temp folder under a name made from its URL)."""
    if url in _LANGUAGE_MODELS:
        return _LANGUAGE_MODELS[url]
    try:
        import fasttext
    except ImportError as error:
        raise ImportError("filter.language_model needs fastText: pip install fasttext-wheel") from error
    import hashlib
    import os
    import tempfile

    from pipeline.run.storage import is_local, read_bytes

    local = url
    if not is_local(url):
        local = os.path.join(tempfile.gettempdir(), f"dalle2-{hashlib.sha256(url.encode()).hexdigest()[:16]}.bin")
        if not os.path.exists(local):
            partial = f"{local}.{os.getpid()}.part"
            with open(partial, "wb") as f:
                f.write(read_bytes(url))
            os.replace(partial, local)
    _LANGUAGE_MODELS[url] = fasttext.load_model(local)
    return _LANGUAGE_MODELS[url]
