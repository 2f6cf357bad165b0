"""Issue 11 through the real HTTP edge with real token verification: owners, administrators, roots on the
fake Drive (nested shared folders), limits, task tokens and the Drive webhook's checks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import flask
import pytest

from dicomflow import bootstrap, http, samples
from dicomflow.auth import KeyCache
from dicomflow.config import Settings
from dicomflow.domain.failures import ServiceUnavailable
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.series import ConversionOptions
from dicomflow.ports import QueueName
from dicomflow.services.drive_changes import add_watch, handle_webhook
from tests.fakes.drive_server import FakeDrive
from tests.support import drive
from tests.support.access import API, TASK_URL, TASKS_SA, Issued, grants
from tests.support.fakes import InlineQueue

pytestmark = pytest.mark.integration

ALICE, BOB, ADMIN = "alice@lab.example", "bob@lab.example", "admin@lab.example"


@pytest.fixture
def fake() -> Iterator[FakeDrive]:
    yield from drive.started()


class World:
    """The fake Drive as a hospital share: Imaging/{GroupA/{sub-01, NIfTI}, GroupB/{sub-02, NIfTI}}, where
    alice is granted GroupA, bob GroupB, and one folder of GroupA ("secret-study") is also shared with bob's
    group by name only (nested inside alice's root: bob's grant does not reach it)."""

    def __init__(self, fake: FakeDrive, tmp_path: Path, make_settings: Any, **limits: Any) -> None:
        self.fake = fake
        imaging = fake.add_folder("Imaging", fake.root_id)
        self.group_a = fake.add_folder("GroupA", imaging)
        self.group_b = fake.add_folder("GroupB", imaging)
        self.a_study = fake.add_folder("sub-01", fake.add_folder("patients", self.group_a))
        self.secret = fake.add_folder("secret-study-of-Jane-Doe", self.group_a)
        self.a_out = fake.add_folder("NIfTI", self.group_a)
        self.b_study = fake.add_folder("sub-02", self.group_b)
        self.b_out = fake.add_folder("NIfTI", self.group_b)
        series = samples.write_series(tmp_path / "s", samples.SeriesSpec(kind="ct", slices=3), seed=61)
        for path in series.paths:
            fake.add_file(path.name, self.a_study, path.read_bytes())
        drive_values = {k: v for k, v in drive.drive_settings(fake).__dict__.items() if k.startswith("drive")}
        settings: Settings = make_settings(
            **drive_values,
            admins=ADMIN,
            access_grants=grants({ALICE: [f"drive://{self.group_a}"], "group-b@lab.example": [f"drive://{self.group_b}"]}),
            access_groups=json.dumps({"group-b@lab.example": [BOB]}),
            webhook_url="https://hooks.example.test/",
            **limits,
        )  # fmt: skip
        self.issued = Issued(settings)
        self.queue = InlineQueue()
        self.ctx = bootstrap.build(settings, queue=self.queue, authenticator=self.issued.authenticator)
        app = flask.Flask("access")

        @app.route("/<path:path>", methods=["GET", "POST"])
        def route(path: str) -> flask.Response:
            return http.batches_api(lambda: self.ctx, flask.request)

        self.client = app.test_client()

    def call(self, who: str | None, method: str, path: str, body: Any = None) -> Any:
        headers = self.issued.bearer(who) if who else {}
        return self.client.open(path, method=method, json=body, headers=headers)

    def submit(self, who: str, source: str, destination: str) -> Any:
        return self.call(
            who, "POST", "/batches", {"source": f"drive://{source}", "destination": f"drive://{destination}"}
        )


@pytest.fixture
def world(fake: FakeDrive, tmp_path: Path, make_settings: Any) -> Iterator[World]:
    w = World(fake, tmp_path, make_settings)
    yield w
    w.ctx.close()


def test_a_batch_is_seen_and_controlled_only_by_its_owner_and_administrators(world: World) -> None:
    accepted = world.submit(ALICE, world.a_study, world.a_out)
    assert accepted.status_code == 202, accepted.data
    batch_id = accepted.get_json()["batch_id"]
    world.queue.drain(world.ctx)
    mine = world.call(ALICE, "GET", f"/batches/{batch_id}")
    assert mine.status_code == 200 and mine.get_json()["owner"] == ALICE
    assert mine.get_json()["counters"]["succeeded"] == 1

    unknown = world.call(BOB, "GET", "/batches/doesnotexist0")
    for method, path in (("GET", f"/batches/{batch_id}"), ("POST", f"/batches/{batch_id}:cancel"),
                         ("POST", f"/batches/{batch_id}:retry-dead-letters")):  # fmt: skip
        refused = world.call(BOB, method, path)
        assert refused.status_code == 404, (method, path, refused.data)
        # Word for word what an unknown id gets: nothing tells bob the batch exists.
        assert refused.get_json()["detail"] == unknown.get_json()["detail"].replace("doesnotexist0", batch_id)
    assert world.call(BOB, "GET", "/batches").get_json()["batches"] == []
    assert [b["batch_id"] for b in world.call(ALICE, "GET", "/batches").get_json()["batches"]] == [batch_id]
    assert world.call(ADMIN, "GET", f"/batches/{batch_id}").status_code == 200
    bobs = world.submit(BOB, world.b_study, world.b_out).get_json()["batch_id"]
    listed = {b["batch_id"] for b in world.call(ADMIN, "GET", "/batches").get_json()["batches"]}
    assert listed == {batch_id, bobs}
    assert world.call(ALICE, "POST", f"/batches/{bobs}:cancel").status_code == 404
    assert world.call(ADMIN, "POST", f"/batches/{bobs}:cancel").status_code == 202  # administrators act on all
    assert world.call(None, "GET", "/batches").status_code == 401


def test_folders_outside_the_callers_roots_are_refused_without_naming_anything(world: World) -> None:
    requests_before = len(world.fake.requests)
    for source, destination, field in (
        (world.a_study, world.b_out, "source"),  # alice's data into bob's folder
        (world.secret, world.b_out, "source"),  # nested inside alice's root: not bob's
        ("0" * 28, world.b_out, "source"),  # does not exist at all: the same answer
        (world.b_study, world.a_out, "destination"),
    ):
        refused = world.submit(BOB, source, destination)
        assert refused.status_code == 403, refused.data
        problem = refused.get_json()
        assert problem["field"] == field
        assert f"drive://{world.group_b}" in problem["detail"]  # bob's own root, the only one he may know
        for name in ("Jane", "secret", "GroupA", "sub-01", "NIfTI", "Imaging", world.group_a):
            assert name not in problem["detail"], problem
    assert world.ctx.store.list_batches() == []
    # Nothing was opened: only parent lookups (files.get with fields id,name,mimeType,parents,trashed).
    looked = [r for r in world.fake.requests[requests_before:] if "files" in r.path]
    assert looked and all(r.method == "GET" and "alt=media" not in r.url for r in looked)
    # A member of the group is granted the group's root, nested folders included.
    assert world.submit(BOB, world.b_study, world.b_out).status_code == 202
    watch = world.call(
        BOB, "POST", "/watches", {"folder": f"drive://{world.secret}", "destination": f"drive://{world.b_out}"}
    )
    assert watch.status_code == 403 and watch.get_json()["field"] == "folder"
    assert "Jane" not in watch.get_json()["detail"]


def test_parent_lookups_are_cached(world: World) -> None:
    assert world.submit(ALICE, world.a_study, world.a_out).status_code == 202
    before = world.fake.request_count("GET")
    assert world.submit(ALICE, world.a_study, world.a_out).status_code == 202
    lookups = world.fake.request_count("GET") - before
    # Only the source/destination checks of submit itself touched Drive again, not the parents chain.
    assert lookups <= 2, lookups


def test_watches_belong_to_their_owner_and_start_batches_owned_by_them(world: World) -> None:
    world.fake.delivery_mode = "manual"
    opened = world.call(
        ALICE, "POST", "/watches", {"folder": f"drive://{world.group_a}", "destination": f"drive://{world.a_out}"}
    )
    assert opened.status_code == 201, opened.data
    channel_id = opened.get_json()["channel_id"]
    assert opened.get_json()["owner"] == ALICE
    assert world.call(BOB, "GET", "/watches").get_json()["watches"] == []
    assert [w["channel_id"] for w in world.call(ADMIN, "GET", "/watches").get_json()["watches"]] == [channel_id]
    assert world.call(BOB, "POST", f"/watches/{channel_id}:stop").status_code == 404
    stored = world.ctx.store.get_channel(channel_id)
    assert stored is not None and stored.owner == ALICE and len(stored.token_hash) == 64
    assert world.call(ALICE, "POST", f"/watches/{channel_id}:stop").get_json()["active"] is False


def test_a_watch_whose_owner_lost_the_grant_is_stopped_before_it_submits(
    fake: FakeDrive, tmp_path: Path, make_settings: Any
) -> None:
    w = World(fake, tmp_path, make_settings)
    fake.delivery_mode = "manual"
    channel = add_watch(w.ctx, Location(LocationKind.DRIVE, w.group_a), Location(LocationKind.DRIVE, w.a_out),
                        ConversionOptions(), owner=ALICE)  # fmt: skip
    w.ctx.store.touch_pending_folder(w.a_study, w.group_a, 0.0)
    revoked = replace(w.ctx.settings, access_grants=grants({BOB: [f"drive://{w.group_b}"]}))
    w.ctx.settings = revoked
    from dicomflow.services.drive_changes import settle_folders

    assert settle_folders(w.ctx) == []
    stopped = w.ctx.store.get_channel(channel.channel_id)
    assert stopped is not None and not stopped.active
    assert w.ctx.store.list_batches() == []
    w.ctx.close()


def test_limits_per_submitter(fake: FakeDrive, tmp_path: Path, make_settings: Any) -> None:
    w = World(fake, tmp_path, make_settings, max_unfinished_batches=2, max_batch_files=2)
    assert w.submit(ALICE, w.a_study, w.a_out).status_code == 202
    assert w.submit(ALICE, w.a_study, w.a_out).status_code == 202
    third = w.submit(ALICE, w.a_study, w.a_out)
    assert third.status_code == 429 and "2 unfinished batches" in third.get_json()["detail"]
    assert w.submit(BOB, w.b_study, w.b_out).status_code == 202  # a limit per submitter, not global
    w.queue.drain(w.ctx)
    mine = w.call(ALICE, "GET", "/batches").get_json()["batches"]
    assert {b["status"] for b in mine} == {"failed"}  # the source holds 3 files, the limit is 2
    reason = mine[0]["failure"]["reason"]
    assert "more than 2 files" in reason and mine[0]["files_seen"] == 0  # failed while listing
    assert w.submit(ALICE, w.a_study, w.a_out).status_code == 202  # finished batches free their places
    w.ctx.close()


def test_listing_stops_at_the_first_file_over_the_limit(fake: FakeDrive, tmp_path: Path, make_settings: Any) -> None:
    w = World(fake, tmp_path, make_settings, max_batch_bytes=1)
    seen: list[str] = []
    source = w.ctx.source_for(Location(LocationKind.DRIVE, w.a_study))
    original = source.list_files

    def counting(location: Location) -> Iterator[Any]:
        for entry in original(location):
            seen.append(entry.path)
            yield entry

    source.list_files = counting  # type: ignore[method-assign]
    batch_id = w.submit(ALICE, w.a_study, w.a_out).get_json()["batch_id"]
    w.queue.drain(w.ctx)
    batch = w.ctx.store.get_batch(batch_id)
    assert batch.failure is not None and "more than 1 bytes" in batch.failure.reason
    assert len(seen) == 1  # not one file more was listed
    w.ctx.close()


def test_task_handlers_accept_only_the_tasks_service_accounts_token(world: World) -> None:
    app = flask.Flask("worker")

    @app.post("/")
    def convert() -> flask.Response:
        return http.handle_task_request(lambda: world.ctx, QueueName.CONVERT, flask.request)

    client = app.test_client()
    body = {"batch_id": "nope", "item_id": "nope"}
    assert client.post("/", json=body).status_code == 401
    assert client.post("/", json=body, headers=world.issued.bearer(TASKS_SA, API)).status_code == 401  # wrong aud
    other = client.post("/", json=body, headers=world.issued.bearer("intruder@lab.example", TASK_URL))
    assert other.status_code == 403
    assert client.post("/", json=body, headers=world.issued.bearer(TASKS_SA, TASK_URL)).status_code == 404


def test_the_webhook_requires_the_resource_a_channel_token_and_fresh_message_numbers(world: World) -> None:
    world.fake.delivery_mode = "manual"
    channel = add_watch(world.ctx, Location(LocationKind.DRIVE, world.group_a),
                        Location(LocationKind.DRIVE, world.a_out), ConversionOptions(), owner=ALICE)  # fmt: skip
    sync = world.fake.deliver_pending()[0]  # the address is not reachable from here: read what Drive sent
    token = sync.headers["X-Goog-Channel-Token"]
    assert token and channel.token_hash not in token and sync.headers["X-Goog-Message-Number"] == "1"
    world.queue.pending.clear()
    base = {"X-Goog-Channel-ID": channel.channel_id, "X-Goog-Channel-Token": token,
            "X-Goog-Resource-ID": channel.resource_id, "X-Goog-Resource-State": "change"}  # fmt: skip

    def notify(headers: dict[str, str]) -> int:
        return handle_webhook(world.ctx, headers)

    assert notify(base | {"X-Goog-Message-Number": "10"}) == 200
    assert len(world.queue.pending) == 1
    world.queue.pending.clear()
    assert notify(base | {"X-Goog-Message-Number": "10"}) == 200  # replayed: accepted, nothing scheduled
    assert notify(base | {"X-Goog-Message-Number": "7"}) == 200  # older, out of order: same
    assert not world.queue.pending
    missing_resource = {k: v for k, v in base.items() if k != "X-Goog-Resource-ID"}
    assert notify(missing_resource | {"X-Goog-Message-Number": "11"}) == 403
    assert notify(base | {"X-Goog-Resource-ID": "other", "X-Goog-Message-Number": "12"}) == 403
    assert notify(base | {"X-Goog-Channel-Token": token[:-1] + "x", "X-Goog-Message-Number": "13"}) == 403
    assert notify(dict(base)) == 403  # no message number
    assert not world.queue.pending
    assert notify(base | {"X-Goog-Message-Number": "14"}) == 200  # (its task shares the window's name)
    stored = world.ctx.store.get_channel(channel.channel_id)
    assert stored is not None and stored.last_message == 14


def test_a_channel_from_before_per_channel_tokens_uses_the_shared_secret(world: World) -> None:
    world.fake.delivery_mode = "manual"
    channel = add_watch(world.ctx, Location(LocationKind.DRIVE, world.group_a),
                        Location(LocationKind.DRIVE, world.a_out), ConversionOptions())  # fmt: skip
    world.ctx.store.update_channel(channel.channel_id, lambda c: replace(c, token_hash=""))  # as migrated
    headers = {"X-Goog-Channel-ID": channel.channel_id, "X-Goog-Resource-ID": channel.resource_id,
               "X-Goog-Resource-State": "change", "X-Goog-Message-Number": "3"}  # fmt: skip
    assert handle_webhook(world.ctx, headers | {"X-Goog-Channel-Token": "shared"}) == 403  # no shared secret set
    world.ctx.settings = replace(world.ctx.settings, webhook_token="shared")
    assert handle_webhook(world.ctx, headers | {"X-Goog-Channel-Token": "shared"}) == 200


def test_keys_are_cached_and_fetched_again_only_for_an_unknown_key(world: World) -> None:
    fetched: list[float] = []
    now = [0.0]

    def fetch(_url: str) -> tuple[dict[str, str], float]:
        fetched.append(now[0])
        return world.issued.issuer.certs, 3600.0

    cache = KeyCache("u", fetch, clock=lambda: now[0])
    key_id = world.issued.issuer.key_id
    for _ in range(5):
        cache.keys(key_id)
    assert fetched == [0.0]
    now[0] = 30.0
    cache.keys("rotated-key")  # unknown, but within a minute of the last fetch: no stampede
    now[0] = 90.0
    cache.keys("rotated-key")
    now[0] = 4000.0
    cache.keys(key_id)  # max-age passed
    assert fetched == [0.0, 90.0, 4000.0]

    def down(_url: str) -> tuple[dict[str, str], float]:
        raise ServiceUnavailable("issuer down")

    with pytest.raises(ServiceUnavailable):
        KeyCache("u", down).keys(None)


def test_a_state_file_from_before_owners_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    from dicomflow.adapters.local.sqlite_store import SqliteStateStore

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:  # the batches table as it was, with one batch in it
        old.execute("CREATE TABLE batches (batch_id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, "
                    "updated_at REAL NOT NULL, data TEXT NOT NULL)")  # fmt: skip
        data = {"batch_id": "old1", "sources": ["/in"], "destination": "/out", "status": "completed",
                "created_at": 1.0, "updated_at": 1.0}  # fmt: skip
        old.execute("INSERT INTO batches VALUES ('old1', 'completed', 1.0, 1.0, ?)", (json.dumps(data),))
    store = SqliteStateStore(path, lambda: 2.0)
    assert [b.batch_id for b in store.list_batches(owner="")] == ["old1"]
    assert store.list_batches(owner=ALICE) == [] and store.get_batch("old1").owner == ""
    store.close()
