"""The batch API and the task edge over HTTP (Flask test clients, functions-framework's real app)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flask
import functions_framework
import pytest

from dicomflow import bootstrap, cloud, http, samples
from dicomflow.adapters.local.queue import SqliteTaskQueue
from dicomflow.config import Settings
from dicomflow.ports import QueueName
from dicomflow.services.context import Context
from tests.support.fakes import InlineQueue

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ctx(make_settings: Callable[..., Settings]) -> Context:
    return bootstrap.build(make_settings(), queue=InlineQueue())


def api_client(ctx: Context) -> Any:
    app = flask.Flask("test-api")

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def route(path: str) -> flask.Response:
        return http.batches_api(lambda: ctx, flask.request)

    return app.test_client()


def drain(ctx: Context) -> None:
    queue = ctx.queue
    assert isinstance(queue, InlineQueue)
    queue.drain(ctx)


@pytest.fixture
def archive(tmp_path: Path) -> samples.DemoArchive:
    return samples.make_demo_archive(tmp_path / "dicom", seed=21)


def problem_of(response: Any) -> dict[str, Any]:
    assert response.mimetype == "application/problem+json", response.data
    body: dict[str, Any] = json.loads(response.data)
    assert body["status"] == response.status_code
    return body


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        (b"{not json", "application/json", 400, "body"),
        (b'{"source": "/x"}', "text/plain", 415, None),
        (b"[1, 2]", "application/json", 422, "body"),
        (b'{"destination": "/tmp/out"}', "application/json", 422, "source"),
        (b'{"source": "/tmp/in"}', "application/json", 422, "destination"),
        (b'{"source": "/tmp/in", "destination": "/tmp/out", "colour": 1}', "application/json", 422, "colour"),
        (b'{"source": 5, "destination": "/tmp/out"}', "application/json", 422, "source"),
        (b'{"source": [], "destination": "/tmp/out"}', "application/json", 422, "source"),
        (b'{"source": "relative/path", "destination": "/tmp/out"}', "application/json", 422, "source"),
        (b'{"source": "/tmp/in", "destination": "/tmp/out", "force": "yes"}', "application/json", 422, "force"),
        (b'{"source": "/tmp/in", "destination": "/tmp/out", "options": {"merge_2d": "sometimes"}}',
         "application/json", 422, "options.merge_2d"),
        (b'{"source": "/tmp/in", "destination": "/tmp/out", "options": {"zip": true}}',
         "application/json", 422, "options.zip"),
        (b'{"source": "drive://short", "destination": "/tmp/out"}', "application/json", 422, "source"),
        (b'{"source": "/nonexistent/folder", "destination": "/tmp/out"}', "application/json", 422, "source"),
    ],
)  # fmt: skip
def test_bad_submissions_get_problem_json_naming_the_field(
    ctx: Context, body: bytes, content_type: str, status: int, field: str | None
) -> None:
    response = api_client(ctx).post("/batches", data=body, content_type=content_type)
    assert response.status_code == status
    problem = problem_of(response)
    if field:
        assert problem["field"] == field
    assert ctx.store.list_batches() == []  # nothing partially created


def test_a_batch_over_the_configured_maximum_is_refused(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    ctx = bootstrap.build(make_settings(max_batch_sources=2), queue=InlineQueue())
    folders = [str(tmp_path / f"s{n}") for n in range(3)]
    for folder in folders:
        Path(folder).mkdir()
    response = api_client(ctx).post("/batches", json={"source": folders, "destination": str(tmp_path / "out")})
    assert response.status_code == 422
    problem = problem_of(response)
    assert problem["field"] == "source" and "at most 2" in problem["detail"]
    assert ctx.store.list_batches() == []


def test_submit_answers_202_then_status_shows_the_finished_batch(
    ctx: Context, archive: samples.DemoArchive, tmp_path: Path
) -> None:
    client = api_client(ctx)
    body = {"source": str(archive.root / "sub-01"), "destination": str(tmp_path / "out"), "label": "api"}
    response = client.post("/batches", json=body)
    assert response.status_code == 202
    accepted = response.get_json()
    assert response.headers["Location"] == accepted["status_url"]
    assert accepted["status"] == "expanding" and accepted["created"] is True
    drain(ctx)
    status = client.get(f"/batches/{accepted['batch_id']}").get_json()
    counters = status["counters"]
    assert status["status"] == "completed"
    assert counters["succeeded"] + counters["skipped"] + counters["dead_lettered"] == counters["series_total"] > 0
    assert {i["state"] for i in status["items"]} <= {"succeeded", "skipped"}
    assert status["next_page_token"] == ""
    page = client.get(f"/batches/{accepted['batch_id']}?page_size=2").get_json()
    assert len(page["items"]) == 2 and page["next_page_token"]
    rest = client.get(f"/batches/{accepted['batch_id']}?page_size=500&page_token={page['next_page_token']}").get_json()
    ids = [i["item_id"] for i in page["items"] + rest["items"]]
    assert len(ids) == len(set(ids)) == counters["series_total"]
    listed = client.get("/batches").get_json()["batches"]
    assert [b["batch_id"] for b in listed] == [accepted["batch_id"]]


def test_idempotency_key_returns_the_same_batch_and_rejects_a_different_body(
    ctx: Context, archive: samples.DemoArchive, tmp_path: Path
) -> None:
    client = api_client(ctx)
    body = {"source": str(archive.root / "sub-01"), "destination": str(tmp_path / "out")}
    first = client.post("/batches", json=body, headers={"Idempotency-Key": "k-1"}).get_json()
    again = client.post("/batches", json=body, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 202 and again.get_json()["batch_id"] == first["batch_id"]
    assert again.get_json()["created"] is False
    other = client.post("/batches", json=body | {"label": "x"}, headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 409 and problem_of(other)
    assert len(ctx.store.list_batches()) == 1


def test_unknown_batches_routes_and_methods(ctx: Context) -> None:
    client = api_client(ctx)
    assert problem_of(client.get("/batches/doesnotexist"))["status"] == 404
    assert client.post("/batches/doesnotexist:cancel").status_code == 404
    assert client.post("/batches/doesnotexist:retry-dead-letters").status_code == 404
    assert problem_of(client.get("/nothing-here"))["status"] == 404
    assert problem_of(client.delete("/batches"))["status"] == 405
    assert client.get("/batches?limit=0").status_code == 422
    assert client.get("/batches/abc?state=bogus").status_code in (404, 422)


def test_cancel_skips_waiting_series_and_retry_redrives_dead_letters(
    ctx: Context, archive: samples.DemoArchive, tmp_path: Path
) -> None:
    client = api_client(ctx)
    accepted = client.post(
        "/batches", json={"source": str(archive.root), "destination": str(tmp_path / "out")}
    ).get_json()
    drain(ctx)
    batch_id = accepted["batch_id"]
    status = client.get(f"/batches/{batch_id}").get_json()
    assert status["status"] == "completed_with_failures"
    (failure,) = status["failures"]
    assert failure["failure"]["permanent"] and "dcm2niix" in failure["failure"]["reason"]
    assert client.post(f"/batches/{batch_id}:cancel").status_code == 409  # already finished

    redriven = client.post(f"/batches/{batch_id}:retry-dead-letters")
    assert redriven.status_code == 202 and redriven.get_json()["redriven"] == 1
    drain(ctx)  # still corrupt: dead-lettered again, counted once
    counters = client.get(f"/batches/{batch_id}").get_json()["counters"]
    assert counters["dead_lettered"] == 1
    assert counters["succeeded"] + counters["skipped"] + counters["dead_lettered"] == counters["series_total"]

    second = client.post("/batches", json={"source": str(archive.root), "destination": str(tmp_path / "o2")}).get_json()
    cancelled = client.post(f"/batches/{second['batch_id']}:cancel")
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"
    drain(ctx)  # the expansion task finds the batch cancelled and does nothing
    assert client.get(f"/batches/{second['batch_id']}").get_json()["counters"]["series_total"] == 0


def test_task_edge_reads_cloud_tasks_headers_and_rejects_bad_bodies(ctx: Context) -> None:
    app = flask.Flask("test-worker")

    @app.post("/")
    def convert() -> flask.Response:
        return http.handle_task_request(lambda: ctx, QueueName.CONVERT, flask.request)

    client = app.test_client()
    assert client.post("/", data=b"{", content_type="application/json").status_code == 400
    assert client.post("/", data=b"{}", content_type="text/plain").status_code == 415
    bad = client.post("/", json={"batch_id": "b", "item_id": 3})
    assert bad.status_code == 422 and problem_of(bad)["field"] == "item_id"
    missing = client.post("/", json={"batch_id": "nope", "item_id": "nope"},
                          headers={"X-CloudTasks-TaskRetryCount": "2"})  # fmt: skip
    assert missing.status_code == 404


@pytest.fixture
def functions_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("DICOMFLOW_MODE", "local")
    monkeypatch.setenv("DICOMFLOW_STATE_PATH", str(tmp_path / "state.sqlite"))
    cloud.context.cache_clear()
    yield
    cloud.context.cache_clear()


def _load_worker_app() -> flask.Flask:
    spec = importlib.util.spec_from_file_location("dicomflow_worker_entry", REPO / "container" / "worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app: flask.Flask = module.app
    return app


@pytest.mark.usefixtures("functions_env")
def test_the_real_entry_points_run_a_batch_like_cloud_tasks_would(archive: samples.DemoArchive, tmp_path: Path) -> None:
    source = str(REPO / "functions" / "main.py")
    clients = {
        QueueName.EXPAND: functions_framework.create_app(target="expand_task", source=source).test_client(),
        QueueName.DEAD_LETTER: functions_framework.create_app(target="dead_letter_task", source=source).test_client(),
        QueueName.CONVERT: _load_worker_app().test_client(),
    }
    api = functions_framework.create_app(target="batches_api", source=source).test_client()
    response = api.post("/batches", json={"source": str(archive.root), "destination": str(tmp_path / "o")})
    assert response.status_code == 202
    batch_id = response.get_json()["batch_id"]

    # Deliver every queued task to its entry point over HTTP, with Cloud Tasks' headers, until none is left.
    tasks = SqliteTaskQueue(tmp_path / "state.sqlite")
    delivered = 0
    while leased := tasks.lease_due(10):
        for task in leased:
            answer = clients[task.queue].post("/", json=task.payload, headers={
                "X-CloudTasks-TaskRetryCount": str(task.retry_count), "X-CloudTasks-TaskName": task.task_id,
                "X-CloudTasks-QueueName": task.queue.value})  # fmt: skip
            assert answer.status_code == 200, answer.data
            tasks.ack(task.task_id)
            delivered += 1
    status = api.get(f"/batches/{batch_id}").get_json()
    counters = status["counters"]
    assert status["status"] == "completed_with_failures"
    assert counters["succeeded"] == len(archive.with_outcome("convert"))
    assert counters["dead_lettered"] == 1 and len(status["failures"]) == 1
    assert delivered > counters["series_total"]  # expansion steps + one convert each + one dead-letter
    assert api.get("/openapi.json").get_json()["openapi"].startswith("3.")
    reconcile = functions_framework.create_app(target="reconcile", source=source).test_client()
    assert reconcile.post("/", json={}).get_json() == {
        "requeued": 0, "dead_lettered": 0, "still_queued": 0, "cancelled": 0, "expansions_restarted": 0,
        "batches_settled": 0, "finishes_requeued": 0,
    }  # fmt: skip
    tasks.close()
