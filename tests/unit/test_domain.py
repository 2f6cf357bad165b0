"""The pure domain: retry math, state transitions, grouping, fingerprints, exit-code mapping."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dicomflow.domain import model
from dicomflow.domain.conversion import ConversionVerdict, classify, console_warnings
from dicomflow.domain.failures import (
    ConversionFailed,
    ConverterCrashed,
    DiskFull,
    Failure,
    InvalidInput,
    TransientError,
)
from dicomflow.domain.locations import LocationKind, parse_location
from dicomflow.domain.model import BatchStatus, ClaimOutcome, Counters, ItemState
from dicomflow.domain.paths import decode_component, display, encode_component, safe_local_name, safe_local_parts
from dicomflow.domain.retry import RetryPolicy, Verdict, decide
from dicomflow.domain.series import (
    ConversionOptions,
    DicomHeader,
    FileRef,
    SeriesKey,
    fingerprint,
    group_series,
    safe_component,
)

pytestmark = pytest.mark.unit

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


# --- retry ---------------------------------------------------------------------------------------------


def test_backoff_follows_cloud_tasks_doubling_then_linear_growth() -> None:
    # The example in google/cloud/tasks_v2/types/queue.py: min 10 s, max 300 s, 3 doublings.
    policy = RetryPolicy(max_attempts=10, min_backoff_seconds=10, max_backoff_seconds=300, max_doublings=3)
    assert [policy.backoff(n) for n in range(8)] == [10, 20, 40, 80, 160, 240, 300, 300]


def test_last_attempt_counts_the_first_attempt() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.is_last_attempt(n) for n in range(4)] == [False, False, True, True]


@pytest.mark.parametrize("retry_count", [0, 1, 2, 3])
def test_transient_failures_retry_until_the_last_attempt(retry_count: int) -> None:
    policy = RetryPolicy(max_attempts=4)
    transient = Failure("rate_limited", "slow down", permanent=False)
    expected = Verdict.DEAD_LETTER if retry_count == 3 else Verdict.RETRY
    assert decide(transient, retry_count, policy) is expected


def test_permanent_failures_are_never_retried() -> None:
    permanent = Failure("conversion_failed", "bad data", permanent=True)
    assert decide(permanent, 0, RetryPolicy(max_attempts=100)) is Verdict.DEAD_LETTER


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"min_backoff_seconds": 5, "max_backoff_seconds": 1}, {"max_doublings": -1}]
)
def test_retry_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- grouping and fingerprints -------------------------------------------------------------------------


def _header(series: str, sop: str, sop_class: str = MR, number: int = 3, description: str = "T1w") -> DicomHeader:
    return DicomHeader(series, sop_class, sop, number, "MR", description)


def _ref(path: str, size: int = 10) -> FileRef:
    return FileRef(ref=f"/abs/{path}", path=path, size=size)


def test_groups_by_series_uid_and_sop_class_never_by_number_or_folder() -> None:
    scanned = [
        (_ref("flat/a"), _header("1.1", "1", number=3)),
        (_ref("flat/b"), _header("1.1", "2", number=3)),
        # Same SeriesInstanceUID, enhanced copy: a different series (DESIGN.md §9).
        (_ref("flat/c"), _header("1.1", "3", sop_class=ENHANCED_MR, number=3)),
        # Same SeriesNumber, different UID: a different series.
        (_ref("flat/d"), _header("1.2", "4", number=3)),
        # Same UID spread over two folders: one series.
        (_ref("other/e"), _header("1.2", "5", number=3)),
    ]
    groups = {g.key: g for g in group_series(scanned)}
    assert set(groups) == {SeriesKey("1.1", MR), SeriesKey("1.1", ENHANCED_MR), SeriesKey("1.2", MR)}
    assert [f.path for f in groups[SeriesKey("1.1", MR)].files] == ["flat/a", "flat/b"]
    assert groups[SeriesKey("1.2", MR)].rel_dir == ""  # common parent of flat/ and other/
    assert groups[SeriesKey("1.1", MR)].rel_dir == "flat"


def test_colliding_output_names_in_one_folder_get_distinct_stems() -> None:
    scanned = [
        (_ref("x/a"), _header("1.1", "1")),
        (_ref("x/b"), _header("1.1", "2", sop_class=ENHANCED_MR)),
        (_ref("x/c"), _header("1.9", "3", number=4, description="bold")),
    ]
    stems = sorted(g.output_stem for g in group_series(scanned))
    assert len(set(stems)) == 3
    assert "4_bold" in stems
    assert all(s.startswith("3_T1w_") for s in stems if s != "4_bold")


def test_duplicate_instances_are_converted_once() -> None:
    scanned = [(_ref("a/1"), _header("1.1", "7")), (_ref("b/1"), _header("1.1", "7"))]
    (group,) = group_series(scanned)
    assert len(group.files) == 1
    assert group.duplicate_instances == 1


def test_fingerprint_changes_with_instances_converter_and_options_only() -> None:
    key = SeriesKey("1.1", MR)
    base = fingerprint(key, ["b", "a"], "v1", ConversionOptions())
    assert base == fingerprint(key, ["a", "b"], "v1", ConversionOptions())  # order does not matter
    assert base != fingerprint(key, ["a", "b", "c"], "v1", ConversionOptions())
    assert base != fingerprint(key, ["a", "b"], "v2", ConversionOptions())
    assert base != fingerprint(key, ["a", "b"], "v1", ConversionOptions(compress=False))
    assert base != fingerprint(SeriesKey("1.1", ENHANCED_MR), ["a", "b"], "v1", ConversionOptions())


def test_item_ids_are_valid_cloud_tasks_and_firestore_ids() -> None:
    item_id = SeriesKey("1.2.840.113619.2.55.3", MR).item_id
    assert item_id.isalnum()
    assert "." not in item_id
    assert len(item_id) == 32


def test_safe_component_keeps_only_portable_characters() -> None:
    assert safe_component("T1 MPRAGE (sag)/%n") == "T1_MPRAGE_sag_n"
    assert safe_component("%%%") == ""


# --- transitions ---------------------------------------------------------------------------------------


def _item(state: ItemState = ItemState.PENDING, **changes: object) -> model.Item:
    item = model.Item(
        batch_id="b",
        item_id="i",
        sop_class_uid=MR,
        fingerprint="f",
        dest_key="d",
        rel_dir="x",
        output_stem="3_T1w",
        series_number=3,
        modality="MR",
        description="T1w",
        files=(),
        state=state,
        created_at=0.0,
        updated_at=0.0,
    )
    return replace(item, **changes)  # type: ignore[arg-type]


def test_claim_takes_a_lease_and_counts_the_attempt() -> None:
    claimed = model.claim(_item(), now=100.0, lease_seconds=60, owner="w1")
    assert claimed is not None
    assert (claimed.state, claimed.attempts, claimed.lease_owner, claimed.lease_until) == (
        ItemState.RUNNING,
        1,
        "w1",
        160.0,
    )


def test_a_live_lease_blocks_a_second_claim_and_an_expired_one_does_not() -> None:
    running = model.claim(_item(), now=100.0, lease_seconds=60, owner="w1")
    assert running is not None
    assert model.claim_decision(running, 120.0) is ClaimOutcome.BUSY
    assert model.claim(running, now=120.0, lease_seconds=60, owner="w2") is None
    taken_over = model.claim(running, now=161.0, lease_seconds=60, owner="w2")
    assert taken_over is not None and taken_over.attempts == 2 and taken_over.lease_owner == "w2"


@pytest.mark.parametrize("state", sorted(model.TERMINAL))
def test_terminal_items_ignore_every_late_event(state: ItemState) -> None:
    item = _item(state, lease_owner="w")
    failure = Failure("x", "y", permanent=True)
    assert model.claim_decision(item, 0.0) is ClaimOutcome.ALREADY_DONE
    assert model.claim(item, 0.0, 60, "w") is None
    assert model.retry_later(item, 0.0, failure, "w") is None
    assert model.hand_off(item, 0.0, failure, "w", 0, grace_seconds=1) is None
    assert model.dead_letter(item, 0.0, failure, 0) is None
    assert model.renew(item, 0.0, 60, "w", 0) is None


def test_a_result_is_recorded_from_any_attempt_of_its_generation_until_the_series_is_final() -> None:
    outputs = (model.OutputFile("a.nii.gz", 1, "0" * 64),)
    # A stale attempt (its lease was taken over, or it handed off after a later attempt's failure) finished:
    # its outputs are in the destination, so its success is recorded rather than left unaccounted for.
    for open_state in (ItemState.RUNNING, ItemState.RETRYING, ItemState.PENDING):
        done = model.succeed(_item(open_state, handed_off=open_state is ItemState.RUNNING), 5.0, outputs,
                             model.Timings(), (), generation=0)  # fmt: skip
        assert done is not None and done.state is ItemState.SUCCEEDED and done.outputs == outputs
        assert not done.handed_off and done.publishing == ()
    # Once final the series is closed (its finalizer may already be retracting what was published)...
    for final in sorted(model.TERMINAL):
        assert model.succeed(_item(final), 5.0, outputs, model.Timings(), (), generation=0) is None
        assert model.skip(_item(final), 5.0, "nothing", generation=0) is None
    # ...and a result of an older generation is never recorded: the series was redriven since.
    assert (
        model.succeed(_item(ItemState.RUNNING, generation=2), 5.0, outputs, model.Timings(), (), generation=1) is None
    )


def test_an_unsuccessful_end_keeps_the_publish_intent_until_it_is_retracted() -> None:
    intent = (model.OutputFile("s/1_T1w.nii.gz", 10, "1" * 64),)
    running = model.claim(_item(), now=0.0, lease_seconds=60, owner="w1")
    assert running is not None
    announced = model.renew(running, 1.0, 60, "w1", 0, publishing=intent)
    assert announced is not None and announced.publishing == intent
    assert not announced.needs_retraction  # still running: a success may yet record it
    handed = model.hand_off(announced, 2.0, Failure("x", "y", True), "w1", 0, grace_seconds=5)
    dead = model.dead_letter(handed, 3.0, Failure("x", "y", True), 0) if handed else None
    assert dead is not None and dead.needs_retraction and dead.publishing == intent
    cleared = model.retracted(dead, 4.0)
    assert cleared is not None and not cleared.needs_retraction and cleared.state is ItemState.DEAD_LETTERED
    assert model.retracted(cleared, 5.0) is None
    cancelled = model.cancel_item(replace(announced, state=ItemState.RETRYING), 6.0)
    assert cancelled is not None and cancelled.needs_retraction


def test_only_the_lease_holder_of_the_generation_may_fail_the_series() -> None:
    running = model.claim(_item(), now=0.0, lease_seconds=60, owner="w1")
    assert running is not None
    failure = Failure("rate_limited", "later", permanent=False)
    assert model.retry_later(running, 1.0, failure, owner="stale-worker") is None
    assert model.hand_off(running, 1.0, failure, "stale-worker", 0, grace_seconds=5) is None
    assert model.hand_off(running, 1.0, failure, "w1", 1, grace_seconds=5) is None  # wrong generation
    assert model.renew(running, 1.0, 60, "stale-worker", 0) is None
    retrying = model.retry_later(running, 1.0, failure, owner="w1")
    assert retrying is not None and retrying.state is ItemState.RETRYING and retrying.failure == failure


def test_a_handed_off_series_is_never_claimed_again_and_ends_only_by_its_generations_dead_letter() -> None:
    running = model.claim(_item(generation=1), now=0.0, lease_seconds=60, owner="w1", generation=1)
    assert running is not None
    permanent = Failure("conversion_failed", "corrupt", permanent=True)
    handed = model.hand_off(running, 2.0, permanent, "w1", 1, grace_seconds=30)
    assert handed is not None and handed.handed_off and handed.lease_until == 32.0
    assert model.claim_decision(handed, 100.0, 1) is ClaimOutcome.ALREADY_DONE  # even with the grace expired
    assert model.claim(handed, 100.0, 60, "w2", 1) is None
    assert model.dead_letter(handed, 3.0, permanent, generation=0) is None  # a late message of generation 0
    dead = model.dead_letter(handed, 3.0, Failure("other", "ignored", permanent=True), generation=1)
    assert dead is not None and dead.state is ItemState.DEAD_LETTERED and dead.failure == permanent
    assert model.dead_letter(_item(ItemState.RUNNING, generation=1), 3.0, permanent, 1) is None  # not handed off


def test_claims_are_fenced_on_the_tasks_generation() -> None:
    item = _item(generation=2)
    assert model.claim_decision(item, 0.0, 1) is ClaimOutcome.ALREADY_DONE  # an older generation's task
    assert model.claim_decision(item, 0.0, 3) is ClaimOutcome.NOT_YET  # a redrive not recorded yet
    assert model.claim(item, 0.0, 60, "w", 3) is None and model.claim(item, 0.0, 60, "w", 1) is None
    assert ClaimOutcome.NOT_YET.retry_later and ClaimOutcome.BUSY.retry_later
    assert not ClaimOutcome.ALREADY_DONE.retry_later
    claimed = model.claim(item, 0.0, 60, "w", 2)
    assert claimed is not None and claimed.generation == 2


def test_renewal_extends_only_the_holders_live_claim() -> None:
    running = model.claim(_item(), now=0.0, lease_seconds=60, owner="w1")
    assert running is not None
    renewed = model.renew(running, 50.0, 60, "w1", 0)
    assert renewed is not None and renewed.lease_until == 110.0 and renewed.attempts == 1
    taken = model.claim(running, 61.0, 60, "w2")  # w1 stalled past its lease
    assert taken is not None and model.renew(taken, 62.0, 60, "w1", 0) is None


def test_the_reconciler_acts_only_on_the_snapshot_it_read() -> None:
    running = model.claim(_item(), now=0.0, lease_seconds=60, owner="w1")
    assert running is not None
    seen = replace(running, rev=7)
    failure = Failure("worker_interrupted", "gone", permanent=False)
    # A heartbeat (or any write) after the query bumped the revision: the lease is live again.
    assert model.release_orphan(replace(seen, rev=8, lease_until=200.0), 100.0, failure, seen) is None
    assert model.release_orphan(seen, 30.0, failure, seen) is None  # lease not expired yet
    released = model.release_orphan(seen, 100.0, failure, seen)
    assert released is not None and released.state is ItemState.RETRYING and released.task_seq == seen.task_seq + 1
    assert released.task_id != seen.task_id
    pending = replace(_item(), rev=3)
    requeued = model.requeue(pending, 5.0, pending)
    assert requeued is not None and requeued.task_seq == 1 and requeued.state is ItemState.PENDING
    assert model.requeue(replace(pending, rev=4), 5.0, pending) is None
    handed = replace(running, handed_off=True, failure=Failure("conversion_failed", "corrupt", True), rev=9)
    abandoned = model.abandon(handed, 100.0, failure, handed)
    assert abandoned is not None and abandoned.failure == handed.failure  # the worker's reason wins


def test_redrive_gives_a_new_generation_and_attempt_budget() -> None:
    dead = _item(ItemState.DEAD_LETTERED, attempts=5, generation=0, task_seq=3)
    redriven = model.redrive(dead, 10.0)
    assert redriven is not None
    assert (redriven.state, redriven.attempts, redriven.generation, redriven.task_seq) == (ItemState.PENDING, 0, 1, 0)
    assert redriven.task_id != dead.task_id
    assert model.redrive(dead, 10.0, generation=1) is None  # a stale redrive of another generation
    assert model.redrive(_item(ItemState.SUCCEEDED), 10.0) is None


def test_cancel_skips_waiting_items_but_lets_running_ones_finish() -> None:
    assert model.cancel_item(_item(ItemState.PENDING), 1.0) is not None
    assert model.cancel_item(_item(ItemState.RETRYING), 1.0, "cancelled") is not None
    assert model.cancel_item(_item(ItemState.RUNNING), 1.0, "cancelled") is None


def _batch(status: BatchStatus = BatchStatus.RUNNING) -> model.Batch:
    loc = parse_location("/data/in", field="source")
    return model.Batch("b", (loc,), parse_location("/data/out", field="d"), ConversionOptions(), "", status, 0.0, 0.0)


def test_batch_completes_only_when_every_item_is_terminal() -> None:
    batch = _batch()
    not_done = Counters(series_total=3, succeeded=2, running=1)
    assert model.complete_if_done(batch, not_done, 5.0) is None
    done = model.complete_if_done(batch, Counters(series_total=3, succeeded=2, skipped=1), 5.0)
    assert done is not None and done.status is BatchStatus.COMPLETED
    failed = model.complete_if_done(batch, Counters(series_total=3, succeeded=2, dead_lettered=1), 5.0)
    assert failed is not None and failed.status is BatchStatus.COMPLETED_WITH_FAILURES
    assert model.complete_if_done(_batch(BatchStatus.EXPANDING), Counters(), 5.0) is None


def test_settle_follows_the_counters_both_ways() -> None:
    failed = model.settle(_batch(), Counters(series_total=2, succeeded=1, dead_lettered=1), 5.0, retention_seconds=100)
    assert failed is not None and failed.status is BatchStatus.COMPLETED_WITH_FAILURES and failed.expires_at == 105.0
    # A late success turns the dead letter into a success: the batch is completed after all.
    fixed = model.settle(failed, Counters(series_total=2, succeeded=2), 9.0)
    assert fixed is not None and fixed.status is BatchStatus.COMPLETED
    # A redrive put series back in the queue: the batch runs again until they finish.
    reopened = model.settle(failed, Counters(series_total=2, succeeded=1, pending=1), 9.0)
    assert reopened is not None and reopened.status is BatchStatus.RUNNING and reopened.finished_at is None
    assert model.settle(failed, failed.counters, 10.0) is None  # nothing changed: nothing written
    for status in (BatchStatus.EXPANDING, BatchStatus.CANCELLED, BatchStatus.FAILED):
        assert model.settle(_batch(status), Counters(series_total=1, succeeded=1), 5.0) is None


def test_expansion_steps_are_fenced_on_the_epoch_and_the_first_listing_wins() -> None:
    batch = _batch(BatchStatus.EXPANDING)
    listed = model.list_done(batch, 1.0, 0, "e0-aaaa", 3)
    assert listed is not None and (listed.listing, listed.listed_chunks) == ("e0-aaaa", 3)
    assert model.list_done(listed, 2.0, 0, "e0-bbbb", 4) is None  # a concurrent duplicate listing
    assert model.list_done(batch, 1.0, 1, "e1-cccc", 3) is None  # a step of a later epoch
    restarted = model.restart_expansion(listed, 10.0, seen_updated_at=listed.updated_at)
    assert restarted is not None and (restarted.epoch, restarted.listing, restarted.restarts) == (1, "", 1)
    assert model.restart_expansion(listed, 10.0, seen_updated_at=0.5) is None  # progress since the look
    assert model.finish_expansion(restarted, 11.0, 1, 0, (), epoch=0) is None


def test_counters_are_derived_from_item_states() -> None:
    counters = Counters.from_states({ItemState.SUCCEEDED: 4, ItemState.DEAD_LETTERED: 1, ItemState.RUNNING: 2})
    assert counters.series_total == 7
    assert counters.finished == 5


# --- dcm2niix outcomes ---------------------------------------------------------------------------------


def test_exit_zero_with_outputs_is_a_conversion() -> None:
    result = classify(0, 2, "Warning: Issue870: slice timing\nConvert 2 DICOM as /tmp/x/out/3_T1w (128x128x48)")
    assert result.verdict is ConversionVerdict.CONVERTED
    assert result.warnings == ("Warning: Issue870: slice timing",)


@pytest.mark.parametrize("code", [2, 11])
def test_nothing_to_convert_is_a_skip_not_a_failure(code: int) -> None:
    assert classify(code, 0, "Error: Unable to find any DICOM images").verdict is ConversionVerdict.NOTHING_TO_CONVERT


@pytest.mark.parametrize("code", [1, 4, 10, 12])
def test_data_errors_are_permanent(code: int) -> None:
    with pytest.raises(ConversionFailed) as info:
        classify(code, 0, "")
    assert info.value.permanent


@pytest.mark.parametrize("code", [137, 139, -9, -11])
def test_crashes_and_kills_are_transient(code: int) -> None:
    with pytest.raises(ConverterCrashed) as info:
        classify(code, 0, "")
    assert not info.value.permanent


def test_unwritable_output_is_transient_disk_trouble() -> None:
    with pytest.raises(DiskFull):
        classify(7, 0, "")
    with pytest.raises(TransientError):
        classify(6, 0, "")


def test_partial_conversion_keeps_outputs_and_warns() -> None:
    result = classify(8, 1, "")
    assert result.verdict is ConversionVerdict.CONVERTED
    assert any("only part" in w for w in result.warnings)


def test_console_warnings_never_keep_paths() -> None:
    lines = console_warnings("Warning: File not large enough: /home/ZZPHI/sub-01/x.dcm\nplain line")
    assert lines == ("Warning: File not large enough: <path>",)


# --- locations and paths -------------------------------------------------------------------------------


def test_drive_and_local_locations() -> None:
    drive = parse_location("drive://1AbCdEfGhIjKlMnOp_-", field="source")
    assert drive.kind is LocationKind.DRIVE and drive.ref == "1AbCdEfGhIjKlMnOp_-"
    local = parse_location("data", field="source", absolute_path="/abs/data")
    assert local.kind is LocationKind.LOCAL and local.ref == "/abs/data"
    assert drive.key != local.key


@pytest.mark.parametrize("text", ["", "drive://", "drive://bad id!", "s3://bucket/x"])
def test_bad_locations_name_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_location(text, field="destination")
    assert info.value.field == "destination"


def test_path_components_round_trip_slashes_and_percent() -> None:
    for name in ["a/b", "50%", "plain", "%2F"]:
        assert decode_component(encode_component(name)) == name
    assert display("a%2Fb/c") == "a/b/c"


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("..", "__"),
        (".", "_"),
        ("a\x00b", "a_b"),
        ("tab\there", "tab_here"),
        ("back\\slash", "back_slash"),
        ("ok", "ok"),
    ],
)
def test_local_names_cannot_escape_or_hide(name: str, safe: str) -> None:
    assert safe_local_name(name) == safe


def test_encoded_slash_never_becomes_a_directory_separator() -> None:
    assert safe_local_parts("study%2F..%2Fetc/series") == ["study_.._etc", "series"]


def test_dcm2niix_using_more_images_than_the_series_has_files_is_not_an_error() -> None:
    """An enhanced file giving magnitude and phase is one file used twice: deterministic, never a retry."""
    from dicomflow.domain.conversion import check_input_count

    console = "Convert 10 DICOM as /x/1_T1w_e1 (64x64x10x1)\nConvert 10 DICOM as /x/1_T1w_e2 (64x64x10x1)"
    assert check_input_count(console, 20) == ()
    assert check_input_count(console, 24) == ("dcm2niix used 20 of the 24 files of this series",)
    assert check_input_count(console, 12) == ()
