"""The deterministic simulation of the cloud path, run over many seeds (tests/sim/harness.py says what a
run does and which invariants it checks). A failing seed prints its scenario, its fault schedule and the
command that replays it. `make soak` runs 100,000 seeds.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from tests.sim.conftest import SUMMARY
from tests.sim.harness import SimulationFailure, random_scenario, run_scenario

SEEDS = int(os.environ.get("DICOMFLOW_SIM_SEEDS", "2000"))
EMULATOR_SEEDS = int(os.environ.get("DICOMFLOW_SIM_EMULATOR_SEEDS", "12"))
JOBS = max(1, min(4, os.cpu_count() or 1))


def _one(seed: int) -> tuple[int, str, int, int]:
    logging.disable(logging.CRITICAL)  # every event of every seed would drown the report
    try:
        run = run_scenario(random_scenario(seed))
    except SimulationFailure as failure:
        return seed, str(failure), 0, 0
    return seed, "", len(run.plan.injected), len(run.status_reads)


@pytest.mark.simulation
def test_every_invariant_holds_on_every_seed() -> None:
    started = time.monotonic()
    failures: list[str] = []
    faults = reads = 0
    with ProcessPoolExecutor(max_workers=JOBS) as pool:
        for _seed, problem, injected, status_reads in pool.map(_one, range(SEEDS), chunksize=25):
            faults += injected
            reads += status_reads
            if problem:
                failures.append(problem)
    SUMMARY.append(
        f"{SEEDS} seeds, {faults} faults injected, {reads} status reads checked, 6 invariants checked per seed, "
        f"{len(failures)} seeds failed, {time.monotonic() - started:.0f} s"
    )
    assert not failures, f"{len(failures)} of {SEEDS} seeds broke an invariant; the first:\n\n{failures[0]}"


@pytest.mark.simulation
def test_a_seed_replays_exactly() -> None:
    # Determinism is what makes a failing seed useful: the same seed gives the same faults at the same
    # moments, and the same end state.
    first, again = run_scenario(random_scenario(11)), run_scenario(random_scenario(11))
    assert [str(f) for f in first.plan.injected] == [str(f) for f in again.plan.injected]
    assert first.sim.steps == again.sim.steps and first.sim.now == again.sim.now
    assert first.status_reads == again.status_reads


@pytest.mark.emulator
def test_the_invariants_hold_with_firestore_as_the_store(tmp_path: Path) -> None:
    from dicomflow.adapters.firestore_store import FirestoreStateStore
    from tests.support.emulators import firestore_host, unique_project

    firestore_host()
    logging.disable(logging.CRITICAL)
    try:
        for seed in range(EMULATOR_SEEDS):
            run = run_scenario(
                random_scenario(seed), store=lambda clock: FirestoreStateStore.connect(unique_project(), "", clock)
            )
            assert run.settled()
    finally:
        logging.disable(logging.NOTSET)
    SUMMARY.append(f"{EMULATOR_SEEDS} seeds against the Firestore emulator: every invariant held")
