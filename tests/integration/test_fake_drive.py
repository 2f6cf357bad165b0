"""The fake Drive server behaves as documented in docs/GCP_FACTS.md, driven by the real googleapiclient."""

from __future__ import annotations

import email.utils
import gc
import hashlib
import http.client
import io
import json
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaIoBaseDownload, MediaIoBaseUpload

from tests.fakes.drive_server import (
    FOLDER_MIME,
    UPLOAD_CHUNK_GRANULARITY,
    FakeDrive,
    build_drive_client,
)

pytestmark = pytest.mark.integration

KIB = 1024


# ----------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------


class WebhookReceiver:
    """A tiny HTTP server standing in for our push-notification endpoint."""

    def __init__(self) -> None:
        self.statuses: list[int] = []  # scripted answers, consumed in order; then 200
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.received.append(
                        {
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "status": status,
                            "path": self.path,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/drive-hook"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def headers(self) -> list[dict[str, str]]:
        with self._lock:
            return [r["headers"] for r in self.received]

    def states(self) -> list[str]:
        return [h["x-goog-resource-state"] for h in self.headers()]

    def numbers(self) -> list[int]:
        return [int(h["x-goog-message-number"]) for h in self.headers()]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def fake() -> Iterator[FakeDrive]:
    with FakeDrive(seed=7) as server:
        yield server
        assert server.server_errors == []


@pytest.fixture
def drive(fake: FakeDrive) -> Iterator[Any]:
    client = build_drive_client(fake.base_url)
    yield client
    client.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.close()


def no_sleep(request: Any) -> Any:
    """Stub the client's retry sleep (random() * 2**n seconds; FACTS gotcha 5)."""
    request._sleep = lambda _seconds: None
    return request


def raw_request(fake: FakeDrive, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A request the generated client refuses to send (e.g. missing required parameters)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(fake.base_url.rsplit(":", 1)[1].strip("/")), timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def md5_hex(data: bytes) -> str:
    """Drive's md5Checksum of ``data``."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def reason_of(err: HttpError) -> str:
    details = err.error_details
    assert isinstance(details, list), details
    return str(details[0]["reason"])


# ----------------------------------------------------------------------------------------------------
# files.list
# ----------------------------------------------------------------------------------------------------


def test_list_paginates_through_short_and_empty_pages(fake: FakeDrive, drive: Any) -> None:
    folder = fake.add_folder("series")
    other = fake.add_folder("other")
    wanted = {fake.add_file(f"img{i:02d}.dcm", folder, bytes([i]) * (i + 1)) for i in range(7)}
    fake.trash(fake.add_file("old.dcm", folder, b"old"))
    fake.add_file("elsewhere.dcm", other, b"e")
    fake.short_pages = True

    request = drive.files().list(
        q=f"'{folder}' in parents and trashed = false", pageSize=4, fields="nextPageToken, files(id, name)"
    )
    seen: list[str] = []
    page_lengths: list[int] = []
    while request is not None:
        response = request.execute()
        page_lengths.append(len(response["files"]))
        seen.extend(f["id"] for f in response["files"])
        request = drive.files().list_next(request, response)

    assert sorted(seen) == sorted(wanted)  # each file exactly once
    assert page_lengths[0] == 0  # an empty first page that still carries nextPageToken
    assert 0 in page_lengths and max(page_lengths) < 4


def test_list_includes_trashed_files_unless_excluded(fake: FakeDrive, drive: Any) -> None:
    folder = fake.add_folder("f")
    keep = fake.add_file("keep.dcm", folder, b"k")
    gone = fake.add_file("gone.dcm", folder, b"g")
    fake.trash(gone)

    everything = drive.files().list(q=f"'{folder}' in parents").execute()["files"]
    live = drive.files().list(q=f"'{folder}' in parents and trashed = false").execute()["files"]
    binned = drive.files().list(q=f"'{folder}' in parents and trashed = true").execute()["files"]

    assert {f["id"] for f in everything} == {keep, gone}
    assert [f["id"] for f in live] == [keep]
    assert [f["id"] for f in binned] == [gone]


def test_list_default_fields_versus_explicit_fields(fake: FakeDrive, drive: Any) -> None:
    folder = fake.add_folder("f")
    fake.add_folder("sub", folder)
    fid = fake.add_file("a.dcm", folder, b"abc")
    q = f"'{folder}' in parents"

    default = drive.files().list(q=q).execute()
    assert set(default) == {"kind", "incompleteSearch", "files"}
    assert all(set(f) == {"kind", "id", "name", "mimeType"} for f in default["files"])

    explicit = (
        drive.files().list(q=q, fields="nextPageToken, files(id,name,mimeType,size,md5Checksum,parents)").execute()
    )
    by_name = {f["name"]: f for f in explicit["files"]}
    assert by_name["a.dcm"]["size"] == "3"  # int64 as a JSON string
    assert by_name["a.dcm"]["md5Checksum"] == md5_hex(b"abc")
    assert by_name["a.dcm"]["parents"] == [folder]
    assert "size" not in by_name["sub"] and "md5Checksum" not in by_name["sub"]

    assert set(drive.files().get(fileId=fid).execute()) == {"kind", "id", "name", "mimeType"}
    got = drive.files().get(fileId=fid, fields="id,size,md5Checksum,headRevisionId").execute()
    assert set(got) == {"id", "size", "md5Checksum", "headRevisionId"}

    with pytest.raises(HttpError) as excinfo:
        drive.files().get(fileId=fid, fields="id,md5checksum").execute()  # typo → Drive says 400
    assert excinfo.value.status_code == 400


def test_list_rejects_bad_queries_and_page_tokens(fake: FakeDrive, drive: Any) -> None:
    for q in ("title = 'x'", "name = x", "name = 'a' and", "'root' in owners"):
        with pytest.raises(HttpError) as excinfo:
            drive.files().list(q=q).execute()
        assert excinfo.value.status_code == 400
        assert excinfo.value.error_details[0]["location"] == "q"

    with pytest.raises(HttpError) as excinfo:
        drive.files().list(pageToken="not-a-token").execute()
    assert excinfo.value.status_code == 400
    assert reason_of(excinfo.value) == "invalid"


def test_query_names_with_quotes_backslashes_and_app_properties(fake: FakeDrive, drive: Any) -> None:
    folder = fake.add_folder("f")
    name = "Valentine's Day \\ scan.dcm"
    fid = fake.add_file(name, folder, b"v")
    fake.add_file("Valentine", folder, b"w")
    tagged = fake.add_file("p.dcm", folder, b"p", app_properties={"series": "1.2.840.1"})
    fake.add_folder("subfolder", folder)

    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    found = drive.files().list(q=f"name = '{escaped}' and '{folder}' in parents").execute()["files"]
    assert [f["id"] for f in found] == [fid]

    with pytest.raises(HttpError) as excinfo:
        drive.files().list(q=f"name = '{name}'").execute()  # unescaped quote: invalid query
    assert excinfo.value.status_code == 400

    by_prop = (
        drive.files()
        .list(q="appProperties has { key='series' and value='1.2.840.1' } and trashed = false")
        .execute()["files"]
    )
    assert [f["id"] for f in by_prop] == [tagged]

    not_folders = (
        drive.files()
        .list(q=f"'{folder}' in parents and mimeType != '{FOLDER_MIME}'", fields="files(mimeType)")
        .execute()["files"]
    )
    assert len(not_folders) == 3 and all(f["mimeType"] != FOLDER_MIME for f in not_folders)


def test_long_queries_travel_as_post_override_and_generated_ids_are_usable(fake: FakeDrive, drive: Any) -> None:
    folder = fake.add_folder("f")
    names = [f"series-{i:03d}-with-a-long-name.dcm" for i in range(60)]
    for name in names[:3]:
        fake.add_file(name, folder, b"d")
    q = f"'{folder}' in parents and (" + " or ".join(f"name = '{n}'" for n in names) + ")"
    assert len(q) > 2048  # the client turns such GETs into POST + X-HTTP-Method-Override
    found = drive.files().list(q=q, fields="files(name)").execute()["files"]
    assert sorted(f["name"] for f in found) == names[:3]
    assert fake.requests[-1].headers.get("x-http-method-override") == "GET"

    (new_id,) = drive.files().generateIds(count=1).execute()["ids"]
    created = drive.files().create(body={"id": new_id, "name": "pre-assigned.dcm"}, fields="id").execute()
    assert created == {"id": new_id}
    with pytest.raises(HttpError) as excinfo:  # an id can be used once
        drive.files().create(body={"id": new_id, "name": "again.dcm"}).execute()
    assert excinfo.value.status_code == 400


# ----------------------------------------------------------------------------------------------------
# downloads
# ----------------------------------------------------------------------------------------------------


def test_media_download_in_ranged_chunks_and_zero_byte_file(fake: FakeDrive, drive: Any) -> None:
    data = bytes(range(256)) * 4
    fid = fake.add_file("scan.dcm", None, data)
    buf = io.BytesIO()
    downloader = MediaIoBaseDownload(buf, drive.files().get_media(fileId=fid), chunksize=300)
    done = False
    while not done:
        _status, done = downloader.next_chunk()
    assert buf.getvalue() == data
    media = [r for r in fake.requests if "alt=media" in r.url]
    assert [r.headers["range"] for r in media] == ["bytes=0-299", "bytes=300-599", "bytes=600-899", "bytes=900-1199"]
    assert {r.status for r in media} == {206}

    empty = fake.add_file("empty.dcm", None, b"")
    buf = io.BytesIO()
    downloader = MediaIoBaseDownload(buf, drive.files().get_media(fileId=empty), chunksize=300)
    _status, done = downloader.next_chunk()
    assert done and buf.getvalue() == b""
    assert [r.status for r in fake.requests if empty in r.path] == [416]

    doc = fake.add_google_doc("notes", None)
    with pytest.raises(HttpError) as excinfo:
        drive.files().get_media(fileId=doc).execute()
    assert excinfo.value.status_code == 403
    assert reason_of(excinfo.value) == "fileNotDownloadable"


# ----------------------------------------------------------------------------------------------------
# uploads
# ----------------------------------------------------------------------------------------------------


def test_resumable_upload_in_256k_chunks(fake: FakeDrive, drive: Any) -> None:
    folder = fake.add_folder("up")
    payload = random.Random(1).randbytes(700 * KIB)
    media = MediaIoBaseUpload(
        io.BytesIO(payload), mimetype="application/dicom", chunksize=UPLOAD_CHUNK_GRANULARITY, resumable=True
    )
    request = drive.files().create(
        body={"name": "big.dcm", "parents": [folder]}, media_body=media, fields="id,md5Checksum,size,parents"
    )
    progress: list[int] = []
    response = None
    while response is None:
        status, response = request.next_chunk()
        if status is not None:
            progress.append(status.resumable_progress)

    assert response["md5Checksum"] == md5_hex(payload)
    assert response["size"] == str(len(payload)) and response["parents"] == [folder]
    assert fake.content(response["id"]) == payload
    assert progress == [262144, 524288]
    (init,) = [r for r in fake.requests if r.method == "POST"]
    assert "uploadType=resumable" in init.url and init.status == 200
    assert init.headers["x-upload-content-length"] == str(len(payload))
    puts = [r for r in fake.requests if r.method == "PUT"]
    assert [r.status for r in puts] == [308, 308, 200]
    assert [r.headers["content-range"] for r in puts] == [
        "bytes 0-262143/716800",
        "bytes 262144-524287/716800",
        "bytes 524288-716799/716800",
    ]


def test_resumable_chunk_not_multiple_of_256k_is_rejected(fake: FakeDrive, drive: Any) -> None:
    media = MediaIoBaseUpload(
        io.BytesIO(b"x" * (300 * KIB)), mimetype="application/dicom", chunksize=100 * KIB, resumable=True
    )
    request = drive.files().create(body={"name": "bad.dcm"}, media_body=media)
    with pytest.raises(HttpError) as excinfo:
        request.next_chunk()
    assert excinfo.value.status_code == 400
    assert fake.find(name="bad.dcm") == []


def test_resumable_upload_resumes_from_server_range_after_5xx(fake: FakeDrive, drive: Any) -> None:
    payload = random.Random(2).randbytes(600 * KIB)
    # The backend stores the first chunk and still answers 503: the client must ask for the status
    # (PUT bytes */N) and continue from the server's Range, not from what it believes it sent.
    fake.faults.add(method="PUT", path_contains="upload_id=", status=503, times=1, after_processing=True)
    media = MediaIoBaseUpload(
        io.BytesIO(payload), mimetype="application/dicom", chunksize=UPLOAD_CHUNK_GRANULARITY, resumable=True
    )
    request = drive.files().create(body={"name": "resumed.dcm"}, media_body=media, fields="id,md5Checksum")
    with pytest.raises(HttpError) as excinfo:
        request.next_chunk()  # num_retries=0: nothing is retried
    assert excinfo.value.status_code == 503
    response = None
    while response is None:
        _status, response = request.next_chunk()

    assert response["md5Checksum"] == md5_hex(payload)
    puts = [(r.headers.get("content-range"), r.status) for r in fake.requests if r.method == "PUT"]
    assert puts == [
        ("bytes 0-262143/614400", 503),
        ("bytes */614400", 308),
        ("bytes 262144-524287/614400", 308),
        ("bytes 524288-614399/614400", 200),
    ]


def test_dropped_chunk_put_is_resent_empty_by_httplib2_and_recovers(fake: FakeDrive, drive: Any) -> None:
    payload = random.Random(3).randbytes(300 * KIB)
    fake.body_timeout_seconds = 0.2
    fake.faults.add(method="PUT", path_contains="upload_id=", drop_connection=True, times=1)
    media = MediaIoBaseUpload(
        io.BytesIO(payload), mimetype="application/dicom", chunksize=UPLOAD_CHUNK_GRANULARITY, resumable=True
    )
    request = drive.files().create(body={"name": "dropped.dcm"}, media_body=media, fields="md5Checksum")
    with pytest.raises(HttpError) as excinfo:
        # httplib2 re-sends once after the drop, but the chunk stream is already consumed: the re-sent
        # PUT announces 262144 bytes and carries none, which the fake answers with 400.
        request.next_chunk()
    assert excinfo.value.status_code == 400
    response = None
    while response is None:
        _status, response = request.next_chunk()

    assert response["md5Checksum"] == md5_hex(payload)
    puts = [(r.headers.get("content-range"), r.status, r.body_size) for r in fake.requests if r.method == "PUT"]
    assert puts == [
        ("bytes 0-262143/307200", None, 262144),
        ("bytes 0-262143/307200", 400, 0),
        ("bytes */307200", 308, 0),  # nothing stored: no Range header, the client restarts at 0
        ("bytes 0-262143/307200", 308, 262144),
        ("bytes 262144-307199/307200", 200, 45056),
    ]


def test_resumable_empty_file_and_unknown_session(fake: FakeDrive, drive: Any) -> None:
    media = MediaIoBaseUpload(io.BytesIO(b""), mimetype="application/dicom", resumable=True)
    request = drive.files().create(body={"name": "empty.dcm"}, media_body=media, fields="id,size,md5Checksum")
    response = None
    while response is None:
        _status, response = request.next_chunk()
    assert response["size"] == "0" and response["md5Checksum"] == md5_hex(b"")
    (put,) = [r for r in fake.requests if r.method == "PUT"]
    assert "content-range" not in put.headers  # the client sends none for empty files

    status, _body = raw_request(
        fake, "PUT", "/upload/drive/v3/files?uploadType=resumable&upload_id=nope", {"Content-Range": "bytes */10"}
    )
    assert status == 404


def test_multipart_upload_and_content_update(fake: FakeDrive, drive: Any) -> None:
    folder = fake.add_folder("f")
    original = b"\r\n--boundary-lookalike\n\x00\xff" * 200
    fields = "id,md5Checksum,size,version,headRevisionId,appProperties,mimeType"
    created = (
        drive.files()
        .create(
            body={"name": "m.dcm", "parents": [folder], "appProperties": {"series": "1.2", "stage": "raw"}},
            media_body=MediaIoBaseUpload(io.BytesIO(original), mimetype="application/dicom"),
            fields=fields,
        )
        .execute()
    )
    assert fake.request_count("POST", "uploadType=multipart") == 1
    assert created["md5Checksum"] == md5_hex(original)
    assert created["mimeType"] == "application/dicom"
    assert fake.content(created["id"]) == original

    replacement = b"new content"
    updated = (
        drive.files()
        .update(
            fileId=created["id"],
            body={"appProperties": {"stage": None, "state": "done"}},
            media_body=MediaIoBaseUpload(io.BytesIO(replacement), mimetype="application/dicom"),
            fields=fields,
        )
        .execute()
    )
    assert fake.request_count("PATCH", "uploadType=multipart") == 1
    assert updated["md5Checksum"] == md5_hex(replacement) and updated["size"] == "11"
    assert int(updated["version"]) > int(created["version"])
    assert updated["headRevisionId"] != created["headRevisionId"]
    assert updated["appProperties"] == {"series": "1.2", "state": "done"}  # null deletes a key

    drive.files().update(
        fileId=created["id"], media_body=MediaIoBaseUpload(io.BytesIO(b"third"), mimetype="application/dicom")
    ).execute()
    assert fake.request_count("PATCH", "uploadType=media") == 1
    assert fake.content(created["id"]) == b"third"

    folder_meta = drive.files().create(body={"name": "dir", "mimeType": FOLDER_MIME}, fields="id,size").execute()
    assert "size" not in folder_meta
    empty = drive.files().create(body={"name": "blank.dcm"}, fields="size,md5Checksum").execute()
    assert empty == {"size": "0", "md5Checksum": md5_hex(b"")}


def test_metadata_update_move_trash_and_delete(fake: FakeDrive, drive: Any) -> None:
    a = fake.add_folder("a")
    b = fake.add_folder("b")
    fid = fake.add_file("x.dcm", a, b"x")

    moved = (
        drive.files()
        .update(fileId=fid, addParents=b, removeParents=a, body={"name": "y.dcm"}, fields="name,parents")
        .execute()
    )
    assert moved == {"name": "y.dcm", "parents": [b]}
    assert fake.path_of(fid) == "b/y.dcm"

    with pytest.raises(HttpError) as excinfo:
        drive.files().update(fileId=fid, body={"parents": [a]}).execute()
    assert (excinfo.value.status_code, reason_of(excinfo.value)) == (403, "fieldNotWritable")
    with pytest.raises(HttpError) as excinfo:
        drive.files().update(fileId=fid, addParents=a).execute()  # a second parent
    assert (excinfo.value.status_code, reason_of(excinfo.value)) == (403, "cannotAddParent")

    drive.files().update(fileId=fid, body={"trashed": True}).execute()
    assert drive.files().list(q=f"'{b}' in parents and trashed = false").execute()["files"] == []
    assert drive.files().get(fileId=fid, fields="trashed").execute() == {"trashed": True}

    drive.files().delete(fileId=fid).execute()
    assert fake.requests[-1].status == 204
    with pytest.raises(HttpError) as excinfo:
        drive.files().get(fileId=fid).execute()
    assert excinfo.value.status_code == 404


# ----------------------------------------------------------------------------------------------------
# errors, retries, permissions
# ----------------------------------------------------------------------------------------------------


def test_rate_limit_403_and_429_are_retried(fake: FakeDrive, drive: Any) -> None:
    fid = fake.add_file("a.dcm", None, b"a")
    fake.faults.add(path_contains=fid, status=403, reason="userRateLimitExceeded", times=1)
    fake.faults.add(path_contains=fid, status=429, times=1)

    response = no_sleep(drive.files().get(fileId=fid, fields="id")).execute(num_retries=3)

    assert response == {"id": fid}
    assert [r.status for r in fake.requests if fid in r.path] == [403, 429, 200]


def test_storage_quota_exceeded_is_not_retried(fake: FakeDrive, drive: Any) -> None:
    fake.service_account_mode = True
    request = no_sleep(
        drive.files().create(
            body={"name": "x.dcm"}, media_body=MediaIoBaseUpload(io.BytesIO(b"abc"), mimetype="application/dicom")
        )
    )
    with pytest.raises(HttpError) as excinfo:
        request.execute(num_retries=3)
    assert (excinfo.value.status_code, reason_of(excinfo.value)) == (403, "storageQuotaExceeded")
    assert fake.request_count("POST", "uploadType=multipart") == 1

    drive.files().create(body={"name": "folders are fine", "mimeType": FOLDER_MIME}).execute()
    shared = fake.add_shared_drive("Team")
    created = (
        drive.files()
        .create(
            body={"name": "x.dcm", "parents": [shared]},
            media_body=MediaIoBaseUpload(io.BytesIO(b"abc"), mimetype="application/dicom"),
            supportsAllDrives=True,
            fields="id,driveId",
        )
        .execute()
    )
    assert created["driveId"] == shared


def test_denied_folders_and_shared_drive_visibility(fake: FakeDrive, drive: Any) -> None:
    secret = fake.add_folder("secret")
    inner = fake.add_file("a.dcm", secret, b"a")
    fake.deny(secret, "notFound")
    with pytest.raises(HttpError) as excinfo:
        drive.files().get(fileId=inner).execute()
    assert excinfo.value.status_code == 404
    assert excinfo.value.error_details[0]["reason"] == "notFound"
    assert drive.files().list(q=f"'{secret}' in parents").execute()["files"] == []

    readonly = fake.add_folder("readonly")
    fake.deny(readonly, "insufficientFilePermissions")
    assert drive.files().get(fileId=readonly, fields="id").execute() == {"id": readonly}
    with pytest.raises(HttpError) as excinfo:
        drive.files().create(body={"name": "n", "mimeType": FOLDER_MIME, "parents": [readonly]}).execute()
    assert (excinfo.value.status_code, reason_of(excinfo.value)) == (403, "insufficientFilePermissions")

    shared = fake.add_shared_drive("Team")
    team_file = fake.add_file("t.dcm", shared, b"t")
    with pytest.raises(HttpError) as excinfo:
        drive.files().get(fileId=team_file).execute()
    assert excinfo.value.status_code == 404
    got = drive.files().get(fileId=team_file, supportsAllDrives=True, fields="driveId").execute()
    assert got == {"driveId": shared}
    assert drive.files().list(q="name = 't.dcm'").execute()["files"] == []
    listed = (
        drive.files()
        .list(q="name = 't.dcm'", includeItemsFromAllDrives=True, supportsAllDrives=True)
        .execute()["files"]
    )
    assert [f["id"] for f in listed] == [team_file]


def test_dropped_connection_is_retried_by_the_client(fake: FakeDrive, drive: Any) -> None:
    fid = fake.add_file("a.dcm", None, b"a")
    # httplib2 silently re-sends once after a dropped connection; the second drop reaches
    # googleapiclient as ConnectionError, which execute(num_retries=...) retries.
    fake.faults.add(method="GET", path_contains=fid, drop_connection=True, times=2)
    assert no_sleep(drive.files().get(fileId=fid, fields="id")).execute(num_retries=3) == {"id": fid}
    assert [r.status for r in fake.requests if fid in r.path] == [None, None, 200]

    fake.faults.add(method="GET", path_contains=fid, drop_connection=True, times=2)
    with pytest.raises(ConnectionError):
        drive.files().get(fileId=fid).execute()  # num_retries defaults to 0


def test_random_fault_mix_is_survivable_with_retries(fake: FakeDrive, drive: Any) -> None:
    ids = [fake.add_file(f"{i}.dcm", None, bytes([i])) for i in range(15)]
    rule = fake.fault_rate(0.3, seed=3)
    for fid in ids:
        assert no_sleep(drive.files().get(fileId=fid, fields="id")).execute(num_retries=8) == {"id": fid}
    assert rule.hits > 0
    assert fake.connections_accepted >= 1


def test_an_answer_cut_mid_body_by_a_clean_close_is_an_incomplete_read_the_client_does_not_retry(
    fake: FakeDrive, drive: Any
) -> None:
    fid = fake.add_file("a.dcm", None, b"x" * 5000)
    fake.faults.add(method="GET", path_contains=fid, network="fin", times=1)
    with pytest.raises(http.client.IncompleteRead):
        no_sleep(drive.files().get(fileId=fid, fields="id,name,size")).execute(num_retries=5)
    drive.close()  # httplib2 keeps the broken socket in its pool; callers must drop it (the adapter does)
    assert fake.requests[-1].fault and fake.requests[-1].status is None
    assert no_sleep(drive.files().get(fileId=fid, fields="id")).execute() == {"id": fid}  # the fault is gone


# httplib2 drops the socket of an answer reset mid-body without closing it (its retry reconnects);
# the leak surfaces as an unraisable ResourceWarning whenever the garbage collector runs. Collected here,
# so it is attributed to this test and not to a later one.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_answer_cut_mid_body_by_a_reset_is_a_connection_reset(fake: FakeDrive, drive: Any) -> None:
    fid = fake.add_file("a.dcm", None, b"x" * 5000)
    fake.faults.add(method="GET", path_contains="alt=media", network="rst", times=3)
    with pytest.raises(ConnectionResetError):
        drive.files().get_media(fileId=fid).execute()
    drive.close()
    gc.collect()


def test_a_stalled_answer_times_the_client_out(fake: FakeDrive) -> None:
    import httplib2

    fid = fake.add_file("a.dcm", None, b"x" * 100)
    fake.stall_seconds = 1.0
    fake.faults.add(method="GET", path_contains=fid, network="stall", times=1)
    client = build_drive_client(fake.base_url)
    client._http.timeout = 0.2  # every socket the client opens from now on
    started = time.monotonic()
    try:
        with pytest.raises((TimeoutError, httplib2.HttpLib2Error, OSError)):
            client.files().get(fileId=fid, fields="id").execute()
        assert time.monotonic() - started < 0.9  # the client gave up; the server was still stalling
    finally:
        client.close()


def test_a_short_read_is_a_valid_shorter_ranged_answer(fake: FakeDrive, drive: Any) -> None:
    data = bytes(range(256)) * 40
    fid = fake.add_file("a.dcm", None, data)
    fake.faults.add(method="GET", path_contains="alt=media", network="short", times=1)
    request = drive.files().get_media(fileId=fid)
    request.headers["Range"] = "bytes=0-4095"
    assert request.execute() == data[:2048]  # half of what was asked, though the file is longer
    request = drive.files().get_media(fileId=fid)
    request.headers["Range"] = "bytes=0-4095"
    assert request.execute() == data[:4096]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see the reset test
def test_the_network_mix_injects_every_kind(fake: FakeDrive) -> None:
    fid = fake.add_file("a.dcm", None, b"x" * 3000)
    fake.stall_seconds = 0.05
    fake.fault_rate(1.0, seed=5, network=True)
    seen: set[str] = set()
    port = int(fake.base_url.rsplit(":", 1)[1].strip("/"))
    for _ in range(60):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", f"/drive/v3/files/{fid}?alt=media", headers={"Range": "bytes=0-999"})
            response = conn.getresponse()
            body = response.read()
            seen.add("short" if response.status == 206 and len(body) < 1000 else str(response.status))
        except http.client.IncompleteRead:
            seen.add("fin")
        except http.client.RemoteDisconnected:  # a ConnectionResetError too: test it first
            seen.add("dropped or stalled")
        except ConnectionResetError:
            seen.add("rst")
        finally:
            conn.close()
    gc.collect()
    assert {"short", "fin", "rst", "dropped or stalled", "429", "503"} <= seen


def test_keep_alive_reuses_one_connection(fake: FakeDrive, drive: Any) -> None:
    fid = fake.add_file("a.dcm", None, b"a")
    for _ in range(5):
        drive.files().get(fileId=fid).execute()
    assert fake.connections_accepted == 1


# ----------------------------------------------------------------------------------------------------
# changes
# ----------------------------------------------------------------------------------------------------


def test_changes_pages_removed_entries_and_new_start_token(fake: FakeDrive, drive: Any) -> None:
    start = drive.changes().getStartPageToken().execute()
    assert start["kind"] == "drive#startPageToken"
    folder = fake.add_folder("in")
    ids = [fake.add_file(f"{i}.dcm", folder, bytes([i])) for i in range(4)]
    fake.delete(ids[0])
    fake.rename(ids[1], "renamed.dcm")

    pages: list[dict[str, Any]] = []
    token = start["startPageToken"]
    fields = "nextPageToken,newStartPageToken,changes(kind,changeType,fileId,removed,time,file(id,name))"
    while True:
        page = drive.changes().list(pageToken=token, pageSize=2, fields=fields).execute()
        pages.append(page)
        if "nextPageToken" in page:
            assert "newStartPageToken" not in page
            token = page["nextPageToken"]
        else:
            break
    assert "newStartPageToken" in pages[-1] and len(pages) == 3
    changes = [c for page in pages for c in page["changes"]]
    by_id = {c["fileId"]: c for c in changes}
    assert len(changes) == len(by_id) == 5  # one entry per file, at its latest state
    assert by_id[ids[0]]["removed"] is True and "file" not in by_id[ids[0]]
    assert by_id[ids[1]]["file"]["name"] == "renamed.dcm"
    assert all(c["kind"] == "drive#change" and c["changeType"] == "file" for c in changes)

    without_removed = drive.changes().list(pageToken=start["startPageToken"], includeRemoved=False).execute()
    assert ids[0] not in {c["fileId"] for c in without_removed["changes"]}

    new_start = pages[-1]["newStartPageToken"]
    idle = drive.changes().list(pageToken=new_start).execute()
    assert idle["changes"] == [] and idle["newStartPageToken"] == new_start

    status, body = raw_request(fake, "GET", "/drive/v3/changes?alt=json")
    assert status == 400 and json.loads(body)["error"]["errors"][0]["location"] == "pageToken"


# ----------------------------------------------------------------------------------------------------
# push notifications
# ----------------------------------------------------------------------------------------------------


def watch_changes(drive: Any, address: str, channel_id: str = "chan-1", **body: Any) -> dict[str, Any]:
    token = drive.changes().getStartPageToken().execute()["startPageToken"]
    request_body = {"id": channel_id, "type": "web_hook", "address": address, **body}
    return dict(drive.changes().watch(pageToken=token, body=request_body).execute())


def test_changes_watch_sends_sync_then_change_notifications(
    fake: FakeDrive, drive: Any, receiver: WebhookReceiver
) -> None:
    before_ms = time.time() * 1000
    channel = watch_changes(drive, receiver.url, token="secret-token")
    assert channel["kind"] == "api#channel" and channel["id"] == "chan-1"
    assert channel["token"] == "secret-token"
    assert isinstance(channel["expiration"], str)
    assert abs(int(channel["expiration"]) - (before_ms + 3600 * 1000)) < 5000  # default lifetime 1 h
    assert fake.wait_idle()

    (sync,) = receiver.received
    headers = sync["headers"]
    assert headers["x-goog-resource-state"] == "sync"
    assert headers["x-goog-message-number"] == "1"
    assert headers["x-goog-channel-id"] == "chan-1"
    assert headers["x-goog-resource-id"] == channel["resourceId"]
    assert headers["x-goog-resource-uri"] == channel["resourceUri"]
    assert headers["x-goog-channel-token"] == "secret-token"
    expires = email.utils.parsedate_to_datetime(headers["x-goog-channel-expiration"])
    assert abs(expires.timestamp() * 1000 - int(channel["expiration"])) < 1000
    assert headers["user-agent"].startswith("APIs-Google")
    assert sync["body"] == b""

    fake.add_file("new.dcm", None, b"n")
    drive.files().create(body={"name": "f", "mimeType": FOLDER_MIME}).execute()
    assert fake.wait_idle()

    assert receiver.states() == ["sync", "change", "change"]
    numbers = receiver.numbers()
    assert numbers[0] < numbers[1] < numbers[2]
    assert numbers[1] > 2 and numbers[2] - numbers[1] > 1  # increasing but not sequential


def test_notification_retries_5xx_and_drops_other_failures(
    fake: FakeDrive, drive: Any, receiver: WebhookReceiver
) -> None:
    receiver.statuses = [500, 503, 200]
    watch_changes(drive, receiver.url)
    assert fake.wait_idle()
    assert [(d.message_number, d.status) for d in fake.deliveries] == [(1, 500), (1, 503), (1, 200)]

    receiver.statuses = [400]
    fake.add_file("a.dcm", None, b"a")
    assert fake.wait_idle()
    later = [d for d in fake.deliveries if d.message_number > 1]
    assert [d.status for d in later] == [400]  # not retried


def test_channels_stop_ends_deliveries(fake: FakeDrive, drive: Any, receiver: WebhookReceiver) -> None:
    channel = watch_changes(drive, receiver.url)
    assert fake.wait_idle()
    drive.channels().stop(body={"id": channel["id"], "resourceId": channel["resourceId"]}).execute()
    assert fake.requests[-1].status == 204

    fake.add_file("a.dcm", None, b"a")
    assert fake.wait_idle()
    assert receiver.states() == ["sync"]

    with pytest.raises(HttpError) as excinfo:
        drive.channels().stop(body={"id": channel["id"], "resourceId": channel["resourceId"]}).execute()
    assert excinfo.value.status_code == 404


def test_channel_lifetimes_and_expiry_use_the_injected_clock(
    fake: FakeDrive, drive: Any, receiver: WebhookReceiver
) -> None:
    now = [1_700_000_000.0]
    fake.clock = lambda: now[0]
    now_ms = int(now[0] * 1000)

    short = watch_changes(drive, receiver.url, "short", expiration=str(now_ms + 10_000))
    assert short["expiration"] == str(now_ms + 10_000)
    week = watch_changes(drive, receiver.url, "week", expiration=str(now_ms + 30 * 86_400_000))
    assert week["expiration"] == str(now_ms + 604_800_000)  # changes channels: at most one week
    fid = fake.add_file("w.dcm", None, b"w")
    day = (
        drive.files()
        .watch(
            fileId=fid,
            body={
                "id": "file-chan",
                "type": "web_hook",
                "address": receiver.url,
                "expiration": now_ms + 2 * 86_400_000,
            },
        )
        .execute()
    )
    assert day["expiration"] == str(now_ms + 86_400_000)  # files channels: at most one day

    with pytest.raises(HttpError) as excinfo:  # seconds instead of milliseconds
        watch_changes(drive, receiver.url, "bug", expiration=str(int(now[0]) + 3600))
    assert excinfo.value.status_code == 400
    for channel in (short, week, day):
        drive.channels().stop(body={"id": channel["id"], "resourceId": channel["resourceId"]}).execute()

    watch_changes(drive, receiver.url, "expiring", expiration=str(now_ms + 10_000))
    assert fake.wait_idle()
    delivered = len(receiver.received)
    now[0] += 11
    fake.add_file("late.dcm", None, b"l")
    assert fake.wait_idle()
    assert len(receiver.received) == delivered
    assert fake.channels == []


def test_files_watch_states_manual_delivery_and_duplicates(
    fake: FakeDrive, drive: Any, receiver: WebhookReceiver
) -> None:
    fake.delivery_mode = "manual"
    fid = fake.add_file("w.dcm", None, b"1")
    drive.files().watch(fileId=fid, body={"id": "file-chan", "type": "webhook", "address": receiver.url}).execute()
    fake.update_content(fid, b"2")
    fake.trash(fid)
    fake.delete(fid)
    assert receiver.received == [] and fake.pending_notifications == 4

    records = fake.deliver_pending()
    assert [r.resource_state for r in records] == ["sync", "update", "trash", "remove"]
    assert receiver.headers()[1]["x-goog-changed"] == "content"

    fake.duplicate_notifications = True
    watch_changes(drive, receiver.url, "dup")
    fake.add_file("again.dcm", None, b"a")
    fake.deliver_pending()
    dup_numbers = [int(h["x-goog-message-number"]) for h in receiver.headers() if h["x-goog-channel-id"] == "dup"]
    assert dup_numbers[0] == dup_numbers[1] == 1
    assert dup_numbers[2] == dup_numbers[3] > 1
