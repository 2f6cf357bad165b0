"""The named scenarios must fail on the defects they guard against: each test here puts one of the
reproduced defects back (the old behaviour, monkeypatched in) and requires its scenario to fail. A
scenario that still passes with its defect in place would prove nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

import dicomflow.http as http_module
import dicomflow.services.expand as expand_module
import dicomflow.services.tasks as tasks_module
from dicomflow.domain import model
from dicomflow.domain.model import ClaimOutcome, Item, ItemState
from dicomflow.domain.retry import CONTROL_POLICY
from dicomflow.services import reconcile as reconcile_module
from dicomflow.services import submit as submit_module
from tests.fakes.memory_store import MemoryStateStore
from tests.sim import test_scenarios as scenarios
from tests.sim import world
from tests.sim.harness import SimulationFailure

pytestmark = pytest.mark.simulation


def _fails(scenario: Callable[..., None], *args: Any) -> None:
    with pytest.raises((AssertionError, SimulationFailure)):
        scenario(*args)


def test_d1_fails_if_the_reconciler_ignores_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    original = MemoryStateStore.find_stale

    def without_pending(self: MemoryStateStore, now: float, idle_before: float, limit: int = 500) -> list[Item]:
        return [i for i in original(self, now, idle_before, limit) if i.state is not ItemState.PENDING]

    monkeypatch.setattr(MemoryStateStore, "find_stale", without_pending)
    _fails(scenarios.test_d1_a_convert_task_dropped_before_any_claim_is_requeued, True)


def test_d3_fails_without_lease_renewal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Silent:
        alive = True

        def stop(self) -> None:
            return None

    monkeypatch.setattr(world.SimHeartbeat, "start", lambda self, beat, every: Silent())
    _fails(scenarios.test_d3_a_slow_last_attempt_keeps_its_lease_and_its_success)


def test_d4_fails_if_any_attempt_may_fail_the_series(monkeypatch: pytest.MonkeyPatch) -> None:
    def unfenced(
        item: Item, now: float, failure: model.Failure, owner: str, generation: int | None = None
    ) -> Item | None:
        if item.state is not ItemState.RUNNING:
            return None
        return replace(
            item, state=ItemState.RETRYING, failure=failure, lease_owner="", lease_until=None, updated_at=now
        )

    monkeypatch.setattr(model, "retry_later", unfenced)
    _fails(scenarios.test_d4_a_stale_attempts_failure_never_undoes_the_newer_attempts_work)


def test_d5_fails_if_dead_letters_ignore_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    def any_generation(item: Item, now: float, failure: model.Failure, generation: int | None = None) -> Item | None:
        return None if item.is_terminal else model._dead(item, now, failure)

    monkeypatch.setattr(model, "dead_letter", any_generation)
    _fails(scenarios.test_d5_a_late_dead_letter_message_never_ends_a_redriven_generation)


def test_d6_fails_if_the_reconciler_trusts_its_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    original = model.release_orphan

    def trusting(
        item: Item, now: float, failure: model.Failure, seen: Item, *, expired_before: float | None = None
    ) -> Item | None:
        return original(item, now, failure, item, expired_before=float("inf"))

    monkeypatch.setattr(model, "release_orphan", trusting)
    _fails(scenarios.test_d6_the_reconciler_never_releases_a_lease_renewed_after_its_query)


def test_d8_fails_if_the_group_step_enqueues_what_it_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    original = expand_module._group

    def recomputing(ctx: Any, batch: model.Batch) -> None:
        store = ctx.store

        class AsComputed:
            def __getattr__(self, name: str) -> Any:
                return getattr(store, name)

            def add_items(self, items: list[Item]) -> list[Item]:
                store.add_items(items)
                return list(items)

        ctx.store = AsComputed()
        try:
            original(ctx, batch)
        finally:
            ctx.store = store

    monkeypatch.setattr(expand_module, "_group", recomputing)
    _fails(scenarios.test_d8_a_repeated_group_step_enqueues_for_the_items_as_stored)


def test_d9_fails_if_the_last_attempt_fails_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    original = expand_module.handle_expand

    def failing_on_last(ctx: Any, payload: Any, attempt: Any) -> None:
        try:
            original(ctx, payload, attempt)
        except Exception as exc:
            if not CONTROL_POLICY.is_last_attempt(attempt.retry_count) or not hasattr(exc, "reason"):
                raise
            expand_module.fail_expansion(ctx, ctx.store.get_batch(payload.batch_id, counted=False), exc)

    monkeypatch.setattr(tasks_module, "handle_expand", failing_on_last)
    _fails(scenarios.test_d9_an_expansion_whose_retries_run_out_is_restarted_not_failed)


def test_d12_fails_if_submit_records_the_batch_before_enqueueing(monkeypatch: pytest.MonkeyPatch) -> None:
    original = submit_module.submit

    def record_first(ctx: Any, request: Any, key: str | None = None, *, check_locations: bool = True) -> Any:
        queue, held = ctx.queue, []

        class Later:
            def enqueue(self, tasks: list[Any]) -> None:
                held.extend(tasks)

        ctx.queue = Later()
        try:
            result = original(ctx, request, key, check_locations=check_locations)
        finally:
            ctx.queue = queue
        queue.enqueue(held)
        return result

    monkeypatch.setattr(http_module, "submit", record_first)
    _fails(scenarios.test_d12_a_submit_whose_answer_was_lost_never_makes_a_second_batch, "queue.enqueue")


def test_d13_fails_if_the_reconciler_retries_a_lost_hand_off(monkeypatch: pytest.MonkeyPatch) -> None:
    original = reconcile_module._Run.expired_lease

    def like_a_crash(self: Any, seen: Item) -> None:
        if seen.handed_off and not self.exhausted(seen):
            stored, changed = self.ctx.update_item(
                seen.batch_id,
                seen.item_id,
                lambda i: replace(
                    i,
                    state=ItemState.RETRYING,
                    handed_off=False,
                    lease_owner="",
                    lease_until=None,
                    task_seq=i.task_seq + 1,
                ),
            )
            if changed:
                self.requeue(stored, seen)
            return
        original(self, seen)

    monkeypatch.setattr(reconcile_module._Run, "expired_lease", like_a_crash)
    _fails(
        scenarios.test_d13_a_lost_hand_off_never_makes_a_permanent_failure_convert_again, "instance-dies-worker-gone"
    )


def test_claims_of_handed_off_series_are_refused_in_the_model() -> None:
    # (The second fence behind D13: even a redelivery after the grace finds the series handed off.)
    item = replace(scenarios_item(), state=ItemState.RUNNING, handed_off=True, lease_until=0.0)
    assert model.claim_decision(item, 100.0, 0) is ClaimOutcome.ALREADY_DONE


def scenarios_item() -> Item:
    from dicomflow.domain.locations import parse_location
    from dicomflow.domain.series import ConversionOptions, FileRef, SeriesGroup, SeriesKey

    batch = model.Batch("b", (parse_location("/in", field="s"),), parse_location("/out", field="d"),
                        ConversionOptions(), "", model.BatchStatus.RUNNING, 0.0, 0.0)  # fmt: skip
    group = SeriesGroup(SeriesKey("1.2", "1.2.840.10008.5.1.4.1.1.4"), (FileRef("a", "a", 1),), ("9",), "", 1, "MR", "")
    return model.new_item(batch, group, "fp", 0.0)


def test_d16_fails_if_finish_steps_write_without_the_destinations_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomflow.domain import dataset

    # Every writer "takes" the lease and keeps it, whoever holds it: two finish steps write at once.
    monkeypatch.setattr(dataset, "take", lambda d, owner, now, seconds: replace(d, lease_owner=owner))
    monkeypatch.setattr(dataset, "renew", lambda d, owner, now, seconds: d)
    monkeypatch.setattr(dataset, "will_write", lambda d, owner, pending, now: d)
    monkeypatch.setattr(dataset, "wrote", lambda d, owner, written, removed, now: dataset.Dataset(
        d.dest_key, tuple(sorted({**dict(d.files), **{n: dataset.short_digest(v) for n, v in written.items()}}.items()))
    ))  # fmt: skip
    _fails(scenarios.test_d16_two_bids_batches_finishing_into_one_destination_take_turns)


def test_d17_fails_if_a_finish_step_is_recorded_done_before_its_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomflow.services.finish as finish_module

    original = finish_module._place_dataset

    def done_first(writer: Any) -> Any:
        batch = writer.batch
        writer.ctx.store.update_batch(
            batch.batch_id, lambda b: model.finish_done(b, b.completions, "", writer.ctx.clock())
        )
        return original(writer)

    monkeypatch.setattr(finish_module, "_place_dataset", done_first)
    _fails(scenarios.test_d17_a_finish_step_that_dies_half_way_is_completed_by_its_retry)
