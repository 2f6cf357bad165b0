"""The `dicomflow` command.

Exit codes: 0 = every series converted (or already up to date); 2 = at least one series was
dead-lettered (see `dicomflow dlq list`); 1 = usage or configuration error, or nothing could be done;
130 = interrupted (run the same command again to resume).
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from dicomflow.cli_bids import build_layout, layout_options
from dicomflow.config import Mode, Settings, describe, load_settings
from dicomflow.domain.failures import DicomflowError
from dicomflow.domain.layout import Layout
from dicomflow.domain.locations import Location, check_apart, parse_location
from dicomflow.domain.model import BatchStatus, ItemState
from dicomflow.domain.series import ConversionOptions
from dicomflow.services.dead_letter import retry_dead_letters
from dicomflow.services.submit import BatchRequest
from dicomflow.ui import INTERRUPTED, RunDisplay, build_report, print_json, print_summary, summary_dict

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_DEAD_LETTERS = 2
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    exit_code = EXIT_USAGE


def fail(message: str) -> NoReturn:
    raise CliError(message)


class DicomflowGroup(click.Group):
    """click exits 2 on a usage error (an unknown option, a missing argument); dicomflow's README gives 2
    to "something was dead-lettered", so every usage or configuration error exits 1 instead, and an
    interruption 130."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.ClickException as exc:
            exc.show()
            sys.exit(EXIT_USAGE)
        except (click.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        # Only `--help`/`--version` (or a command that returns instead of exiting) get here.
        sys.exit(result if isinstance(result, int) else EXIT_OK)


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except DicomflowError as exc:
        fail(exc.reason)


def _location(text: str, field: str) -> Location:
    try:
        if "://" in text:
            return parse_location(text, field=field)
        return parse_location(text, field=field, absolute_path=str(Path(text).expanduser().resolve()))
    except DicomflowError as exc:
        fail(f"{field}: {exc.reason}")


@click.group(cls=DicomflowGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dicomflow")
def main() -> None:
    """Convert DICOM series to NIfTI (.nii.gz + BIDS JSON) with dcm2niix.

    Sources and destinations are local folders or Google Drive folders (drive://FOLDER_ID).
    Settings can also be given as environment variables DICOMFLOW_<NAME>.

    Exit codes: 0 every series converted (or already up to date); 2 something was dead-lettered
    (see `dicomflow dlq list`); 1 usage or configuration error, or no DICOM series found; 130
    interrupted (run the same command again to resume).
    """


# --- convert -------------------------------------------------------------------------------------------


@main.command()
@click.argument("source")
@click.argument("destination")
@click.option("--workers", type=int, help=describe("workers"))
@click.option("--state", "state_path", metavar="FILE", help=describe("state_path"))
@click.option(
    "--force", is_flag=True, help="Convert every series again, even those already converted into DESTINATION."
)
@click.option("--label", default="", help="A name for this batch, shown by `dicomflow status`.")
@click.option("--no-compress", is_flag=True, help="Write .nii instead of .nii.gz (dcm2niix -z n).")
@click.option(
    "--merge-2d",
    type=click.Choice(ConversionOptions.MERGE_CHOICES),
    default="auto",
    show_default=True,
    help="Merge 2D slices from the same series regardless of echo, exposure, etc. (dcm2niix -m).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (for scripts).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output; only the summary.")
@layout_options
def convert(
    source: str,
    destination: str,
    workers: int | None,
    state_path: str | None,
    force: bool,
    label: str,
    no_compress: bool,
    merge_2d: str,
    as_json: bool,
    quiet: bool,
    **layout_args: Any,
) -> None:
    """Convert every DICOM series under SOURCE into NIfTI under DESTINATION, on this machine.

    The output tree mirrors SOURCE's folders, or with --layout bids is a BIDS dataset (docs/bids.md).
    Every run writes DESTINATION/report.html: a thumbnail of every image and every problem. Series
    already converted into DESTINATION with the same files, converter and options are skipped (use
    --force to redo them); a series converted again replaces the outputs it had. An interrupted run
    resumes where it stopped when the same command is run again. The progress state is kept in
    DESTINATION/.dicomflow/ (or --state). SOURCE and DESTINATION must not contain each other.
    """
    from dicomflow import local_runtime

    layout, _ = build_layout(**layout_args)
    src = _location(source, "source")
    dst = _location(destination, "destination")
    try:
        check_apart((src,), dst)
    except DicomflowError as exc:
        fail(exc.reason)
    state = state_path or load_settings().state_path or str(local_runtime.default_state_path(dst))
    settings = _settings(mode=Mode.LOCAL, workers=workers, state_path=state)
    request = BatchRequest(
        sources=(src,),
        destination=dst,
        options=ConversionOptions(compress=not no_compress, merge_2d=merge_2d),
        label=label,
        force=force,
        layout=layout,
    )
    sys.exit(_run_local(settings, lambda session: local_runtime.start_or_resume(session, request), as_json, quiet))


def _run_local(
    settings: Settings,
    start: Callable[[Any], tuple[Any, bool]],
    as_json: bool,
    quiet: bool,
) -> int:
    from dicomflow import local_runtime

    started = time.monotonic()
    display = RunDisplay(quiet=quiet or as_json)
    try:
        with local_runtime.open_session(settings) as session:
            ctx = session.ctx
            batch, resumed = start(session)
            if resumed:
                display.note(
                    f"resuming batch {batch.batch_id} ({batch.counters.finished}/{batch.counters.series_total} done)"
                )
            else:
                display.note(f"batch {batch.batch_id}: looking for DICOM series with {settings.worker_count} worker(s)")

            labelled = False

            def tick() -> None:
                nonlocal labelled
                current = ctx.store.get_batch(batch.batch_id)
                if current.expanded_at is not None and not labelled:
                    display.set_labels(ctx.store.list_items(batch.batch_id, limit=100_000))
                    labelled = True
                display.counters(current, current.counters)

            with display:
                local_runtime.run_queue(session, display.step, tick)
            final = ctx.store.get_batch(batch.batch_id)
            # The queue is drained: a batch still unfinished now has nothing left to finish it but a new run.
            report = build_report(final, local_runtime.all_items(ctx.store, batch.batch_id), run_alive=False)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: nothing is lost; run the same command again to resume", err=True)
        return EXIT_INTERRUPTED
    except DicomflowError as exc:
        fail(exc.reason)

    elapsed = time.monotonic() - started
    if as_json:
        print_json(sys.stdout, summary_dict(report) | {"elapsed_seconds": round(elapsed, 3)})
    else:
        print_summary(sys.stdout, report, elapsed)
        if report.failure and report.status == "failed":
            click.echo(report.failure.reason, err=True)
    return exit_code(report.status)


def exit_code(status: str) -> int:
    """The exit code of a batch's status as `build_report` words it (the JSON `status` says the same)."""
    return {
        BatchStatus.COMPLETED.value: EXIT_OK,
        BatchStatus.CANCELLED.value: EXIT_OK,
        BatchStatus.COMPLETED_WITH_FAILURES.value: EXIT_DEAD_LETTERS,
        BatchStatus.FAILED.value: EXIT_USAGE,
        INTERRUPTED: EXIT_INTERRUPTED,
    }.get(status, EXIT_OK)


# --- status and dead letters ----------------------------------------------------------------------------


def _local_session_settings(state_path: str | None) -> Settings:
    """Settings on an explicitly given local state file (--state FILE or DICOMFLOW_STATE_PATH)."""
    explicit = state_path or load_settings().state_path
    path = Path(explicit).expanduser() if explicit else None
    if path is None or not path.exists():
        fail(f"no dicomflow state at {path}: pass --state FILE (DESTINATION/.dicomflow/state.sqlite)")
    return _settings(mode=Mode.LOCAL, state_path=str(path))


def _target(batch: str | None, destination: str | None, state_path: str | None) -> Any:
    """Which local state (and batch) the command is about; None: list the recent destinations."""
    from dicomflow import local_targets

    try:
        # An explicit DEST wins over DICOMFLOW_STATE_PATH from the environment (only --state conflicts).
        state = state_path or (None if destination else load_settings().state_path) or None
        return local_targets.resolve(batch, destination, state)
    except DicomflowError as exc:
        fail(exc.reason)


def _report(ctx: Any, batch: Any) -> Any:
    """The batch's report, saying "interrupted" when it is unfinished and no run holds its state."""
    from dicomflow import local_runtime

    state = Path(ctx.settings.state_path)
    alive = local_runtime.live_holder(state) is not None
    hint = ""
    if not batch.is_final and not alive:
        sources = " ".join(shlex.quote(s.uri) for s in batch.sources)
        hint = f" (dicomflow convert {sources} {shlex.quote(batch.destination.uri)})"
    return build_report(batch, local_runtime.all_items(ctx.store, batch.batch_id), run_alive=alive, resume_hint=hint)


def _print_recent(command: str, as_json: bool) -> None:
    """No DEST and no batch: the destinations used recently, for the user to choose from."""
    from dicomflow import local_targets

    recent = local_targets.recent_destinations()
    rows: list[dict[str, Any]] = []
    for known in recent:
        latest = known.latest
        status = None
        if latest is not None:
            status = build_report(latest, [], run_alive=known.run_alive).status
        rows.append({
            "destination": latest.destination.uri if latest else None,
            "state": str(known.state_path),
            "latest_batch": latest.batch_id if latest else None,
            "status": status,
            "created_at": latest.created_at if latest else None,
        })  # fmt: skip
    if as_json:
        print_json(sys.stdout, rows)
        return
    if not rows:
        click.echo("no local destinations yet: run `dicomflow convert SOURCE DESTINATION` first")
        return
    click.echo(f"recent destinations (give one: `dicomflow {command} DESTINATION`, or a batch id):")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created_at"])) if row["created_at"] else ""
        shown = row["destination"] or f"(state {row['state']})"
        click.echo(f"  {shown}\n      latest batch {row['latest_batch'] or '-'}  {row['status'] or ''}  {when}")


def _read_context(settings: Settings) -> Any:
    from dicomflow import bootstrap, logs

    logs.configure(settings, stream=sys.stderr)
    return bootstrap.build(settings)


API_OPTION = click.option("--api", "api_url", metavar="URL", help=describe("api_url"))


def _api(api_url: str | None) -> Any:
    from dicomflow.api_client import ApiClient

    settings = _settings()
    url = api_url or settings.api_url
    if not url:
        return None
    try:
        return ApiClient(url, settings.api_token)
    except DicomflowError as exc:
        fail(exc.reason)


@main.command()
@click.argument("batch_id", required=False, metavar="[BATCH]")
@click.argument("destination", required=False, metavar="[DEST]")
@click.option("--state", "state_path", metavar="FILE", help=describe("state_path"))
@API_OPTION
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until the batch finishes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def status(
    batch_id: str | None, destination: str | None, state_path: str | None, api_url: str | None, watch: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Show the batches of a destination, or one batch with its counters, warnings and failures.

    Locally each destination keeps its own state (DEST/.dicomflow): `status DEST` lists its batches,
    `status BATCH [DEST]` shows one (a unique prefix of the id is enough; without DEST the destinations used
    recently are searched), and `status` alone lists the destinations used recently. With --api URL (or
    DICOMFLOW_API_URL) it reads the batch API instead.
    """
    api = _api(api_url)
    if api is not None:
        sys.exit(_remote_status(api, batch_id, watch, as_json))
    target = _target(batch_id, destination, state_path)
    if target is None:
        _print_recent("status", as_json)
        sys.exit(EXIT_OK)
    ctx = _read_context(_settings(mode=Mode.LOCAL, state_path=str(target.state_path)))
    try:
        if target.batch_id is None:
            batches = ctx.store.list_batches(limit=20)
            reports = [_report(ctx, b) for b in batches]
            if as_json:
                print_json(sys.stdout, [summary_dict(r) for r in reports])
            else:
                _print_batches(reports)
            sys.exit(EXIT_OK)
        while True:
            report = _report(ctx, ctx.store.get_batch(target.batch_id))
            batch = report.batch
            if not watch or batch.is_final or report.status == INTERRUPTED:
                break
            click.echo(
                f"{time.strftime('%H:%M:%S')} {batch.status.value}: {batch.counters.finished}/"
                f"{batch.counters.series_total} finished, {batch.counters.dead_lettered} dead-lettered",
                err=True,
            )
            time.sleep(2)
    except DicomflowError as exc:
        fail(exc.reason)
    if as_json:
        print_json(sys.stdout, summary_dict(report))
    else:
        print_summary(sys.stdout, report)
    sys.exit(exit_code(report.status))


def _remote_exit(data: dict[str, Any]) -> int:
    if data["status"] == "failed":
        return EXIT_USAGE
    if data["counters"]["dead_lettered"]:
        return EXIT_DEAD_LETTERS
    return EXIT_OK if data["status"] in ("completed", "cancelled") else EXIT_INTERRUPTED


FINAL_STATUSES = ("completed", "completed_with_failures", "cancelled", "failed")


def _watch_remote(api: Any, batch_id: str) -> dict[str, Any]:
    while True:
        data: dict[str, Any] = api.status(batch_id, page_size="1")
        if data["status"] in FINAL_STATUSES and not data.get("finishing"):  # report (and dataset) written
            return api.status(batch_id)  # type: ignore[no-any-return]
        c = data["counters"]
        eta = f", about {data['eta_seconds']:.0f} s left" if data.get("eta_seconds") else ""
        click.echo(
            f"{time.strftime('%H:%M:%S')} {data['status']}: {c['succeeded'] + c['skipped'] + c['dead_lettered']}/"
            f"{c['series_total']} finished, {c['running']} running, {c['dead_lettered']} dead-lettered{eta}",
            err=True,
        )
        time.sleep(2)


def _remote_status(api: Any, batch_id: str | None, watch: bool, as_json: bool) -> int:
    from dicomflow.ui import print_remote_summary

    try:
        if batch_id is None:
            batches = api.batches()
            if as_json:
                print_json(sys.stdout, batches)
            else:
                for b in batches:
                    c = b["counters"]
                    click.echo(f"{b['batch_id']}  {b['status']:<24} {c['succeeded']}/{c['series_total']} ok, "
                               f"{c['dead_lettered']} dead  {b['label']}")  # fmt: skip
            return EXIT_OK
        data = _watch_remote(api, batch_id) if watch else api.status(batch_id)
    except DicomflowError as exc:
        fail(exc.reason)
    if as_json:
        print_json(sys.stdout, data)
    else:
        print_remote_summary(sys.stdout, data)
    return _remote_exit(data) if data["status"] in FINAL_STATUSES else EXIT_OK


@main.command()
@click.argument("source", nargs=-1, required=True)
@click.argument("destination")
@API_OPTION
@click.option("--label", default="", help="A name for this batch, shown by `dicomflow status`.")
@click.option("--force", is_flag=True, help="Convert every series again, even those already converted.")
@click.option("--no-compress", is_flag=True, help="Write .nii instead of .nii.gz (dcm2niix -z n).")
@click.option("--merge-2d", type=click.Choice(ConversionOptions.MERGE_CHOICES), default="auto", show_default=True,
              help="dcm2niix -m.")  # fmt: skip
@click.option("--idempotency-key", default="", help="Repeat a submission safely: the same key returns the same batch.")
@click.option("--wait", is_flag=True, help="Follow the batch until it finishes (like status --watch).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@layout_options
def submit(
    source: tuple[str, ...], destination: str, api_url: str | None, label: str, force: bool, no_compress: bool,
    merge_2d: str, idempotency_key: str, wait: bool, as_json: bool, **layout_args: Any,
) -> None:  # fmt: skip
    """Submit SOURCE folder(s) for conversion into DESTINATION through the batch API (cloud mode).

    Folders are drive://FOLDER_ID, or local paths when the API runs in the dev stack
    (`dicomflow dev`). The API answers at once; conversion continues in the cloud. With --layout bids
    DESTINATION becomes a BIDS dataset (docs/bids.md); every batch writes DESTINATION/report.html.
    """
    _, layout_body = build_layout(**layout_args)
    api = _api(api_url)
    if api is None:
        fail("submit needs the batch API: pass --api URL or set DICOMFLOW_API_URL (for a local run use convert)")
    sources = [_location(s, "source").uri for s in source]
    body: dict[str, Any] = {
        "source": sources if len(sources) > 1 else sources[0],
        "destination": _location(destination, "destination").uri,
        "options": {"compress": not no_compress, "merge_2d": merge_2d},
        "label": label,
        "force": force,
    }
    if layout_body is not None:
        body["layout"] = layout_body
    try:
        accepted = api.submit(body, idempotency_key)
    except DicomflowError as exc:
        fail(exc.reason)
    click.echo(f"batch {accepted['batch_id']} accepted: {accepted['status_url']}", err=True)
    if not wait:
        if as_json:
            print_json(sys.stdout, accepted)
        sys.exit(EXIT_OK)
    sys.exit(_remote_status(api, accepted["batch_id"], True, as_json))


@main.command()
@click.argument("batch_id")
@API_OPTION
def cancel(batch_id: str, api_url: str | None) -> None:
    """Cancel a batch in the cloud: series not started yet are skipped, running ones finish."""
    api = _api(api_url)
    if api is None:
        fail("cancel needs the batch API: pass --api URL or set DICOMFLOW_API_URL (stop a local run with Ctrl-C)")
    try:
        data = api.cancel(batch_id)
    except DicomflowError as exc:
        fail(exc.reason)
    click.echo(f"batch {batch_id} {data['status']}")


@main.command()
@API_OPTION
@click.option("--scratch", required=True, metavar="FOLDER",
              help="drive://FOLDER_ID the deployment may read and write and you may write (or, for the dev stack, "
              "a local folder inside its roots); a new sub-folder is made for each run.")  # fmt: skip
@click.option("--project", default="", help="Check Cloud Logging of this project for the run's log entries.")
@click.option("--name-prefix", default="dicomflow", show_default=True, help="var.name_prefix of the deployment.")
@click.option("--logs", "log_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The dev stack's log folder, to check its log entries instead.")  # fmt: skip
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Give up after this many seconds.")
@click.option("--stall", type=float, default=180.0, show_default=True,
              help="Report the tasks as not delivered when nothing ran for this many seconds.")  # fmt: skip
def smoke(
    api_url: str | None, scratch: str, project: str, name_prefix: str, log_dir: Path | None, timeout: float,
    stall: float,
) -> None:  # fmt: skip
    """After a deploy: convert one tiny synthetic series through the deployment, checking each assumption
    offline tests cannot (route, token audience, Firestore indexes, Cloud Tasks delivery, logs).

    Every failed check prints what to change; the exit code is 0 only when all passed."""
    from dicomflow import bootstrap
    from dicomflow.smoke import Smoke, cloud_logs, local_logs, put_drive, put_local

    api = _api(api_url)
    if api is None:
        fail("smoke needs the batch API: pass --api URL or set DICOMFLOW_API_URL")
    location = _location(scratch, "scratch")
    put = put_local if location.kind.value == "local" else put_drive(bootstrap.drive_sink(_settings()))
    logs = local_logs(log_dir) if log_dir else (cloud_logs(project, name_prefix) if project else None)
    report = Smoke(api, location, put, out=click.echo, timeout=timeout, stall=stall, logs=logs).run()
    click.echo(
        f"smoke {'passed' if report.ok else 'FAILED'}" + (f" (batch {report.batch_id})" if report.batch_id else "")
    )
    sys.exit(EXIT_OK if report.ok else EXIT_USAGE)


@main.command()
def openapi() -> None:
    """Print the batch API's OpenAPI document (JSON)."""
    from dicomflow.openapi import document

    click.echo(json.dumps(document(), indent=2, sort_keys=True))


@main.command()
@click.option("--logs", "log_dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".dicomflow-dev"),
              show_default=True, help="Where the components write their logs.")  # fmt: skip
def dev(log_dir: Path) -> None:
    """Run the cloud path on loopback: Firestore and Cloud Tasks emulators, the functions, the worker.

    Then use `dicomflow submit LOCAL_SOURCE LOCAL_DEST --api URL` and `dicomflow status --watch --api URL`
    exactly as against a deployment. Stop with Ctrl-C.
    """
    from dicomflow import devstack

    def stop_on_signal(_signum: int, _frame: object) -> None:
        # `kill` stops the stack as cleanly as Ctrl-C. Only the first signal counts: `make dev` forwards its
        # own SIGTERM, an impatient user presses Ctrl-C again, and neither may cut the shutdown short and
        # leave emulators behind (issue 12). The shutdown is bounded (devstack.STOP_GRACE_SECONDS).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        click.echo("stopping the dev stack (a few seconds)...", err=True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop_on_signal)
    signal.signal(signal.SIGTERM, stop_on_signal)
    settings = _settings()
    click.echo("starting the dev stack (the Firestore emulator takes a few seconds)...", err=True)
    try:
        with devstack.dev_stack(settings, log_dir.resolve()) as stack:
            click.echo(f"batch API:   {stack.api_url}")
            for name, url in sorted(stack.urls.items()):
                click.echo(f"  {name:<20} {url}")
            click.echo(f"firestore:   {stack.firestore_host}   cloud tasks: {stack.tasks_host}")
            click.echo(f"logs:        {log_dir.resolve()}")
            click.echo(f"\n  export DICOMFLOW_API_URL={stack.api_url.rstrip('/')}")
            # The stack verifies tokens like the cloud does; this one (its own issuer's) is valid 12 hours.
            click.echo(f"  export DICOMFLOW_API_TOKEN={stack.token(lifetime=12 * 3600)}\n")
            click.echo("ready; press Ctrl-C to stop")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    except DicomflowError as exc:
        fail(exc.reason)


def _print_batches(reports: list[Any]) -> None:
    """One line per batch, ids in full (a table would cut them to the terminal's width)."""
    if not reports:
        click.echo("no batches yet")
        return
    for report in reports:
        b, c = report.batch, report.batch.counters
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(b.created_at))
        click.echo(
            f"{b.batch_id}  {created}  {report.status:<23}  {c.series_total} series: {c.succeeded} ok, "
            f"{c.skipped} skipped, {c.dead_lettered} dead-lettered"
            + (f"  {b.label}" if b.label else "")
            + (f"\n    interrupted: run the same command to resume{report.resume_hint}" if report.resume_hint else "")
        )


@main.group()
def dlq() -> None:
    """Dead-lettered series: list them with their reasons, and retry them after fixing the cause."""


@dlq.command("list")
@click.argument("batch_id", required=False, metavar="[BATCH]")
@click.argument("destination", required=False, metavar="[DEST]")
@click.option("--state", "state_path", metavar="FILE", help=describe("state_path"))
@API_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def dlq_list(
    batch_id: str | None, destination: str | None, state_path: str | None, api_url: str | None, as_json: bool
) -> None:
    """List dead-lettered series with their reasons: of one batch (`dlq list BATCH [DEST]`), or of the
    latest batches of a destination (`dlq list DEST`). Without either, lists the destinations used recently."""
    api = _api(api_url)
    if api is not None:
        if batch_id is None:
            fail("with --api, give the BATCH_ID")
        try:
            failures = api.status(batch_id, state="dead_lettered", page_size="500")["items"]
        except DicomflowError as exc:
            fail(exc.reason)
        if as_json:
            print_json(sys.stdout, failures)
        for item in failures:
            click.echo(f"{batch_id}  {item['item_id']}  series {item.get('series_number') or ''} "
                       f"{item.get('description', '')}: {(item.get('failure') or {}).get('reason', '')}")  # fmt: skip
        if not failures:
            click.echo("no dead-lettered series")
        return
    _local_dlq_list(batch_id, destination, state_path, as_json)


def _local_dlq_list(batch_id: str | None, destination: str | None, state_path: str | None, as_json: bool) -> None:
    from dicomflow import local_runtime

    target = _target(batch_id, destination, state_path)
    if target is None:
        _print_recent("dlq list", as_json)
        sys.exit(EXIT_OK)
    ctx = _read_context(_settings(mode=Mode.LOCAL, state_path=str(target.state_path)))
    try:
        batches = [ctx.store.get_batch(target.batch_id)] if target.batch_id else ctx.store.list_batches(limit=20)
    except DicomflowError as exc:
        fail(exc.reason)
    dead = frozenset({ItemState.DEAD_LETTERED})
    rows = [(b, i) for b in batches for i in local_runtime.all_items(ctx.store, b.batch_id, dead)]
    if as_json:
        print_json(sys.stdout, [summary_dict(build_report(b, [i]))["dead_letters"][0] | {"batch_id": b.batch_id}
                                for b, i in rows])  # fmt: skip
        return
    if not rows:
        click.echo("no dead-lettered series")
        return
    for batch, item in rows:
        reason = item.failure.reason if item.failure else ""
        number = "" if item.series_number is None else item.series_number
        click.echo(f"{batch.batch_id}  {item.item_id}  series {number} {item.description}: {reason}")
    first = rows[0][0]
    if local_runtime.default_state_path(first.destination).resolve() == target.state_path.resolve():
        where = shlex.quote(first.destination.uri)
    else:
        where = f"--state {shlex.quote(str(target.state_path))}"
    click.echo(f"\nfix the cause, then: dicomflow dlq retry {first.batch_id} {where}")


@dlq.command("retry")
@click.argument("batch_id", metavar="BATCH")
@click.argument("destination", required=False, metavar="[DEST]")
@click.option("--state", "state_path", metavar="FILE", help=describe("state_path"))
@API_OPTION
@click.option("--workers", type=int, help=describe("workers"))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output; only the summary.")
def dlq_retry(
    batch_id: str, destination: str | None, state_path: str | None, api_url: str | None, workers: int | None,
    as_json: bool, quiet: bool,
) -> None:  # fmt: skip
    """Convert the dead-lettered series of BATCH again, with a fresh attempt budget.

    Each series' files are read again from the source first (files added, fixed or removed since are taken
    as they are now). Locally this runs the conversions now, reading DEST's state (a unique prefix of BATCH is
    enough; without DEST the destinations used recently are searched); with --api it asks the cloud to
    (follow with status --watch)."""
    api = _api(api_url)
    if api is not None:
        try:
            result = api.retry_dead_letters(batch_id)
        except DicomflowError as exc:
            fail(exc.reason)
        click.echo(f"re-enqueued {result['redriven']} series of batch {batch_id}")
        sys.exit(EXIT_OK)
    target = _target(batch_id, destination, state_path)
    if target is None or target.batch_id is None:
        fail("give the BATCH whose dead-lettered series to retry")
    full_id = target.batch_id
    settings = _settings(mode=Mode.LOCAL, state_path=str(target.state_path), workers=workers)

    def start(session: Any) -> tuple[Any, bool]:
        _, count = retry_dead_letters(session.ctx, full_id)
        if count == 0:
            fail(f"batch {full_id} has no dead-lettered series")
        click.echo(f"retrying {count} dead-lettered series of batch {full_id}", err=True)
        return session.ctx.store.get_batch(full_id), False

    sys.exit(_run_local(settings, start, as_json, quiet))


# --- Drive: push notifications and credentials -------------------------------------------------------------


def _watch_context(state_path: str | None) -> Any:
    """Watches live in the state store of the configured mode: Firestore in the cloud
    (DICOMFLOW_MODE=cloud), else the local SQLite state."""
    settings = _settings()
    if settings.mode is Mode.CLOUD:
        return _read_context(settings)
    return _read_context(_local_session_settings(state_path) if state_path or settings.state_path
                         else _settings(mode=Mode.LOCAL, state_path=str(_default_watch_state())))  # fmt: skip


def _default_watch_state() -> Path:
    from dicomflow import local_runtime

    return local_runtime.state_home() / "watches.sqlite"


@main.group()
def watch() -> None:
    """Convert new exams automatically when they land in a Drive folder (Drive push notifications)."""


@watch.command("add")
@click.option("--folder", required=True, help="The watched Drive folder: drive://ID or ID.")
@click.option("--dest", "destination", required=True, help="Where NIfTI goes: drive://ID or ID.")
@click.option("--label", default="", help="Label of the batches this watch submits.")
@click.option("--no-compress", is_flag=True, help="Write .nii instead of .nii.gz.")
@click.option("--merge-2d", type=click.Choice(ConversionOptions.MERGE_CHOICES), default="auto", show_default=True)
@click.option("--state", "state_path", metavar="FILE", help=describe("state_path"))
@click.option("--owner", default="", help="Without --api: record this e-mail as the owner of the watch's batches.")
@API_OPTION
@layout_options
def watch_add(
    folder: str, destination: str, label: str, no_compress: bool, merge_2d: str, state_path: str | None, owner: str,
    api_url: str | None, **layout_args: Any,
) -> None:  # fmt: skip
    """Open a Drive changes channel for FOLDER. New uploads are converted once the folder has been quiet
    for DICOMFLOW_SETTLE_SECONDS; notifications go to DICOMFLOW_WEBHOOK_URL with a token of the channel's own.

    With --api (or DICOMFLOW_API_URL) the watch is yours and FOLDER and DEST must lie inside your granted
    roots; without, an operator opens it directly in the state store."""
    from dicomflow.services.drive_changes import add_watch, channel_summary

    def as_drive(text: str, field: str) -> Location:
        return _location(text if "://" in text else f"drive://{text}", field)

    options = ConversionOptions(compress=not no_compress, merge_2d=merge_2d)
    layout, layout_body = build_layout(**layout_args)
    api = _api(api_url)
    if api is not None:
        body = {"folder": as_drive(folder, "folder").uri, "destination": as_drive(destination, "destination").uri,
                "options": options.to_dict(), "label": label}  # fmt: skip
        if layout_body is not None:
            body["layout"] = layout_body
        try:
            print_json(sys.stdout, api.add_watch(body))
        except DicomflowError as exc:
            fail(exc.reason)
        return
    ctx = _watch_context(state_path)
    try:
        channel = add_watch(ctx, as_drive(folder, "folder"), as_drive(destination, "destination"), options, label,
                            owner=owner.strip().lower(), layout=layout)  # fmt: skip
    except DicomflowError as exc:
        fail(exc.reason)
    print_json(sys.stdout, channel_summary(channel))


@watch.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include stopped channels.")
@click.option("--state", "state_path", metavar="FILE", help=describe("state_path"))
@API_OPTION
def watch_list(show_all: bool, state_path: str | None, api_url: str | None) -> None:
    """The watch channels, with their folders and expiry (with --api: yours)."""
    from dicomflow.services.drive_changes import channel_summary

    api = _api(api_url)
    if api is not None:
        try:
            watches = api.watches()
        except DicomflowError as exc:
            fail(exc.reason)
        for w in watches:
            click.echo(f"{w['channel_id']}  {w['folder']} -> {w['destination']}  {w.get('label', '')}")
        if not watches:
            click.echo("no watch channels")
        return
    ctx = _watch_context(state_path)
    channels = ctx.store.list_channels(active_only=not show_all)
    if not channels:
        click.echo("no watch channels")
    for channel in channels:
        data = channel_summary(channel)
        expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(channel.expires_at))
        state = "" if channel.active else "  (stopped)"
        click.echo(f"{data['channel_id']}  {data['folder']} -> {data['destination']}  expires {expires}{state}")


@watch.command("remove")
@click.argument("channel_id")
@click.option("--state", "state_path", metavar="FILE", help=describe("state_path"))
@API_OPTION
def watch_remove(channel_id: str, state_path: str | None, api_url: str | None) -> None:
    """Stop a watch channel (Drive channels.stop); uploads are no longer converted automatically."""
    from dicomflow.services.drive_changes import remove_watch

    api = _api(api_url)
    if api is not None:
        try:
            api.stop_watch(channel_id)
        except DicomflowError as exc:
            fail(exc.reason)
        click.echo(f"stopped {channel_id}")
        return
    ctx = _watch_context(state_path)
    try:
        remove_watch(ctx, channel_id)
    except DicomflowError as exc:
        fail(exc.reason)
    click.echo(f"stopped {channel_id}")


@main.command()
@click.option("--client-secrets", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="OAuth client JSON (a 'Desktop app' client from the Google Cloud console).")  # fmt: skip
@click.option("--token", "token_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path.home() / ".config" / "dicomflow" / "drive-token.json", show_default=True,
              help="Where to keep the token (permissions 0600).")  # fmt: skip
@click.option("--no-browser", is_flag=True, help="Print the URL instead of opening a browser.")
def auth(client_secrets: Path, token_path: Path, no_browser: bool) -> None:
    """Let dicomflow use Google Drive as you (user OAuth, installed-app flow).

    Then set DICOMFLOW_DRIVE_CREDENTIALS to the token file. The token is refreshed automatically.
    """
    from google_auth_oauthlib.flow import InstalledAppFlow

    from dicomflow.adapters.drive.connection import SCOPES, save_user_credentials

    flow = InstalledAppFlow.from_client_secrets_file(str(client_secrets), SCOPES)
    credentials = flow.run_local_server(port=0, open_browser=not no_browser)
    save_user_credentials(token_path, credentials)
    click.echo(f"saved {token_path}; now: export DICOMFLOW_DRIVE_CREDENTIALS={token_path}")


# --- demo --------------------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
    show_default=True, help="Where to write the sample DICOM archive (dicom/), its conversion (nifti/) and its "
    "BIDS version (bids/).",
)  # fmt: skip
@click.option("--workers", type=int, help=describe("workers"))
def demo(directory: Path, workers: int | None) -> None:
    """Generate a small realistic DICOM archive and convert it, end to end, on this machine.

    The archive holds nested and flat (PACS-export) layouts, 3D/4D/diffusion MR and CT series, one
    series with a corrupt file, some non-DICOM files, and one MR session with every kind of series a
    BIDS dataset is made of. It is converted twice: mirrored (nifti/) and as a BIDS dataset with the
    rules file a user would write for it (bids/, rules in bids-rules.json); each gets its report.html.
    The runs must convert every good series and dead-letter the corrupt one with its reason; the command
    checks that and exits 0 if so.
    """
    import shutil

    from dicomflow import local_runtime, samples
    from dicomflow.demo import check_bids_demo, check_demo_result
    from dicomflow.samples_bids import BIDS_RULES, add_bids_session

    directory = directory.resolve()
    dicom, nifti, bids, rules = directory / "dicom", directory / "nifti", directory / "bids", "bids-rules.json"
    for folder in (dicom, nifti, bids):
        shutil.rmtree(folder, ignore_errors=True)
    archive = samples.make_demo_archive(dicom)
    session = add_bids_session(dicom)
    (directory / rules).write_text(BIDS_RULES + "\n", encoding="utf-8")
    click.echo(f"sample archive written to {dicom}", err=True)
    src = _location(str(dicom), "source")
    problems: list[str] = []
    code = EXIT_OK
    for target, layout in ((nifti, Layout()), (bids, Layout.bids(rules=json.loads(BIDS_RULES)))):
        dst = _location(str(target), "destination")
        settings = _settings(mode=Mode.LOCAL, workers=workers, state_path=str(local_runtime.default_state_path(dst)))
        request = BatchRequest(sources=(src,), destination=dst, layout=layout)

        def start(local: Any, request: BatchRequest = request) -> tuple[Any, bool]:
            return local_runtime.start_or_resume(local, request)

        code = _run_local(settings, start, False, False)
        batch = _read_context(settings).store.list_batches(limit=1)[0]
        if layout.is_bids:
            problems += check_bids_demo(session, bids, batch)
        else:
            problems += check_demo_result(archive, nifti, batch, extra_series=len(session.series))
    if problems:
        for problem in problems:
            click.echo(f"demo check failed: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(
        f"demo OK (dicomflow exit code {code}: the corrupt series was dead-lettered as expected)\n"
        f"  mirrored outputs: {nifti}  (QA report: {nifti / 'report.html'})\n"
        f"  BIDS dataset:     {bids}  (QA report: {bids / 'report.html'}; rules: {directory / rules})"
    )
