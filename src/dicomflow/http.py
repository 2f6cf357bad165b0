"""The HTTP edge: request parsing, error → status mapping, problem+json answers.

Used by the Cloud Functions (functions/main.py) and the Cloud Run worker (container/worker.py), which
are a few lines each. Every error answer is RFC 9457 `application/problem+json` with the offending
`field` when there is one; nothing partially created is left without a state that says so.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flask import Request, Response
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import BaseConverter, Map, Rule

from dicomflow.config import Mode, Settings
from dicomflow.domain.access import Caller, can_see
from dicomflow.domain.failures import (
    AccessDenied,
    Conflict,
    DestinationConflict,
    DestinationNotWritable,
    DicomflowError,
    Forbidden,
    InvalidInput,
    NotFound,
    QuotaExceeded,
    SourceNotFound,
    StorageQuotaExceeded,
    Unauthenticated,
)
from dicomflow.domain.layout import layout_from_json
from dicomflow.domain.locations import Location, LocationKind, parse_location
from dicomflow.domain.model import Item, ItemState
from dicomflow.domain.paths import display
from dicomflow.domain.series import ConversionOptions
from dicomflow.ports import Attempt, QueueName
from dicomflow.services import access
from dicomflow.services.batches import cancel_batch
from dicomflow.services.context import Context
from dicomflow.services.dead_letter import retry_dead_letters
from dicomflow.services.drive_changes import (
    add_watch,
    channel_summary,
    handle_webhook,
    remove_watch,
    renew_channels,
)
from dicomflow.services.progress import batch_view
from dicomflow.services.reconcile import reconcile
from dicomflow.services.submit import BatchRequest, submit
from dicomflow.services.tasks import handle_task

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
MAX_BODY_BYTES = 1024 * 1024
MAX_IDEMPOTENCY_KEY = 255
_BATCH_FIELDS = {"source", "destination", "options", "label", "force", "layout"}
_OPTION_FIELDS = {"compress", "merge_2d"}
ContextProvider = Callable[[], Context]


# --- responses --------------------------------------------------------------------------------------


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status=status, mimetype="application/json",
                    headers=dict(headers or {}))  # fmt: skip


def problem(
    status: int, title: str, detail: str = "", *, field: str = "", headers: Mapping[str, str] | None = None
) -> Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if field:
        body["field"] = field
        body["errors"] = [{"field": field, "detail": detail or title}]
    return Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON, headers=dict(headers or {}))


_STATUS_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def _access_error(exc: DicomflowError) -> Response | None:
    if isinstance(exc, Unauthenticated):
        # RFC 6750 §3: a 401 names the scheme; `invalid_token` when a token was sent and refused.
        challenge = 'Bearer realm="dicomflow"' + (', error="invalid_token"' if "not valid" in exc.reason else "")
        return problem(401, "Unauthorized", exc.reason, headers={"WWW-Authenticate": challenge})
    if isinstance(exc, Forbidden):
        return problem(403, "Forbidden", exc.reason, field=exc.field)
    if isinstance(exc, QuotaExceeded):
        return problem(429, "Too Many Requests", exc.reason)
    return None


def error_response(exc: DicomflowError) -> Response:
    """Map the failure taxonomy to HTTP: who the caller is and what they may do (401/403/429), the
    caller's input (4xx) versus a passing outage (503)."""
    denied = _access_error(exc)
    if denied is not None:
        return denied
    if isinstance(exc, InvalidInput):
        return problem(422, "Invalid request", exc.reason, field=exc.field)
    if isinstance(exc, NotFound):
        return problem(404, "Not Found", exc.reason)
    if isinstance(exc, Conflict):
        return problem(409, "Conflict", exc.reason)
    if isinstance(exc, SourceNotFound | AccessDenied):
        return problem(422, "Source not usable", exc.reason, field="source")
    if isinstance(exc, DestinationNotWritable | StorageQuotaExceeded | DestinationConflict):
        return problem(422, "Destination not usable", exc.reason, field="destination")
    if not exc.permanent:
        return problem(503, "Service Unavailable", exc.reason, headers={"Retry-After": "30"})
    return problem(422, "Request cannot be processed", exc.reason)


# --- request parsing ------------------------------------------------------------------------------------


def read_json(request: Request) -> Any:
    """The request body as JSON, or an InvalidInput/415-style error naming what is wrong."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _HttpError(problem(413, "Payload Too Large", f"the body must be at most {MAX_BODY_BYTES} bytes"))
    if request.mimetype != "application/json":
        raise _HttpError(
            problem(415, "Unsupported Media Type", "send the body as JSON with Content-Type: application/json")
        )
    raw = request.get_data(cache=False)
    if len(raw) > MAX_BODY_BYTES:
        raise _HttpError(problem(413, "Payload Too Large", f"the body must be at most {MAX_BODY_BYTES} bytes"))
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _HttpError(problem(400, "Malformed JSON", f"the body is not valid JSON: {exc}", field="body")) from None


class _HttpError(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _expect(value: Any, kind: type | tuple[type, ...], field: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"must be {what}", field=field)
    return value


def _location(value: Any, field: str, allow_local: bool) -> Location:
    _expect(value, str, field, "a string: drive://FOLDER_ID" + (" or a local path" if allow_local else ""))
    location = parse_location(value, field=field)
    if location.kind is LocationKind.LOCAL:
        if not allow_local:
            raise InvalidInput(
                "must be a Drive folder: drive://FOLDER_ID (local paths only in local mode)", field=field
            )
        if not Path(location.ref).is_absolute():
            raise InvalidInput("a local path must be absolute", field=field)
    return location


def parse_batch_request(body: Any, *, allow_local: bool) -> BatchRequest:
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", field="body")
    unknown = sorted(set(body) - _BATCH_FIELDS)
    if unknown:
        raise InvalidInput(
            f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_BATCH_FIELDS))}", field=unknown[0]
        )
    for required in ("source", "destination"):
        if required not in body:
            raise InvalidInput("is required", field=required)
    source = body["source"]
    sources_raw = source if isinstance(source, list) else [source]
    if not sources_raw:
        raise InvalidInput("must list at least one folder", field="source")
    sources = tuple(_location(s, f"source[{i}]" if isinstance(source, list) else "source", allow_local)
                    for i, s in enumerate(sources_raw))  # fmt: skip
    destination = _location(body["destination"], "destination", allow_local)
    options_raw = _expect(body.get("options", {}), dict, "options", "an object")
    unknown_options = sorted(set(options_raw) - _OPTION_FIELDS)
    if unknown_options:
        raise InvalidInput(f"unknown option {unknown_options[0]!r}", field=f"options.{unknown_options[0]}")
    compress = _expect(options_raw.get("compress", True), bool, "options.compress", "true or false")
    merge = _expect(options_raw.get("merge_2d", "auto"), str, "options.merge_2d", "a string")
    if merge not in ConversionOptions.MERGE_CHOICES:
        raise InvalidInput(f"must be one of {', '.join(ConversionOptions.MERGE_CHOICES)}", field="options.merge_2d")
    label = _expect(body.get("label", ""), str, "label", "a string")
    force = _expect(body.get("force", False), bool, "force", "true or false")
    layout = layout_from_json(body.get("layout"))
    return BatchRequest(
        sources, destination, ConversionOptions(compress=compress, merge_2d=merge), label, force, layout
    )


def dispatch_deadline(settings: Settings, queue: QueueName) -> float:
    """The dispatch deadline this queue's tasks carry (the adapter sets it on each task it creates)."""
    return float(
        {
            QueueName.CONVERT: settings.dispatch_deadline_seconds,
            QueueName.EXPAND: settings.expand_dispatch_deadline_seconds,
            QueueName.DEAD_LETTER: settings.dead_letter_dispatch_deadline_seconds,
            QueueName.CHANGES: settings.changes_dispatch_deadline_seconds,
        }[queue]
    )


def task_attempt(request: Request, *, received_at: float | None = None, deadline: float | None = None) -> Attempt:
    """What Cloud Tasks tells the handler about this delivery (GCP_FACTS §4 'Headers delivered'), and
    when the handler must have answered: the dispatch deadline counts from the request's arrival."""
    raw = request.headers.get("X-CloudTasks-TaskRetryCount", "0")
    try:
        retry_count = max(0, int(raw))
    except ValueError:
        retry_count = 0
    return Attempt(
        retry_count=retry_count,
        task_id=request.headers.get("X-CloudTasks-TaskName", ""),
        queue=request.headers.get("X-CloudTasks-QueueName", ""),
        deadline_at=None if received_at is None or deadline is None else received_at + deadline,
    )


# --- handlers ---------------------------------------------------------------------------------------------


def handle_task_request(provider: ContextProvider, queue: QueueName, request: Request) -> Response:
    """A Cloud Tasks delivery: 2xx when done (or a no-op duplicate), 503 when the queue should retry,
    4xx problem+json for a body that can never be processed."""
    if request.method != "POST":
        return problem(405, "Method Not Allowed", "tasks are delivered with POST")
    try:
        ctx = provider()
        # Beside IAM (only the tasks service account may invoke): the OIDC token Cloud Tasks attaches must
        # be valid and be that account's, or the delivery is refused before its body is even read.
        ctx.authenticator.task_sender(request.headers.get("Authorization"))
    except DicomflowError as exc:
        return error_response(exc)
    try:
        payload = read_json(request)
    except _HttpError as exc:
        return exc.response
    try:
        attempt = task_attempt(request, received_at=ctx.clock(), deadline=dispatch_deadline(ctx.settings, queue))
        result = handle_task(ctx, queue, payload, attempt)
    except DicomflowError as exc:
        return error_response(exc)
    if result.error is not None:
        return error_response(result.error)
    if not result.ack:
        return json_response(result.body, status=503)
    return json_response(result.body)


_BATCH_ID = r"[A-Za-z0-9_-]{1,64}"


class _BatchIdConverter(BaseConverter):
    regex = _BATCH_ID


_ROUTES = Map(
    [
        Rule("/batches", methods=["POST"], endpoint="submit"),
        Rule("/batches", methods=["GET"], endpoint="list"),
        Rule("/batches/<batch_id:batch_id>", methods=["GET"], endpoint="get"),
        Rule("/batches/<batch_id:batch_id>:retry-dead-letters", methods=["POST"], endpoint="retry"),
        Rule("/batches/<batch_id:batch_id>:cancel", methods=["POST"], endpoint="cancel"),
        Rule("/watches", methods=["POST"], endpoint="watch_add"),
        Rule("/watches", methods=["GET"], endpoint="watch_list"),
        Rule("/watches/<batch_id:channel_id>:stop", methods=["POST"], endpoint="watch_stop"),
        Rule("/openapi.json", methods=["GET"], endpoint="openapi"),
        Rule("/healthz", methods=["GET"], endpoint="health"),
    ],
    converters={"batch_id": _BatchIdConverter},
    strict_slashes=False,
)


def batches_api(provider: ContextProvider, request: Request) -> Response:
    """The batch API (DESIGN.md §6), routed inside one function."""
    adapter = _ROUTES.bind("localhost", path_info=request.path, url_scheme="http")
    try:
        endpoint, args = adapter.match(method=request.method)
    except MethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.valid_methods or ()))
        return problem(405, "Method Not Allowed", f"use {allowed}", headers={"Allow": allowed})
    except RouteNotFound:
        return problem(404, "Not Found", f"no such resource: {request.path}")
    except HTTPException as exc:  # pragma: no cover - other routing errors
        return problem(exc.code or 400, _STATUS_TITLES.get(exc.code or 400, "Error"), exc.description or "")
    try:
        return _dispatch(provider, endpoint, args, request)
    except _HttpError as exc:
        return exc.response
    except DicomflowError as exc:
        return error_response(exc)


def _dispatch(provider: ContextProvider, endpoint: str, args: Mapping[str, Any], request: Request) -> Response:
    if endpoint == "openapi":
        from dicomflow.openapi import document  # noqa: PLC0415 - built only when asked for

        return json_response(document())
    if endpoint == "health":
        return json_response({"status": "ok"})
    ctx = provider()
    caller = ctx.authenticator.caller(request.headers.get("Authorization"))
    if endpoint.startswith("watch_"):
        return _watches(ctx, caller, endpoint, args, request)
    if endpoint == "submit":
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isprintable()):
            raise InvalidInput(f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters", field="Idempotency-Key")
        allow_local = ctx.settings.mode is Mode.LOCAL or ctx.settings.allow_local_paths
        batch_request = parse_batch_request(read_json(request), allow_local=allow_local)
        # Authorization before anything touches the folders: a refusal names no file (issue 11).
        access.check_locations(ctx, caller, _location_fields(batch_request))
        access.check_unfinished(ctx, caller)
        result = submit(ctx, batch_request, key, owner=caller.owner)
        url = status_url(ctx, request, result.batch.batch_id)
        body = {"batch_id": result.batch.batch_id, "status": result.batch.status.value, "status_url": url,
                "created": result.created}  # fmt: skip
        return json_response(body, status=202, headers={"Location": url})
    if endpoint == "list":
        limit = _int_param(request, "limit", 20, 1, 100)
        return json_response({"batches": [_batch_json(b) for b in access.visible_batches(ctx, caller, limit)]})
    batch_id = args["batch_id"]
    # Someone else's batch is answered exactly like a batch that does not exist.
    if endpoint == "get":
        status = _status_json(ctx, request, batch_id)  # checked on the batch it read: no second read
        if not can_see(caller, str(status["owner"])):
            raise access.not_found(batch_id)
        return json_response(status)
    access.visible_batch(ctx, caller, batch_id, counted=False)
    if endpoint == "retry":
        batch, count = retry_dead_letters(ctx, batch_id)
        # Accepted: a redrive task moves the series back into the queue (GET the batch to follow it).
        return json_response(
            {"batch_id": batch_id, "redriven": count, "status_url": status_url(ctx, request, batch_id)}, status=202
        )
    batch = cancel_batch(ctx, batch_id)
    return json_response(_batch_json(batch), status=202)


def _location_fields(batch_request: BatchRequest) -> list[tuple[str, Location]]:
    sources = batch_request.sources
    named = [("source", sources[0])] if len(sources) == 1 else [(f"source[{i}]", s) for i, s in enumerate(sources)]
    return [*named, ("destination", batch_request.destination)]


_WATCH_FIELDS = {"folder", "destination", "options", "label", "layout"}


def _watches(ctx: Context, caller: Caller, endpoint: str, args: Mapping[str, Any], request: Request) -> Response:
    """Drive watches through the API: opened and stopped by their owner, under the same folder rules."""
    if endpoint == "watch_list":
        channels = [c for c in ctx.store.list_channels() if can_see(caller, c.owner)]
        return json_response({"watches": [channel_summary(c) for c in channels]})
    if endpoint == "watch_stop":
        channel = access.visible_channel(ctx, caller, args["channel_id"])
        return json_response(channel_summary(remove_watch(ctx, channel.channel_id)))
    body = read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", field="body")
    unknown = sorted(set(body) - _WATCH_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_WATCH_FIELDS))}",
                           field=unknown[0])  # fmt: skip
    for required in ("folder", "destination"):
        if required not in body:
            raise InvalidInput("is required", field=required)
    folder = _location(body["folder"], "folder", allow_local=False)
    destination = _location(body["destination"], "destination", allow_local=False)
    options = parse_batch_request(
        {"source": folder.uri, "destination": destination.uri, "options": body.get("options", {})}, allow_local=False
    ).options
    label = _expect(body.get("label", ""), str, "label", "a string")
    layout = layout_from_json(body.get("layout"))
    access.check_locations(ctx, caller, [("folder", folder), ("destination", destination)])
    channel = add_watch(ctx, folder, destination, options, label, owner=caller.owner, layout=layout)
    return json_response(channel_summary(channel), status=201)


def status_url(ctx: Context, request: Request, batch_id: str) -> str:
    base = ctx.settings.public_url.rstrip("/") or request.host_url.rstrip("/")
    return f"{base}/batches/{batch_id}"


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,6}", raw) or not low <= int(raw) <= high:
        raise InvalidInput(f"must be an integer from {low} to {high}", field=name)
    return int(raw)


def _batch_json(batch: Any) -> dict[str, Any]:
    return {
        "batch_id": batch.batch_id,
        "status": batch.status.value,
        "label": batch.label,
        "source": [s.uri for s in batch.sources],
        "destination": batch.destination.uri,
        "options": batch.options.to_dict(),
        "force": batch.force,
        "created_at": batch.created_at,
        "expanded_at": batch.expanded_at,
        "finished_at": batch.finished_at,
        "counters": batch.counters.to_dict(),
        "files_seen": batch.files_seen,
        "files_ignored": batch.files_ignored,
        "failure": batch.failure.to_dict() if batch.failure else None,
        "owner": batch.owner,
        "layout": batch.layout.summary(),
        # Final, and its report (and BIDS dataset) not written yet: a client waiting for the outputs waits on.
        "finishing": batch.finish_pending,
        "report_ref": batch.report_ref,
    }


def item_json(item: Item) -> dict[str, Any]:
    return {
        "item_id": item.item_id,
        "state": item.state.value,
        "series_number": item.series_number,
        "modality": item.modality,
        "description": item.description,
        "folder": display(item.rel_dir),
        "files": item.file_count,
        "bytes": item.bytes_total,
        "attempts": item.attempts,
        "timings": item.timings.to_dict(),
        "outputs": [asdict(o) for o in item.outputs],
        "warnings": list(item.warnings),
        "incomplete": item.incomplete,
        "failure": item.failure.to_dict() if item.failure else None,
        "skip_reason": item.skip_reason,
    }


def _status_json(ctx: Context, request: Request, batch_id: str) -> dict[str, Any]:
    page_size = _int_param(request, "page_size", 50, 1, 500)
    page_token = request.args.get("page_token", "")
    if page_token and not re.fullmatch(r"[0-9a-f]{1,64}", page_token):
        raise InvalidInput("is not a page token returned by this API", field="page_token")
    state = request.args.get("state")
    states = None
    if state is not None:
        try:
            states = frozenset({ItemState(state)})
        except ValueError:
            raise InvalidInput(f"must be one of {', '.join(s.value for s in ItemState)}", field="state") from None
    view = batch_view(ctx, batch_id, page_after=page_token, page_size=page_size, states=states)
    return _batch_json(view.batch) | {
        "status_url": status_url(ctx, request, batch_id),
        "eta_seconds": view.eta_seconds,
        "failures": [item_json(i) for i in view.failures],
        "items": [item_json(i) for i in view.items],
        "next_page_token": view.next_page,
    }


def _scheduled_job(provider: ContextProvider, request: Request, job: Callable[[Context], Any]) -> Response:
    """A Cloud Scheduler call: run the job, answer its report as JSON."""
    if request.method != "POST":
        return problem(405, "Method Not Allowed", "use POST")
    try:
        report = job(provider())
    except DicomflowError as exc:
        return error_response(exc)
    return json_response(asdict(report))


def reconcile_request(provider: ContextProvider, request: Request) -> Response:
    """Every 10 minutes: finish what crashed workers left behind, report what was done."""
    return _scheduled_job(provider, request, reconcile)


def drive_webhook(provider: ContextProvider, request: Request) -> Response:
    """Drive push notifications: 200 fast (the work happens in a task), 403 for a wrong token or an
    unknown channel; never an error that would make Drive retry a refused notification."""
    if request.method != "POST":
        return problem(405, "Method Not Allowed", "notifications are POSTed")
    try:
        status = handle_webhook(provider(), dict(request.headers))
    except DicomflowError as exc:
        return error_response(exc)  # e.g. the state store is down: 503, and Drive retries (GCP_FACTS §2)
    if status == 403:
        return problem(403, "Forbidden", "unknown channel or wrong token")
    return Response(status=200)


def renew_channels_request(provider: ContextProvider, request: Request) -> Response:
    """Daily: renew Drive watch channels; also submit folders that went quiet."""
    return _scheduled_job(provider, request, renew_channels)
