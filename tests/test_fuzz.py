"""Property-based fuzzing (hypothesis) of what reads outside input: the tar reader over structurally plausible
hostile shards (tests/tar_fuzz.py) and the config loader over random YAML and --set overrides. bench/fuzz_reader.py
runs the reader's for minutes."""

from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tar_fuzz import Checker, shards

# derandomized: the suite sees the same examples every run (bench/fuzz_reader.py explores); no example database
# no wall-clock deadline (a loaded machine would fail it): the checker's own CPU-time alarm bounds each read
FUZZ = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def test_reader_raises_only_its_own_error_on_fuzzed_shards(tmp_path):
    checker, outcomes = Checker(str(tmp_path)), Counter()

    @settings(max_examples=300, **FUZZ)
    @given(shards())
    def read(data):
        outcomes[checker.check(data)] += 1

    read()
    # the shards get past the checksum: samples come out, and every kind of refusal is reached
    assert {"read", "checksum", "cut short", "pax", "over a cap", "size field", "damaged stream"} <= set(outcomes), outcomes
    assert outcomes["read"] >= 30, outcomes


def test_reader_raises_only_its_own_error_on_random_bytes(tmp_path):
    checker = Checker(str(tmp_path))

    @settings(max_examples=100, **FUZZ)
    @given(st.one_of(st.binary(max_size=3000), st.binary(max_size=3000).map(lambda b: b"\x1f\x8b\x08" + b)))
    def read(data):
        checker.check(data)

    read()


FIELDS = ["root", "ray", "download", "embed", "reorder", "filter", "train_clip", "train_prior", "demo", "address",
          "num_cpus", "url_list", "image_size", "samples_per_shard", "timeout", "shard_timeout", "resources", "clip",
          "model_name", "batch_size", "actors", "cpu_pool", "CPU", "enabled", "min_similarity", "languages"]
KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(), st.booleans(), st.none())
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.sampled_from(["s3://b/r", "memory://x", "/tmp/r", "", "auto", "1e400", "nan", "-1"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)
OVERRIDES = st.lists(st.one_of(
    st.tuples(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3).map(".".join),
              st.one_of(st.text(max_size=20), st.sampled_from(["[1, 2", "{a: 1", "'x", "!!python/object:os.system",
                                                               "&a [*a]", "- - -", ": :", "\t1"])))
    .map(lambda t: f"{t[0]}={t[1]}"),
    st.text(max_size=30)), max_size=3)
DOCUMENTS = st.one_of(VALUES.map(lambda v: yaml.safe_dump(v)), st.dictionaries(st.sampled_from(FIELDS), VALUES)
                      .map(yaml.safe_dump), st.text(max_size=200),
                      st.sampled_from(["a: [1\n", "{", "- 1\n- 2\n", "a: &x [*x]\n", "? [1]\n: 2\n", "%YAML 9.9\n---\n"]))


def test_config_loader_raises_only_config_errors(tmp_path):
    from jobs.config_io import ConfigError, load_config
    from jobs.run_config import RunConfig

    path, outcomes = tmp_path / "run.yaml", Counter()

    @settings(max_examples=200, **FUZZ)
    @given(DOCUMENTS, OVERRIDES)
    def load(document, overrides):
        path.write_text(document)
        try:
            load_config(RunConfig, str(path), overrides)
            outcomes["valid"] += 1
        except ConfigError as error:
            assert str(error), "a config error says what is wrong"
            outcomes["refused"] += 1

    load()
    assert outcomes["valid"] and outcomes["refused"], outcomes
