"""D1-D15: the defects found in the cloud path, each replayed as a named scenario of the simulation.

Each scenario scripts the faults that made the defect happen (on top of the run's seed), checks that the
situation really arose (a dropped task, a late message, a stalled attempt...), and then requires every
invariant of tests/sim/harness.py to hold. A scenario that passes without its situation arising proves
nothing, so each asserts it arose.
"""

from __future__ import annotations

import pytest

from dicomflow.domain.layout import Layout
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import BatchStatus, ItemState
from dicomflow.ports import QueueName
from dicomflow.services.finish import planned_dataset
from tests.sim.faults import Rule
from tests.sim.harness import Run, Scenario, run_scenario

pytestmark = pytest.mark.simulation


def _scenario(**fields: object) -> Scenario:
    """A quiet baseline (no random faults, one batch, no cancel or redrive) for scripted faults."""
    base: dict[str, object] = {
        "seed": 1, "batches": 1, "series": (3,), "fault_rate": 0.0, "duplicate_rate": 0.0, "cancel": (False,),
        "redrive": (False,), "kinds": ("good",),
    }  # fmt: skip
    base.update(fields)
    return Scenario(**base)  # type: ignore[arg-type]


def _items(run: Run) -> list:  # type: ignore[type-arg]
    (batch_id,) = [b for b in run.batch_ids if b]
    return run.inner.list_items(batch_id, limit=1000)


def _batch(run: Run):  # type: ignore[no-untyped-def]
    (batch_id,) = [b for b in run.batch_ids if b]
    return run.inner.get_batch(batch_id)


@pytest.mark.parametrize("get_task", [True, False], ids=["queue-tells", "by-time"])
def test_d1_a_convert_task_dropped_before_any_claim_is_requeued(get_task: bool) -> None:
    # The worker is unreachable for 30 minutes right after expansion: every attempt of every convert task
    # is refused before a handler sees it (10 + 20 + 40 + 80 s of backoff), and Cloud Tasks drops them.
    run = run_scenario(_scenario(outages=((0.0, 1800.0),), queue_exists=get_task))
    assert any(task.queue is QueueName.CONVERT for task in run.model.dropped), "no convert task was dropped"
    items = _items(run)
    assert {i.state for i in items} == {ItemState.SUCCEEDED}
    assert all(i.task_seq >= 1 for i in items)  # each got a new task from the reconciler


def test_d2_every_status_read_adds_up_while_series_change_state() -> None:
    # The client reads the status every 5 s while eight series convert at once under faults; the harness
    # fails the run on any read whose counters do not add up. (On Firestore, where six separate count
    # queries were the defect, tests/contracts/test_state_store.py checks the same under concurrent writes.)
    # The seed picks a fault schedule under which the conversions last long enough for many reads (every port
    # call draws from it, so a change to the calls a success makes can change the schedule: choose again).
    run = run_scenario(_scenario(series=(8,), convert_concurrency=8, fault_rate=0.03, seed=6, poll_seconds=5.0))
    assert len(run.status_reads) >= 20
    assert len({tuple(sorted(c.items())) for _, c in run.status_reads}) >= 3  # reads saw the counts move
    assert _batch(run).status is BatchStatus.COMPLETED


def test_d3_a_slow_last_attempt_keeps_its_lease_and_its_success() -> None:
    # One attempt only (its first is its last), converting for 15 minutes with a 5-minute lease and the
    # reconciler passing every 10 minutes: the heartbeat keeps the lease, the success is recorded.
    run = run_scenario(_scenario(series=(1,), kinds=("slow",), settings={"retry_max_attempts": 1}))
    (item,) = _items(run)
    assert (item.state, item.attempts) == (ItemState.SUCCEEDED, 1)
    assert item.rev >= 10  # claim, ~9 renewals, confirmations, success


def test_d4_a_stale_attempts_failure_never_undoes_the_newer_attempts_work() -> None:
    # Attempt 1's renewals fail for ~8 minutes, so at its 10-minute pass the reconciler gives the series to
    # a new attempt; attempt 1 then fails after converting: its failure must change nothing.
    run = run_scenario(
        _scenario(
            series=(1,),
            kinds=("slow",),
            rules=(
                Rule("store.update_item", "error_before", process="heartbeat:", times=5),
                Rule("converter.convert", "error_after", process="handler:convert-", contains="-t0#0"),
            ),
        )
    )
    (item,) = _items(run)
    stale = [a for a in run.answers if a.task_id.endswith("-t0")]
    assert [a.outcome for a in stale] == ["fenced"], "the stale attempt was not the one fenced out"
    # The newer attempt's conversion stands: no third attempt had to redo it.
    assert (item.state, item.attempts) == (ItemState.SUCCEEDED, 2)


def test_d5_a_late_dead_letter_message_never_ends_a_redriven_generation() -> None:
    # A corrupt series is handed off; the dead-letter handler fails on nine deliveries of that message.
    # Meanwhile the reconciler dead-letters the series, the user re-exports it and redrives it, and
    # generation 1 converts (slowly). The tenth delivery of the old message lands during that conversion
    # and must change nothing: generation 1 succeeds.
    run = run_scenario(
        _scenario(
            series=(1,),
            kinds=("fixable",),
            redrive=(True,),
            rules=(Rule("store.update_item", "error_before", process="handler:dlq-", contains="-g0-", times=9),),
        )
    )
    (item,) = _items(run)
    assert (item.state, item.generation) == (ItemState.SUCCEEDED, 1)
    late = [
        a
        for a in run.answers
        if a.queue is QueueName.DEAD_LETTER and a.payload["generation"] == 0 and a.item_state == "running"
    ]
    assert late, "the old generation's message never arrived while generation 1 was converting"


def test_d6_the_reconciler_never_releases_a_lease_renewed_after_its_query() -> None:
    # Renewals fail for ~8 minutes, so the lease looks expired to the reconciler's query at 10 minutes; the
    # reconciler stalls for 80 s before acting, the next renewal lands in between, and the release of a
    # live lease must be refused.
    run = run_scenario(
        _scenario(
            series=(1,),
            kinds=("slow",),
            rules=(
                Rule("store.update_item", "error_before", process="heartbeat:", times=5),
                Rule("store.update_item", "delay:80", process="cron:reconcile"),
            ),
        )
    )
    (item,) = _items(run)
    assert any(f.kind == "delay:80" for f in run.plan.injected), "the reconciler never acted on the series"
    assert (item.state, item.attempts, item.task_seq) == (ItemState.SUCCEEDED, 1, 0)


def test_d7_a_redrive_interrupted_half_way_is_finished_by_its_retry() -> None:
    run = run_scenario(
        _scenario(
            series=(3,),
            kinds=("corrupt",),
            redrive=(True,),
            rules=(Rule("store.update_item", "crash_after", process="handler:redrive-"),),
        )
    )
    assert any(f.kind == "crash_after" for f in run.plan.injected)
    items = _items(run)
    assert {(i.state, i.generation) for i in items} == {(ItemState.DEAD_LETTERED, 1)}
    assert _batch(run).status is BatchStatus.COMPLETED_WITH_FAILURES


def test_d8_a_repeated_group_step_enqueues_for_the_items_as_stored() -> None:
    # Two batches of the same (slow) source into the same destination. The second expansion stores its
    # items (pending: the first batch is still converting) and dies; its retry comes 25 minutes later,
    # after the first batch converted every series, so recomputing would call them "already converted".
    # The stored items are pending: they get tasks at once, not hours later from the reconciler.
    run = run_scenario(
        _scenario(
            batches=2,
            series=(4, 4),
            same_source_twice=True,
            cancel=(False, False),
            redrive=(False, False),
            kinds=("slow",),
            rules=(
                Rule("store.add_items", "crash_after", process="handler:expand-", skip=1),
                # The third look-up of converted series is the crashed step's retry (the first two: batch
                # 1's group step and batch 2's crashed one), whichever delivery number it comes with.
                Rule("store.succeeded_fingerprints", "delay:1500", process="handler:expand-", skip=2),
            ),
        )
    )
    assert [f.kind for f in run.plan.injected] == ["crash_after", "delay:1500"]
    for batch_id in run.batch_ids:
        assert batch_id is not None
        items = run.inner.list_items(batch_id)
        assert len(items) == 4 and {i.skip_reason for i in items} == {""}  # both batches stored them pending
        assert all(i.state is ItemState.SUCCEEDED and i.task_seq == 0 for i in items)


def test_d9_an_expansion_whose_retries_run_out_is_restarted_not_failed() -> None:
    run = run_scenario(
        _scenario(series=(3,), rules=(Rule("store.add_items", "error_before", process="handler:expand-", times=10),))
    )
    assert any(t.queue is QueueName.EXPAND for t in run.model.dropped), "the expansion was never dropped"
    batch = _batch(run)
    assert (batch.status, batch.restarts, batch.epoch) == (BatchStatus.COMPLETED, 1, 1)


def test_d10_duplicate_list_deliveries_never_mix_two_cuts_or_lose_a_file() -> None:
    # 40 series of 5 files: several expansion chunks; every attempt is delivered twice, concurrently.
    run = run_scenario(_scenario(series=(40,), files=5, duplicate_rate=1.0))
    assert sum(1 for r in run.model.log if r.duplicate and r.task_id.endswith("-list")) >= 1
    assert _batch(run).listed_chunks > 1
    assert len(_items(run)) == 40


def test_d11_a_large_batch_never_writes_a_document_over_the_limit() -> None:
    # 30 series of 200 files: the expansion's chunks must be cut by bytes (Firestore: 1 MiB a document).
    run = run_scenario(_scenario(series=(30,), files=200))
    assert len(_items(run)) == 30
    store = run.inner._inner
    assert 0 < store.largest_document < 1024 * 1024


@pytest.mark.parametrize("fault", ["queue.enqueue", "store.create_batch"])
def test_d12_a_submit_whose_answer_was_lost_never_makes_a_second_batch(fault: str) -> None:
    # A failed enqueue must leave nothing behind even for a client that sends no Idempotency-Key (the task
    # is created before the batch, so the batch never exists without it); a record whose answer was lost
    # is found again through the key the client repeats.
    keyed = fault == "store.create_batch"
    run = run_scenario(_scenario(idempotency_keys=keyed, rules=(Rule(fault, "error_after", process="api:POST"),)))
    assert any(f.call == fault for f in run.plan.injected)
    assert len(run.inner.list_batches(limit=10)) == 1
    assert _batch(run).status is BatchStatus.COMPLETED


@pytest.mark.parametrize("fault", ["enqueue-fails", "instance-dies", "instance-dies-worker-gone"])
def test_d13_a_lost_hand_off_never_makes_a_permanent_failure_convert_again(fault: str) -> None:
    # The worker records the hand-off of a corrupt series, then its dead-letter task is not created: the
    # enqueue fails, or the instance dies first (and, in the last case, the worker then stays unreachable
    # until the convert task is dropped, so only the reconciler can finish the series).
    if fault == "enqueue-fails":
        rule = Rule("queue.enqueue", "error_before", process="handler:convert-")
    else:  # claim, confirm before converting, then the hand-off write
        rule = Rule("store.update_item", "crash_after", process="handler:convert-", skip=2)
    outages = ((75.0, 1800.0),) if fault == "instance-dies-worker-gone" else ()
    run = run_scenario(_scenario(series=(1,), kinds=("corrupt",), rules=(rule,), outages=outages))
    (item,) = _items(run)
    assert item.state is ItemState.DEAD_LETTERED and item.failure and item.failure.code == "conversion_failed"
    assert len(run.converter.calls) == 1  # converted once; the harness also checks every call


def test_d14_a_cancel_racing_the_group_step_leaves_nothing_pending() -> None:
    run = run_scenario(
        _scenario(
            series=(5,),
            cancel=(True,),
            cancel_after=5.0,
            rules=(Rule("store.add_items", "delay:30", process="handler:expand-"),),
        )
    )
    batch = _batch(run)
    assert batch.status is BatchStatus.CANCELLED
    assert all(i.is_terminal for i in _items(run))


@pytest.mark.parametrize("carry_deadline", [True, False], ids=["deadline-set", "cloud-tasks-default"])
def test_d15_an_expansion_longer_than_ten_minutes_is_not_redispatched(carry_deadline: bool) -> None:
    # Listing takes 15 minutes. With the expand function's timeout as the tasks' deadline, one attempt does
    # it; with Cloud Tasks' default of 10 minutes, the attempt is re-dispatched while it still runs.
    deadlines = None if carry_deadline else dict.fromkeys(QueueName, 600.0)
    run = run_scenario(_scenario(list_seconds=900.0, task_deadlines=deadlines))
    expand_timeouts = [r for r in run.model.log if r.queue is QueueName.EXPAND and r.status == 504]
    assert bool(expand_timeouts) is (not carry_deadline)
    assert _batch(run).status is BatchStatus.COMPLETED  # the invariants hold either way


# --- the finish step: report.html and BIDS placement, one writer per destination -------------------------


def test_d16_two_bids_batches_finishing_into_one_destination_take_turns() -> None:
    # Two --layout bids batches of different sources convert into one dataset (their sessions share
    # labels: runs are numbered across both). The first finish step to start stalls on its first write
    # for 10 minutes (a slow Drive, a GC pause) while its heartbeat keeps the destination's lease: the
    # other must wait its turn, then rewrite the top-level files from every series of both.
    run = run_scenario(
        _scenario(
            batches=2, series=(3, 3), bids=(True, True), shared_destination=True,
            cancel=(False, False), redrive=(False, False),
            rules=(Rule("sink.publish", "delay:600", process="handler:finish-"),),
        )
    )  # fmt: skip
    finishes = [a for a in run.answers if a.queue is QueueName.EXPAND and a.task_id.startswith("finish-")]
    assert any(a.status == 503 for a in finishes), "no finish step ever found the destination busy"
    assert sum(a.outcome == "done" for a in finishes) >= 2
    # (the harness checked that the files on disk are what this plan calls for)
    key = Location(LocationKind.LOCAL, str(run.dest_root / "shared")).key
    plan = planned_dataset(run.ctx, key, Layout(kind="bids"))
    assert plan.subjects() == ("00", "01", "02")
    assert max(int(dict(o.entities)["run"]) for o in plan.classified) == 2  # both batches' series, one numbering


def test_d17_a_finish_step_that_dies_half_way_is_completed_by_its_retry() -> None:
    # The finish step dies right after moving its second staged output (its lease stays until it expires,
    # its task until its dispatch deadline): the retry takes over and completes the same placement.
    run = run_scenario(
        _scenario(
            series=(3,), bids=(True,),
            rules=(Rule("sink.move", "crash_after", process="handler:finish-", skip=1),),
        )
    )  # fmt: skip
    assert any(f.call == "sink.move" and f.kind == "crash_after" for f in run.plan.injected), "no crash"
    finishes = [a for a in run.answers if a.task_id.startswith("finish-")]
    assert [a.outcome for a in finishes if a.status == 200][-1:] == ["done"]
    assert all(not o.name.startswith(".dicomflow/") for i in _items(run) for o in i.outputs)
