"""Run tests under many random seeds, to find the bounds that hold for most seeds but not all.

    python scripts/seed_sweep.py --seeds 50 tests/test_divergence.py -k "tvd and cpu"
    python scripts/seed_sweep.py --seeds 20 --report out/sweep.txt tests/test_reverse_kld.py

Every test selected by the pytest arguments runs ``--seeds`` times in one pytest process, each time with another
``MINILLM_TEST_SEED`` (which the suite's ``fresh_seed`` fixture reads: ``tests/conftest.py``), so imports, the C++
build and the module fixtures are paid once. At the end: per test, how many runs failed and their seeds, each
replayable alone with ``MINILLM_TEST_SEED=<seed> pytest <node id>``. Exits 1 if any run failed.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_PARAM = "sweep_seed"


def split_node_id(node_id: str) -> tuple[str, int]:
    """("tests/t.py::test_x[a-b]", 7) from "tests/t.py::test_x[a-seed7-b]" (the seed's id anywhere among the
    parameters), and ("tests/t.py::test_y", 7) from "tests/t.py::test_y[seed7]"."""
    found = re.search(r"(\[|-)seed(\d+)(\]|-)", node_id)
    opening, closing = found.group(1), found.group(3)
    joint = "" if (opening, closing) == ("[", "]") else "[" if opening == "[" else closing
    return node_id[: found.start()] + joint + node_id[found.end():], int(found.group(2))


class SeedSweep:
    """A pytest plugin: each test parametrized over ``seeds``, the environment's MINILLM_TEST_SEED set before each
    test's set-up, and the failures tallied per test."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = seeds
        self.runs: dict[str, int] = defaultdict(int)
        self.failures: dict[str, list[int]] = defaultdict(list)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        metafunc.fixturenames.append(SEED_PARAM)
        metafunc.parametrize(SEED_PARAM, self.seeds, ids=[f"seed{s}" for s in self.seeds])

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        os.environ["MINILLM_TEST_SEED"] = str(item.callspec.params[SEED_PARAM])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test, seed = split_node_id(report.nodeid)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.runs[test] += 1
        if report.failed:
            self.failures[test].append(seed)

    def summary(self) -> str:
        lines = [f"{len(self.runs)} tests x {len(self.seeds)} seeds; "
                 f"{sum(len(s) for s in self.failures.values())} failed runs in {len(self.failures)} tests"]
        for test, seeds in sorted(self.failures.items()):
            lines.append(f"FAILED {len(seeds)}/{self.runs[test]} {test}  seeds: {' '.join(map(str, seeds))}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="runs of each test, each with a fresh seed")
    parser.add_argument("--first-seed", type=int, help="seeds FIRST, FIRST+1, ... instead of random ones")
    parser.add_argument("--report", type=Path, help="also write the summary to this file")
    args, pytest_args = parser.parse_known_args(argv)
    if args.first_seed is None:
        seeds = random.sample(range(2**31), args.seeds)
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    sweep = SeedSweep(seeds)
    os.chdir(ROOT)
    status = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args], plugins=[sweep])
    summary = sweep.summary()
    print(f"\nseed sweep: {summary}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(summary + "\n")
    return 1 if sweep.failures or status not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
