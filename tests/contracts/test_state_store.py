"""The StateStore contract: SQLite (local mode) and Firestore (emulator) must behave identically."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from dicomflow.domain import model
from dicomflow.domain.failures import Conflict, Failure, NotFound
from dicomflow.domain.locations import parse_location
from dicomflow.domain.model import BatchStatus, Counters, ItemState
from dicomflow.domain.series import (
    ConversionOptions,
    DicomHeader,
    FileRef,
    Ignored,
    IgnoredKind,
    SeriesGroup,
    SeriesKey,
)
from dicomflow.ports import ExpansionChunk, IdempotencyRecord, SkippedFile, StateStore, WatchChannel
from tests.support.stores import STORE_PARAMS, Clock, make_store

pytestmark = pytest.mark.contract

MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(params=STORE_PARAMS)
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[StateStore]:
    yield from make_store(request.param, tmp_path, clock)


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000_000.0)


def _batch(batch_id: str = "b1", created_at: float = 1_000_000.0, dest: str = "/out") -> model.Batch:
    return model.Batch(
        batch_id=batch_id,
        sources=(parse_location("/in", field="s"),),
        destination=parse_location(dest, field="d"),
        options=ConversionOptions(),
        label="contract",
        status=BatchStatus.EXPANDING,
        created_at=created_at,
        updated_at=created_at,
    )


def _items(batch: model.Batch, n: int, files_per_item: int = 3) -> list[model.Item]:
    items = []
    for i in range(n):
        key = SeriesKey(f"1.2.3.{i}", MR)
        files = tuple(FileRef(f"/in/s{i}/{j}", f"s{i}/{j}", 100 + j, "abc") for j in range(files_per_item))
        group = SeriesGroup(key, files, tuple(f"9.{i}.{j}" for j in range(files_per_item)), f"s{i}", i, "MR", "T1w",
                            output_stem=f"{i}_T1w")  # fmt: skip
        items.append(model.new_item(batch, group, fingerprint=f"fp{i}", now=batch.created_at))
    return items


def test_batches_round_trip_and_unknown_ids_are_not_found(store: StateStore) -> None:
    batch = _batch()
    stored, created = store.create_batch(batch)
    assert created and stored == batch
    fetched = store.get_batch("b1")
    assert replace(fetched, counters=batch.counters) == batch
    with pytest.raises(NotFound):
        store.get_batch("nope")


def test_idempotency_key_returns_the_first_batch(store: StateStore, clock: Clock) -> None:
    record = IdempotencyRecord("k" * 64, "req-a", "b1", expires_at=clock() + 3600)
    first, created = store.create_batch(_batch("b1"), record)
    again, created_again = store.create_batch(_batch("b2"), replace(record, batch_id="b2"))
    assert created and not created_again
    assert again.batch_id == first.batch_id == "b1"
    with pytest.raises(Conflict):
        store.create_batch(_batch("b3"), replace(record, batch_id="b3", request_hash="req-b"))
    with pytest.raises(NotFound):
        store.get_batch("b2")  # nothing partial left behind


def test_an_expired_idempotency_key_starts_a_new_batch(store: StateStore, clock: Clock) -> None:
    record = IdempotencyRecord("e" * 64, "req", "b1", expires_at=clock() + 10)
    store.create_batch(_batch("b1"), record)
    clock.advance(11)
    stored, created = store.create_batch(_batch("b2"), replace(record, batch_id="b2", expires_at=clock() + 10))
    assert created and stored.batch_id == "b2"


def test_items_are_created_once_and_counters_follow_states(store: StateStore) -> None:
    batch, _ = store.create_batch(_batch())
    items = _items(batch, 5)
    assert store.add_items(items) == items
    assert store.add_items(items) == items  # a redelivered expansion changes nothing
    claimed, _ = store.update_item("b1", items[4].item_id, lambda i: model.claim(i, 1.0, 60, "w"))
    # ...not even to an item a worker holds, and it learns what is stored, not what it recomputed:
    assert store.add_items(items) == [*items[:4], claimed]
    assert store.get_item("b1", items[4].item_id) == claimed
    store.update_item("b1", items[4].item_id, lambda i: model.skip(i, 2.0, "nothing"))
    counters = store.counters("b1")
    assert (counters.series_total, counters.pending, counters.skipped) == (5, 4, 1)
    store.update_item("b1", items[0].item_id, lambda i: model.claim(i, 1.0, 60, "w"))
    store.update_item("b1", items[1].item_id, lambda i: model.skip(i, 2.0, "r"))
    counters = store.get_batch("b1").counters
    assert (counters.pending, counters.running, counters.skipped, counters.finished) == (2, 1, 2, 2)
    # Not counted: the snapshot stored with the batch (still the empty one from its creation).
    assert store.get_batch("b1", counted=False).counters == Counters()
    assert [b.counters for b in store.list_batches(counted=False)] == [Counters()]


def test_item_round_trip_keeps_every_field(store: StateStore) -> None:
    batch, _ = store.create_batch(_batch())
    (item,) = _items(batch, 1, files_per_item=5)
    store.add_items([item])
    assert store.get_item("b1", item.item_id) == item
    finished = model.succeed(
        model.claim(item, 5.0, 60, "w") or item,
        9.0,
        (model.OutputFile("s0/0_T1w.nii.gz", 123, "ab" * 32, "ref"),),
        model.Timings(1.5, 2.5, 0.5),
        ("Warning: x",),
    )
    assert finished is not None
    finished = replace(finished, task_seq=3, handed_off=True, expires_at=99.0)
    stored, _ = store.update_item("b1", item.item_id, lambda _: finished)
    assert stored == replace(finished, rev=item.rev + 1)
    assert store.get_item("b1", item.item_id) == stored


def test_every_write_of_an_item_bumps_its_revision(store: StateStore) -> None:
    # The reconciler fences its transitions on the revision it read: any write in between must show.
    batch, _ = store.create_batch(_batch())
    (item,) = _items(batch, 1)
    store.add_items([item])
    revs = [store.get_item("b1", item.item_id).rev]
    for now in (1.0, 2.0, 3.0):
        stored, _ = store.update_item("b1", item.item_id, lambda i, t=now: replace(i, updated_at=t))
        revs.append(stored.rev)
    assert revs == [revs[0], revs[0] + 1, revs[0] + 2, revs[0] + 3]
    assert store.get_item("b1", item.item_id).rev == revs[-1]
    _, changed = store.update_item("b1", item.item_id, lambda i: None)
    assert not changed and store.get_item("b1", item.item_id).rev == revs[-1]


def test_a_change_that_returns_none_writes_nothing(store: StateStore) -> None:
    batch, _ = store.create_batch(_batch())
    (item,) = _items(batch, 1)
    store.add_items([item])
    current, changed = store.update_item("b1", item.item_id, lambda i: None)
    assert not changed and current == item
    with pytest.raises(NotFound):
        store.update_item("b1", "missing", lambda i: i)


def test_concurrent_claims_let_exactly_one_worker_in(store: StateStore) -> None:
    batch, _ = store.create_batch(_batch())
    (item,) = _items(batch, 1)
    store.add_items([item])
    winners: list[str] = []
    barrier = threading.Barrier(6)

    def worker(name: str) -> None:
        barrier.wait()
        _, changed = store.update_item("b1", item.item_id, lambda i: model.claim(i, 10.0, 600, name))
        if changed:
            winners.append(name)

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    stored = store.get_item("b1", item.item_id)
    assert stored.attempts == 1 and stored.lease_owner == winners[0]


def test_list_items_pages_in_id_order_and_filters_by_state(store: StateStore) -> None:
    batch, _ = store.create_batch(_batch())
    items = _items(batch, 7)
    store.add_items(items)
    for item in items[:3]:
        store.update_item("b1", item.item_id, lambda i: replace(i, state=ItemState.DEAD_LETTERED))
    ids = sorted(i.item_id for i in items)
    first = store.list_items("b1", limit=4)
    second = store.list_items("b1", after=first[-1].item_id, limit=4)
    assert [i.item_id for i in first + second] == ids
    dead = store.list_items("b1", frozenset({ItemState.DEAD_LETTERED}))
    assert sorted(i.item_id for i in dead) == sorted(i.item_id for i in items[:3])


def test_find_stale_returns_expired_leases_and_idle_waiting_items(store: StateStore) -> None:
    batch, _ = store.create_batch(_batch(created_at=50.0))
    live, expired, retrying, fresh_retry, handed, done = _items(batch, 6)
    old_pending, new_pending = (
        replace(i, updated_at=t) for i, t in zip(_items(batch, 8)[6:], (90.0, 400.0), strict=True)
    )
    store.add_items([live, expired, retrying, fresh_retry, handed, done, old_pending, new_pending])
    store.update_item("b1", live.item_id, lambda i: model.claim(i, 100.0, 1000, "w"))
    store.update_item("b1", expired.item_id, lambda i: model.claim(i, 100.0, 10, "w"))
    for item, when in ((retrying, 100.0), (fresh_retry, 500.0)):
        store.update_item("b1", item.item_id, lambda i, t=when: model.claim(i, t, 10, "w"))
        store.update_item("b1", item.item_id, lambda i, t=when: model.retry_later(i, t, Failure("x", "y", False), "w"))
    store.update_item("b1", handed.item_id, lambda i: model.claim(i, 100.0, 10, "h"))
    failure = Failure("x", "y", True)
    store.update_item("b1", handed.item_id, lambda i: model.hand_off(i, 101.0, failure, "h", 0, grace_seconds=5))
    store.update_item("b1", done.item_id, lambda i: model.skip(i, 100.0, "nothing"))
    stale = store.find_stale(now=200.0, idle_before=300.0)
    assert {i.item_id for i in stale} == {expired.item_id, handed.item_id, retrying.item_id, old_pending.item_id}
    assert [i.item_id for i in store.find_stale(now=200.0, idle_before=300.0, limit=1)][-1] == old_pending.item_id


def test_counters_read_while_series_change_state_always_add_up(store: StateStore) -> None:
    # DESIGN.md invariant 9: a counted read is one snapshot. Writers move items between two states while
    # a reader counts; a store that counts each state with its own query (at its own moment) sees an
    # item in both states, or in neither, and the totals stop adding up.
    batch, _ = store.create_batch(replace(_batch(), status=BatchStatus.RUNNING))
    items = _items(batch, 12, files_per_item=1)
    store.add_items(items)
    stop = threading.Event()

    def flip(item: model.Item) -> None:
        while not stop.is_set():
            store.update_item(
                "b1", item.item_id, lambda i: model.claim(i, 1.0, 60, "w") or replace(i, state=ItemState.PENDING)
            )

    writers = [threading.Thread(target=flip, args=(item,)) for item in items[:4]]
    for writer in writers:
        writer.start()
    try:
        reads = []
        for n in range(50):
            reads.append(store.get_batch("b1").counters if n % 2 else store.counters("b1"))
            time.sleep(0.002)  # let the writers run between reads (in-process stores hold the GIL)
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    for counters in reads:
        parts = counters.pending + counters.running + counters.retrying + counters.finished
        assert parts == counters.series_total == 12, counters
    assert len({(c.pending, c.running) for c in reads}) > 1, "the writers never ran during the reads"


def test_succeeded_fingerprints_are_scoped_to_the_destination(store: StateStore) -> None:
    here, _ = store.create_batch(_batch("b1", dest="/out"))
    there, _ = store.create_batch(_batch("b2", dest="/elsewhere"))
    mine, other = _items(here, 2)
    store.add_items([mine, other, *_items(there, 1)])
    store.update_item("b1", mine.item_id, lambda i: model.succeed(i, 1.0, (), model.Timings(), ()))
    store.update_item("b2", _items(there, 1)[0].item_id, lambda i: model.succeed(i, 1.0, (), model.Timings(), ()))
    assert store.succeeded_fingerprints(here.destination.key, ["fp0", "fp1", "fp9"]) == {"fp0"}
    assert store.succeeded_fingerprints(there.destination.key, ["fp0", "fp1"]) == {"fp0"}
    assert store.succeeded_fingerprints(parse_location("/nowhere", field="d").key, ["fp0"]) == set()


def test_succeeded_file_counts_and_recorded_outputs_per_series_and_destination(store: StateStore) -> None:
    here, _ = store.create_batch(_batch("b1", dest="/out"))
    later, _ = store.create_batch(_batch("b2", dest="/out"))
    there, _ = store.create_batch(_batch("b3", dest="/elsewhere"))
    big, small = _items(here, 2, files_per_item=5)
    store.add_items([big, small, *_items(later, 1, files_per_item=3), *_items(there, 1, files_per_item=9)])
    output = model.OutputFile("s0/0_T1w.nii.gz", 10, "ab" * 32)
    for batch_id, item_id in (("b1", big.item_id), ("b2", big.item_id), ("b3", big.item_id)):
        store.update_item(batch_id, item_id, lambda i: model.succeed(i, 1.0, (output,), model.Timings(), ()))
    assert store.succeeded_file_counts(here.destination.key, [big.item_id, small.item_id]) == {big.item_id: 5}
    assert store.succeeded_file_counts(there.destination.key, [big.item_id]) == {big.item_id: 9}
    assert store.succeeded_file_counts(here.destination.key, []) == {}
    assert store.recorded_outputs(here.destination.key, big.item_id) == {(output.name, output.sha256)}
    assert store.recorded_outputs(here.destination.key, small.item_id) == set()


def test_recorded_outputs_of_one_layout(store: StateStore) -> None:
    # The mirror layout replaces only its own earlier outputs of a series; a BIDS dataset's in the same
    # destination are its finish step's (services/outputs.replace_earlier_outputs).
    mirror, _ = store.create_batch(_batch("b1", dest="/out"))
    bids, _ = store.create_batch(_batch("b2", dest="/out"))
    (series,) = _items(mirror, 1)
    (again,) = _items(bids, 1)
    store.add_items([series, replace(again, layout="bids")])
    flat = model.OutputFile("s0/0_T1w.nii.gz", 10, "ab" * 32)
    named = model.OutputFile("sub-01/anat/sub-01_T1w.nii.gz", 10, "cd" * 32)
    store.update_item("b1", series.item_id, lambda i: model.succeed(i, 1.0, (flat,), model.Timings(), ()))
    store.update_item("b2", series.item_id, lambda i: model.succeed(i, 2.0, (named,), model.Timings(), ()))
    key = mirror.destination.key
    assert store.recorded_outputs(key, series.item_id) == {(flat.name, flat.sha256), (named.name, named.sha256)}
    assert store.recorded_outputs(key, series.item_id, layout="mirror") == {(flat.name, flat.sha256)}
    assert store.recorded_outputs(key, series.item_id, layout="bids") == {(named.name, named.sha256)}


def test_a_changed_fingerprint_is_what_succeeded_fingerprints_sees(store: StateStore) -> None:
    # A redrive reads the series again (new files, new fingerprint); a superseded success is marked so it
    # no longer counts as converted. Each store must answer from the fingerprint as it is now.
    batch, _ = store.create_batch(_batch("b1"))
    first, second = _items(batch, 2)
    store.add_items([first, second])
    store.update_item("b1", first.item_id, lambda i: model.succeed(i, 5.0, (model.OutputFile("a.nii", 1, "h"),),
                                                                 model.Timings(), ()))  # fmt: skip
    assert store.succeeded_fingerprints(batch.destination.key, ["fp0"]) == {"fp0"}
    _, changed = store.update_item("b1", first.item_id, lambda i: model.supersede(i, 6.0, "b9", finished_before=9.0))
    assert changed
    assert store.succeeded_fingerprints(batch.destination.key, ["fp0"]) == set()
    assert store.recorded_outputs(batch.destination.key, first.item_id) == set()

    failure = Failure("conversion_failed", "corrupt", permanent=True)
    store.update_item("b1", second.item_id, lambda i: model.claim(i, 1.0, 60, "w"))
    store.update_item("b1", second.item_id, lambda i: model.hand_off(i, 2.0, failure, "w", 0, grace_seconds=1))
    store.update_item("b1", second.item_id, lambda i: model.dead_letter(i, 3.0, failure))
    store.update_item("b1", second.item_id, lambda i: model.redrive(i, 4.0, fingerprint="fp-reread"))
    store.update_item("b1", second.item_id, lambda i: model.succeed(i, 8.0, (), model.Timings(), ()))
    assert store.succeeded_fingerprints(batch.destination.key, ["fp1", "fp-reread"]) == {"fp-reread"}


def test_batches_update_atomically_and_list_newest_first(store: StateStore) -> None:
    store.create_batch(_batch("old", created_at=10.0))
    store.create_batch(_batch("new", created_at=20.0))
    updated, changed = store.update_batch("old", lambda b: model.finish_expansion(b, 30.0, 5, 1, ("x (not_dicom)",)))
    assert changed and updated.status is BatchStatus.RUNNING
    _, changed_again = store.update_batch("old", lambda b: model.finish_expansion(b, 31.0, 5, 1, ()))
    assert not changed_again
    assert [b.batch_id for b in store.list_batches(limit=10)] == ["new", "old"]
    assert [b.batch_id for b in store.list_batches(statuses=frozenset({BatchStatus.RUNNING}))] == ["old"]
    assert store.get_batch("old").ignored_examples == ("x (not_dicom)",)


def test_batches_list_by_owner_and_status_newest_first(store: StateStore) -> None:
    """The batch API shows each caller only their own batches (issue 11): the filter is the store's."""
    for batch_id, owner, created in (("a1", "alice@example.org", 10.0), ("b1", "bob@example.org", 20.0),
                                     ("a2", "alice@example.org", 30.0), ("n1", "", 40.0)):  # fmt: skip
        store.create_batch(replace(_batch(batch_id, created_at=created), owner=owner))
    assert store.get_batch("a1").owner == "alice@example.org"
    assert [b.batch_id for b in store.list_batches(owner="alice@example.org")] == ["a2", "a1"]
    assert [b.batch_id for b in store.list_batches(owner="bob@example.org", counted=False)] == ["b1"]
    assert [b.batch_id for b in store.list_batches(owner="")] == ["n1"]
    assert store.list_batches(owner="carol@example.org") == []
    assert [b.batch_id for b in store.list_batches(limit=1, owner="alice@example.org")] == ["a2"]
    store.update_batch("a1", lambda b: model.finish_expansion(b, 50.0, 1, 0, ()))
    running = store.list_batches(statuses=frozenset({BatchStatus.RUNNING}), owner="alice@example.org")
    assert [b.batch_id for b in running] == ["a1"] and running[0].owner == "alice@example.org"
    expanding = frozenset({BatchStatus.EXPANDING})
    assert [b.batch_id for b in store.list_batches(statuses=expanding, owner="alice@example.org")] == ["a2"]
    assert [b.batch_id for b in store.list_batches(limit=10)] == ["n1", "a2", "b1", "a1"]


def test_expansion_chunks_hold_files_and_scan_results_per_listing(store: StateStore) -> None:
    store.create_batch(_batch())
    files = tuple(FileRef(f"/in/{n}", f"a/{n}", n + 1) for n in range(3))
    skipped = (SkippedFile("a/doc", Ignored(IgnoredKind.NOT_BINARY, "google doc")),)
    store.put_chunks(
        [ExpansionChunk("b1", 0, files, skipped, listing="L1"), ExpansionChunk("b1", 1, files[:1], listing="L1")]
    )
    store.put_chunks([ExpansionChunk("b1", 0, files[1:], listing="L2")])  # a concurrent duplicate listing
    assert store.count_unscanned_chunks("b1", "L1") == 2
    results = (
        DicomHeader("1.1", MR, "9.1", 3, "MR", "T1w", ("ORIGINAL", "PRIMARY")),
        Ignored(IgnoredKind.EMPTY),
        Ignored(IgnoredKind.NOT_DICOM, "x"),
    )
    store.put_chunk_results("b1", "L1", 0, results)
    assert store.count_unscanned_chunks("b1", "L1") == 1
    assert store.count_unscanned_chunks("b1", "L2") == 1
    assert store.unscanned_chunks("b1", "L1") == [1] and store.unscanned_chunks("b1", "L2") == [0]
    chunk = store.get_chunk("b1", "L1", 0)
    assert chunk.files == files and chunk.skipped == skipped and chunk.results == results
    assert store.get_chunk("b1", "L2", 0).files == files[1:]
    assert sorted(c.chunk_no for c in store.list_chunks("b1", "L1")) == [0, 1]
    store.delete_chunks("b1", keep="L1")
    assert list(store.list_chunks("b1", "L2")) == [] and len(list(store.list_chunks("b1", "L1"))) == 2
    store.delete_chunks("b1")
    assert list(store.list_chunks("b1", "L1")) == []
    with pytest.raises(NotFound):
        store.get_chunk("b1", "L1", 0)


def test_chunks_are_read_in_pages_and_all_of_them_come_back(store: StateStore) -> None:
    # More chunks than one page of the Firestore store (CHUNKS_PER_READ): every one is read, none twice.
    store.create_batch(_batch())
    files = (FileRef("/in/0", "a/0", 1),)
    store.put_chunks([ExpansionChunk("b1", n, files, listing="L1") for n in range(47)])
    assert sorted(c.chunk_no for c in store.list_chunks("b1", "L1")) == list(range(47))
    assert store.unscanned_chunks("b1", "L1") == list(range(47))


def test_watch_channels_and_pending_folders(store: StateStore) -> None:
    channel = WatchChannel("ch1", "res1", "folder1", "drive://dest", "tok1", 5000.0, 100.0, {"compress": True}, "lab",
                           owner="alice@example.org", token_hash="ab" * 32, last_message=7)  # fmt: skip
    store.put_channel(channel)
    assert store.get_channel("ch1") == channel
    assert store.get_channel("missing") is None
    updated, changed = store.update_channel("ch1", lambda c: replace(c, page_token="tok2"))
    assert changed and updated.page_token == "tok2"
    store.update_channel("ch1", lambda c: replace(c, active=False))
    assert store.list_channels() == []
    assert [c.channel_id for c in store.list_channels(active_only=False)] == ["ch1"]

    store.touch_pending_folder("f1", "folder1", 100.0)
    folder = store.touch_pending_folder("f1", "folder1", 160.0)
    assert (folder.first_change_at, folder.last_change_at) == (100.0, 160.0)
    assert store.list_pending_folders(quiet_since=150.0) == []
    (quiet,) = store.list_pending_folders(quiet_since=170.0)
    assert not store.mark_folder_submitted("f1", last_change_at=150.0, batch_id="bX")  # a newer change arrived
    assert store.mark_folder_submitted("f1", last_change_at=quiet.last_change_at, batch_id="b9")
    assert store.list_pending_folders(quiet_since=10_000.0) == []
    again = store.touch_pending_folder("f1", "folder1", 900.0)  # new uploads after the batch: a new wait
    assert again.first_change_at == 900.0 and not again.submitted_batch_id


def test_many_items_in_one_call(store: StateStore) -> None:
    batch, _ = store.create_batch(_batch())
    items = _items(batch, 450, files_per_item=1)
    assert len(store.add_items(items)) == 450
    assert store.counters("b1").series_total == 450


def test_many_large_series_in_one_call_stay_within_request_limits(store: StateStore) -> None:
    # GCP_FACTS gotcha 24 / issue D11: 400 series x 200 files with realistic paths is about 15 MB of
    # file references; one Firestore commit takes 10 MiB (4 MiB on the emulator). The store must split.
    batch, _ = store.create_batch(_batch())
    items = []
    for n, item in enumerate(_items(batch, 400, files_per_item=1)):
        files = tuple(
            FileRef(
                "1" + "x" * 32 + f"{n:04d}{j:04d}",
                f"sub-{n:04d}/ses-01/ep2d_bold_rest_{n}/IM-{j:06d}.dcm",
                520_000,
                "f" * 32,
            )
            for j in range(200)
        )
        items.append(replace(item, files=files, file_count=200))
    assert len(store.add_items(items)) == 400
    assert store.counters("b1").series_total == 400
    assert store.get_item("b1", items[123].item_id).files == items[123].files


def test_a_series_with_thousands_of_files_round_trips_and_can_change_its_files(store: StateStore) -> None:
    # Firestore documents are limited to 1 MiB: long file lists (fMRI: one file per slice per volume)
    # must survive storage intact, and a redrive that refreshes them must replace them completely.
    batch, _ = store.create_batch(_batch())
    (item,) = _items(batch, 1, files_per_item=4500)
    store.add_items([item])
    assert store.get_item("b1", item.item_id).files == item.files
    store.update_item("b1", item.item_id, lambda i: replace(i, state=ItemState.DEAD_LETTERED))
    fewer = tuple(replace(f, size=f.size + 1) for f in item.files[:2100])
    redriven, changed = store.update_item("b1", item.item_id, lambda i: model.redrive(i, 2.0, fewer))
    assert changed and redriven.files == fewer
    stored = store.get_item("b1", item.item_id)
    assert stored.files == fewer and stored.file_count == 2100
    assert [i.files for i in store.list_items("b1")] == [fewer]


# --- what the finish step reads and writes (services/finish.py) --------------------------------------------


def _succeeded_bids(item: model.Item, n: int) -> model.Item:
    outputs = (model.OutputFile(f".dicomflow/staging/{item.item_id}/{n}_T1w.nii.gz", 10, "cd" * 32, "r"),)
    facts = model.SeriesFacts(sidecars={f"{n}_T1w": {"BidsGuess": ["anat", "_T1w"], "ImageType": ["A", "B"]}},
                              acquired_at=12.5)  # fmt: skip
    return replace(item, layout="bids", subject="01", state=ItemState.SUCCEEDED, outputs=outputs, facts=facts)


def test_destination_items_are_the_succeeded_bids_series_of_any_batch_in_pages(store: StateStore) -> None:
    first, _ = store.create_batch(_batch("b1"))
    second, _ = store.create_batch(_batch("b2", dest="/out"))
    elsewhere, _ = store.create_batch(_batch("b3", dest="/other"))
    a, b, c = (_items(first, 3)[n] for n in range(3))
    store.add_items([_succeeded_bids(a, 0), _succeeded_bids(b, 1), c])  # c: pending, not counted
    store.add_items([_succeeded_bids(i, 5) for i in _items(second, 2)])
    store.add_items([replace(_succeeded_bids(_items(elsewhere, 1)[0], 7), dest_key=elsewhere.destination.key)])
    mirror = replace(_items(second, 3)[2], state=ItemState.SUCCEEDED)  # a mirror series in the same place
    store.add_items([mirror])
    key = first.destination.key
    pages, after = [], ""
    while page := store.list_destination_items(key, after=after, limit=2):
        pages.append(page)
        after = f"{page[-1].batch_id}/{page[-1].item_id}"
    found = [i for page in pages for i in page]
    assert [(i.batch_id, i.item_id) for i in found] == sorted(
        [("b1", a.item_id), ("b1", b.item_id), *[("b2", i.item_id) for i in _items(second, 2)]]
    )
    assert [len(page) for page in pages] == [2, 2]
    by_id = {(i.batch_id, i.item_id): i for i in found}
    assert by_id[("b1", a.item_id)] == _succeeded_bids(a, 0)  # sidecars and acquisition time round-trip


def test_unfinished_batches_are_the_final_ones_owing_their_finish_step(store: StateStore) -> None:
    for batch_id in ("b1", "b2", "b3"):
        store.create_batch(_batch(batch_id))
    done = Counters(series_total=0)
    store.update_batch("b1", lambda b: replace(b, status=BatchStatus.RUNNING))
    store.update_batch("b1", lambda b: model.settle(b, done, 5.0))  # final: owes its finish step
    store.update_batch("b2", lambda b: model.cancel(b, 5.0))
    store.update_batch("b2", lambda b: model.finish_done(b, 1, "/out/report.html", 6.0))  # finished
    assert [b.batch_id for b in store.find_unfinished()] == ["b1"]
    assert store.get_batch("b2").report_ref == "/out/report.html"


def test_the_dataset_record_lets_one_writer_in_whatever_the_concurrency(store: StateStore) -> None:
    from dicomflow.domain import dataset

    assert store.get_dataset("k1") == dataset.Dataset("k1")
    winners: list[str] = []
    lock = threading.Lock()

    def take(owner: str) -> None:
        _, taken = store.update_dataset("k1", lambda d: dataset.take(d, owner, 100.0, 300.0))
        if taken:
            with lock:
                winners.append(owner)

    threads = [threading.Thread(target=take, args=(f"w{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    (owner,) = winners
    store.update_dataset("k1", lambda d: dataset.will_write(d, owner, {"a.tsv": "ab" * 32}, 101.0))
    stored, changed = store.update_dataset("k1", lambda d: dataset.wrote(d, owner, {"a.tsv": "ab" * 32},
                                                                          frozenset(), 102.0))  # fmt: skip
    assert changed and store.get_dataset("k1") == stored and stored.owns("a.tsv", "ab" * 32)
    assert store.get_dataset("k2") == dataset.Dataset("k2")  # one record per destination
