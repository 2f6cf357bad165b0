"""Replay or soak the simulation from the command line.

.venv/bin/python -m tests.sim --seed 1234            replay one seed, print its fault schedule
.venv/bin/python -m tests.sim --seeds 100000 --jobs 2  the soak run behind `make soak`
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from tests.sim.harness import SimulationFailure, random_scenario, run_scenario


def _one(seed: int) -> tuple[int, str, int, int]:
    try:
        run = run_scenario(random_scenario(seed))
    except SimulationFailure as failure:
        return seed, str(failure), 0, 0
    return seed, "", len(run.plan.injected), run.sim.steps


def main() -> int:
    logging.disable(logging.CRITICAL)  # the services log every event; the runner reports only failures
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    parser.add_argument("--seed", type=int, help="replay this seed and print what happened")
    parser.add_argument("--seeds", type=int, default=0, help="run seeds 0..N-1")
    parser.add_argument("--first", type=int, default=0, help="first seed of the range")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if args.seed is not None:
        seed, problem, faults, steps = _one(args.seed)
        print(problem or f"seed {seed}: all invariants hold ({faults} faults injected, {steps} steps)")
        return 1 if problem else 0
    started = time.monotonic()
    failures = faults = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for _seed, problem, injected, _ in pool.map(_one, range(args.first, args.first + args.seeds), chunksize=50):
            faults += injected
            if problem:
                failures += 1
                print(problem, file=sys.stderr)
    print(f"{args.seeds} seeds, {faults} faults injected, {failures} failed, {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
