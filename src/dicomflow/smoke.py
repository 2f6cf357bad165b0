"""`dicomflow smoke`: after a deploy, convert one tiny synthetic series through the deployment and check,
one by one, the assumptions no offline test can verify (issue 12, item 4). Each failed check says what
to change.

1. route      the batch API answers at the URL given (functions route /batches at the root of their URL;
              a proxy or a wrong URL adds a prefix the router does not know)
2. identity   the caller's ID token is accepted (audience, issuer, IAM invoker)
3. indexes    the status reads run every Firestore query the API makes for a caller (list by owner and
              creation time, one batch with its counters per state); a missing composite index fails them
4. delivery   Cloud Tasks reaches the expand function and the worker: ingress settings, roles/run.invoker of
              the tasks service account, and the OIDC audience each task carries (a refusal leaves the
              series with no attempt)
5. result     the series converts and its NIfTI is where the batch says
6. logs       the worker's `series_succeeded` entry carries the batch's label where the log-based metrics
              look (Cloud Logging with --project; the dev stack's log folder with --logs)
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomflow import samples
from dicomflow.api_client import ApiClient, ApiError
from dicomflow.domain.failures import DicomflowError
from dicomflow.domain.locations import Location, LocationKind

FINAL = ("completed", "completed_with_failures", "cancelled", "failed")

PutFiles = Callable[[Location, list[Path], str], tuple[Location, Location]]
"""put_files(scratch, files, run) -> (source folder holding the files, empty destination folder), both in
a new folder `run` inside `scratch`."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class SmokeReport:
    checks: list[Check] = field(default_factory=list)
    batch_id: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


class _Failed(Exception):
    pass


@dataclass
class Smoke:
    api: ApiClient
    scratch: Location
    put_files: PutFiles
    out: Callable[[str], None] = print
    timeout: float = 600.0
    stall: float = 180.0
    logs: Callable[[str], bool | None] | None = None
    poll: float = 1.0
    report: SmokeReport = field(default_factory=SmokeReport)

    def _record(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.report.checks.append(Check(name, ok, detail, fix))
        self.out(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            self.out(f"     what to change: {fix}")
            raise _Failed(name)

    def run(self) -> SmokeReport:
        try:
            self._route()
            self._identity()
            batch_id = self._submit()
            self._follow(batch_id)
            self._logs(batch_id)
        except _Failed:
            pass
        return self.report

    def _route(self) -> None:
        try:
            document = self.api.request("GET", "/openapi.json")
        except ApiError as exc:
            said = str(exc.problem.get("detail", exc))
            self._record(
                "route", False, f"GET {self.api.base_url}/openapi.json answered {exc.status}: {said}",
                "the batch API routes /batches and /openapi.json at the root of its function URL; use that URL "
                "(terraform output batches_api_url), or make the proxy in front of it strip its own prefix "
                f"(the function saw the path {said.removeprefix('no such resource: ')!r})",
            )  # fmt: skip
            return
        except DicomflowError as exc:
            self._record("route", False, exc.reason, "check the URL and that the batches function is deployed")
            return
        paths = document.get("paths", {}) if isinstance(document, dict) else {}
        if "/batches" not in paths:
            self._record("route", False, "the URL answered, but not with dicomflow's API document",
                         "pass the batches function's URL (terraform output batches_api_url)")  # fmt: skip
        self._record("route", True, f"the batch API answers at {self.api.base_url}")

    def _identity(self) -> None:
        try:
            self.api.batches(limit=5)
        except ApiError as exc:
            if exc.status == 401:
                fix = (
                    "the function refused the token: its audience must be one of DICOMFLOW_AUTH_AUDIENCES "
                    "(Terraform: the batches URL and var.api_extra_audiences), its issuer Google's, and it must "
                    "carry your e-mail (gcloud auth print-identity-token --audiences=URL --include-email)"
                )
            elif exc.status == 403:
                fix = "IAM refused you: add your account or group to var.submitters (roles/run.invoker) and apply"
            else:
                fix = "see the function's logs"
            self._record("identity", False, f"GET /batches answered {exc.status}: {exc}", fix)
        except DicomflowError as exc:
            self._record("indexes", False, f"listing batches failed: {exc.reason}", _INDEX_FIX)
        self._record("identity", True, "the API accepted the ID token")

    def _submit(self) -> str:
        run = f"smoke-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        with tempfile.TemporaryDirectory(prefix="dicomflow-smoke-") as tmp:
            series = samples.write_series(Path(tmp) / "series", samples.SeriesSpec(kind="ct", slices=4), seed=7)
            try:
                source, destination = self.put_files(self.scratch, [*series.paths], run)
            except DicomflowError as exc:
                fix = "give a scratch folder you can write (Drive: with DICOMFLOW_DRIVE_CREDENTIALS)"
                self._record("scratch", False, f"could not write the synthetic series: {exc.reason}", fix)
                raise AssertionError("unreachable") from exc  # pragma: no cover
        body = {"source": source.uri, "destination": destination.uri, "label": run}
        try:
            accepted = self.api.submit(body)
        except ApiError as exc:
            self._record("submit", False, f"POST /batches answered {exc.status}: {exc}",
                         "the scratch folder must be inside the roots granted to you (var.access_grants) and "
                         "shared with the Drive identity (terraform output drive_share_with) as Editor")  # fmt: skip
        except DicomflowError as exc:
            self._record("submit", False, exc.reason, "see the batches function's logs")
        self.report.batch_id = str(accepted["batch_id"])
        self._record("submit", True, f"batch {self.report.batch_id} accepted ({source.uri} -> {destination.uri})")
        return self.report.batch_id

    def _status(self, batch_id: str) -> dict[str, Any]:
        try:
            return self.api.status(batch_id, page_size="10")
        except ApiError as exc:
            self._record("indexes", False, f"GET /batches/{batch_id} answered {exc.status}: {exc}", _INDEX_FIX)
        except DicomflowError as exc:
            self._record("indexes", False, f"GET /batches/{batch_id} failed: {exc.reason}", _INDEX_FIX)
        raise AssertionError("unreachable")  # pragma: no cover

    def _follow(self, batch_id: str) -> None:
        started = time.monotonic()
        data = self._status(batch_id)
        mine = [b["batch_id"] for b in self.api.batches(limit=20)]
        self._record("indexes", batch_id in mine, "the status reads (list by owner, counters per state) ran",
                     _INDEX_FIX)  # fmt: skip
        expanded = False
        while data["status"] not in FINAL:
            waited = time.monotonic() - started
            if data["status"] != "expanding" and not expanded:
                expanded = True
                self._record("delivery", True, "Cloud Tasks reached the expand function (the batch was expanded)")
            attempts = sum(int(i.get("attempts", 0)) for i in data.get("items", []))
            if waited > self.stall and (data["status"] == "expanding" or attempts == 0):
                which = "the expand function" if data["status"] == "expanding" else "the worker"
                self._record(
                    "delivery", False, f"no task reached {which} in {self.stall:.0f} s (status {data['status']}, "
                    f"{attempts} conversion attempts)",
                    f"Cloud Tasks cannot call {which}: its ingress must admit Cloud Tasks (var.worker_ingress / "
                    "var.task_functions_ingress), the tasks service account needs roles/run.invoker on it, and the "
                    "OIDC audience of the tasks (DICOMFLOW_WORKER_URL / DICOMFLOW_EXPAND_URL) must be the URL it "
                    "verifies. The dashboard's 'Task attempts by status' tells which: PERMISSION_DENIED = ingress or "
                    "invoker, UNAUTHENTICATED = audience, NOT_FOUND = URL",
                )  # fmt: skip
            if waited > self.timeout:
                self._record("result", False, f"the batch is still {data['status']} after {self.timeout:.0f} s",
                             "see the dashboard and `dicomflow status BATCH_ID --watch`")  # fmt: skip
            time.sleep(self.poll)
            data = self._status(batch_id)
        if not expanded:
            self._record("delivery", data["status"] != "failed", "Cloud Tasks reached the expand function",
                         "see the batch's failure")  # fmt: skip
        counters = data["counters"]
        if data["status"] != "completed" or counters["succeeded"] != 1:
            reasons = "; ".join(str((i.get("failure") or {}).get("reason", "")) for i in data.get("failures", []))
            failure = (data.get("failure") or {}).get("reason", "")
            self._record("result", False, f"the batch ended {data['status']}: {failure or reasons}",
                         "fix the reason given (Drive sharing, worker memory, image)")  # fmt: skip
        outputs = [o["name"] for i in data.get("items", []) for o in i.get("outputs", [])]
        self._record("result", any(n.endswith((".nii", ".nii.gz")) for n in outputs),
                     f"the series converted: {', '.join(outputs)}", "the worker recorded no NIfTI output")  # fmt: skip

    def _logs(self, batch_id: str) -> None:
        if self.logs is None:
            self.out("skip logs: pass --project (Cloud Logging) or --logs (the dev stack's log folder) to check")
            return
        deadline = time.monotonic() + 120
        found = self.logs(batch_id)
        while found is False and time.monotonic() < deadline:
            time.sleep(5)  # Cloud Logging ingests within seconds to a minute
            found = self.logs(batch_id)
        self._record(
            "logs", bool(found), "the worker's series_succeeded entry carries the batch label the metrics count",
            "the worker must log one JSON object per line on stdout (DICOMFLOW_LOG_FORMAT=json) and the metrics "
            "filter resource.type=cloud_run_revision with service names starting with var.name_prefix",
        )  # fmt: skip


_INDEX_FIX = (
    "a Firestore query failed: most often a composite index is missing or still building — terraform apply "
    "(infra/firestore.tf: batches (owner, created_at), (owner, status, created_at), (status, created_at)); "
    "the function's log names the index"
)


def put_local(scratch: Location, files: list[Path], run: str) -> tuple[Location, Location]:
    """The dev stack: a folder of this machine inside the stack's roots."""
    root = Path(scratch.ref) / run
    (root / "dicom").mkdir(parents=True)
    for n, path in enumerate(files):
        (root / "dicom" / f"{n:03d}.dcm").write_bytes(path.read_bytes())
    return Location(LocationKind.LOCAL, str(root / "dicom")), Location(LocationKind.LOCAL, str(root / "nifti"))


def put_drive(sink: Any) -> PutFiles:
    """A deployment: a Drive scratch folder, written with the operator's own Drive credentials."""

    def put(scratch: Location, files: list[Path], run: str) -> tuple[Location, Location]:
        folder = sink.subfolder(scratch, run)
        source = sink.subfolder(folder, "dicom")
        sink.publish(source, "", files, owner_key="dicomflow-smoke")
        return source, sink.subfolder(folder, "nifti")

    return put


def local_logs(folder: Path) -> Callable[[str], bool | None]:
    """The dev stack's log files: is there a series_succeeded line labelled with the batch?"""

    def check(batch_id: str) -> bool:
        for path in folder.glob("worker*.log"):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                labels = entry.get("logging.googleapis.com/labels", {}) if isinstance(entry, dict) else {}
                if entry.get("event") == "series_succeeded" and labels.get("batch_id") == batch_id:
                    return True
        return False

    return check


def cloud_logs(project: str, name_prefix: str) -> Callable[[str], bool | None]:
    """Cloud Logging, with the same scope as the log-based metrics (infra/observability.tf local.log_scope)."""

    def check(batch_id: str) -> bool:
        from google.cloud import logging as cloud_logging  # noqa: PLC0415 - only against a deployment

        client = cloud_logging.Client(project=project)  # type: ignore[no-untyped-call]
        query = (
            f'resource.type="cloud_run_revision" AND resource.labels.service_name=~"^{name_prefix}-" AND '
            f'jsonPayload.event="series_succeeded" AND labels.batch_id="{batch_id}"'
        )
        return any(True for _ in client.list_entries(filter_=query, max_results=1))  # type: ignore[no-untyped-call]

    return check
