"""The mutation script's bugs still plant: each snippet stands exactly once in its file (code that moved leaves a
mutant that can no longer run, and `python tests/mutate.py` would stop at it)."""

import os

from tests.mutants import MUTANTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_mutant_snippet_stands_once_in_its_file_and_names_tests_that_exist():
    stale = []
    for mutant in MUTANTS:
        with open(os.path.join(REPO, mutant["file"])) as f:
            count = f.read().count(mutant["old"])
        if count != 1:
            stale.append(f"{mutant['name']}: {count} times in {mutant['file']}")
        for test in mutant["tests"]:
            assert os.path.exists(os.path.join(REPO, test.split("::")[0])), (mutant["name"], test)
    assert not stale, stale
    assert len({m["name"] for m in MUTANTS}) == len(MUTANTS)  # names select mutants (-k): each its own
