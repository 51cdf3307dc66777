"""Plant known bugs one at a time and check that the fast tests catch each (a test that passes with the bug in
place proves nothing). Each mutant replaces one exact snippet of one file in a copy of the tree, and the tests
that exercise that module run there; the script prints killed / survived and exits 1 if any survived. The
selected tests first run once on the unmutated copy: a failure there stops the run, so "killed" means the bug.

    .venv/bin/python tests/mutate.py                 # every mutant
    .venv/bin/python tests/mutate.py -k reader       # those whose name contains "reader"
    .venv/bin/python tests/mutate.py --list

Mutants live in tests/mutants.py: add one for every bug a new test was written to catch (a `timeout` of its own
where the bug makes the tests hang: a timeout counts as caught).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SKIP = shutil.ignore_patterns(".venv", ".venvs", ".git", "runs", "__pycache__", ".pytest_cache", "*.egg-info", ".gl", ".whl")


def load_mutants() -> list[dict]:
    """The mutant list (tests/mutants.py's MUTANTS), read without importing the project."""
    namespace: dict = {}
    with open(os.path.join(HERE, "mutants.py")) as f:
        exec(compile(f.read(), "tests/mutants.py", "exec"), namespace)  # noqa: S102 - our own file
    return namespace["MUTANTS"]


def plant(tree: str, mutant: dict) -> None:
    """Apply one mutant to the copy at `tree`; the snippet must stand exactly once, or the mutant is stale."""
    path = os.path.join(tree, mutant["file"])
    with open(path) as f:
        source = f.read()
    count = source.count(mutant["old"])
    if count != 1:
        raise SystemExit(f"mutant {mutant['name']!r}: its snippet stands {count} times in {mutant['file']} "
                         "(the code moved: update tests/mutants.py)")
    with open(path, "w") as f:
        f.write(source.replace(mutant["old"], mutant["new"]))


def run_tests(tree: str, tests: list[str], timeout: float) -> tuple[bool, float, str]:
    """Whether the selected tests pass in `tree` (the copy's modules shadow the installed project), the seconds,
    and the end of their output."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
               "-o", "addopts=", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started, "timed out"  # a hang the tests would see too: counted as caught
    output = (done.stdout + done.stderr)[-3000:]
    if done.returncode not in (0, 1):  # not "a test failed": a test renamed, moved to slow, or pytest itself broke
        raise SystemExit(f"the tests {' '.join(tests)} could not run (pytest exit {done.returncode}): fix the "
                         f"mutant's selection in tests/mutants.py\n{output}")
    return done.returncode == 0, time.monotonic() - started, output


def union(selections: list[list[str]]) -> list[str]:
    """Every test the selections name, once: a whole file stands for the tests named in it."""
    items = sorted({test for tests in selections for test in tests})
    files = {test for test in items if "::" not in test}
    return [test for test in items if test.split("::")[0] not in files or "::" not in test]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for one mutant's tests")
    parser.add_argument("--tests", nargs="+", help="run these tests for every mutant instead of each one's own "
                        "(e.g. to see which mutants an older selection missed)")
    args = parser.parse_args(argv)
    mutants = [m for m in load_mutants() if args.k in m["name"]]
    if args.list:
        for m in mutants:
            print(f"{m['name']:45s} {m['file']:32s} {' '.join(m['tests'])}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        pristine = os.path.join(scratch, "pristine")
        shutil.copytree(ROOT, pristine, ignore=SKIP)
        # the copy must be what the tests import, and pass unmutated, or a "killed" would mean nothing
        probe = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=pristine,
                               env={**os.environ, "PYTHONPATH": pristine}, capture_output=True, text=True)
        if not probe.stdout.startswith(pristine):
            raise SystemExit(f"the tests would import the project from {probe.stdout.strip()!r}, not the copy")
        # and they must pass there unmutated, or a "killed" could be a test that fails anyway
        baseline = union([args.tests or m["tests"] for m in mutants])
        passed, seconds, output = run_tests(pristine, baseline, args.timeout * 2)
        if not passed:
            raise SystemExit(f"the selected tests fail without a mutant ({seconds:.0f} s); fix them first:\n{output}")
        print(f"unmutated: the {len(baseline)} files and tests selected pass ({seconds:.0f} s)", flush=True)
        survived = []
        for m in mutants:
            tree = os.path.join(scratch, "tree")
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(pristine, tree)
            plant(tree, m)
            timeout = min(args.timeout, m.get("timeout", args.timeout))
            passed, seconds, _ = run_tests(tree, args.tests or m["tests"], timeout)
            print(f"{'SURVIVED' if passed else 'killed  '} {m['name']:45s} {seconds:6.1f} s", flush=True)
            if passed:
                survived.append(m["name"])
        print(f"{len(mutants) - len(survived)} killed, {len(survived)} survived of {len(mutants)}")
        if survived:
            print("survived: " + ", ".join(survived))
        return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
