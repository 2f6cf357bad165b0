"""Settings: the only place that reads environment variables.

Every setting has one name. Its environment variable is `DICOMFLOW_<NAME>` and, where the CLI exposes
it, its flag is `--<name-with-dashes>`; a flag given on the command line wins over the variable. Values are
parsed and checked here, at start-up, so a bad value fails fast with the variable named, before any work
is accepted. In the cloud, Terraform sets these variables (infra/worker.tf, infra/functions.tf).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from dicomflow.domain.access import AccessPolicy, Limits, parse_grants, parse_groups
from dicomflow.domain.failures import ConfigError, InvalidInput
from dicomflow.domain.retry import RetryPolicy

ENV_PREFIX = "DICOMFLOW_"


class Mode(StrEnum):
    LOCAL = "local"  # SQLite + the local process-pool queue (the embedded default)
    CLOUD = "cloud"  # Firestore + Cloud Tasks


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


def _setting(default: Any, help_text: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help_text, "secret": secret})


@dataclass(frozen=True)
class Settings:
    mode: Mode = _setting(Mode.LOCAL, "local (SQLite + local queue) or cloud (Firestore + Cloud Tasks)")
    state_path: str = _setting("", "SQLite state file for local mode (default: DEST/.dicomflow/state.sqlite)")
    workers: int = _setting(0, "parallel worker processes in local mode (0 = number of CPU cores)")
    work_dir: str = _setting("", "scratch folder for downloads and dcm2niix output (default: system temp)")
    # Off by default: on the 2-core bench machine it did not pay off (bench/local_overhead.py, README).
    group_small_series: bool = _setting(
        False, "local mode: convert several small series per dcm2niix process where that is exact"
    )

    # Cloud Tasks RetryConfig of the convert queue. Terraform sets the same values on the queue and on
    # the worker from one variable (infra/variables.tf: convert_retry), so "last attempt" cannot drift.
    retry_max_attempts: int = _setting(5, "attempts per series before it is dead-lettered (includes the first)")
    retry_min_backoff_seconds: float = _setting(10.0, "first retry delay (Cloud Tasks min_backoff)")
    retry_max_backoff_seconds: float = _setting(600.0, "longest retry delay (Cloud Tasks max_backoff)")
    retry_max_doublings: int = _setting(4, "times the retry delay doubles before growing linearly")

    # Dispatch deadlines, one per queue, each equal to its handler's timeout (infra/main.tf sets both from
    # one number): Cloud Tasks defaults to 10 minutes for any task that does not set one (GCP_FACTS gotcha 23)
    # and re-dispatches the task while the first attempt may still be running.
    dispatch_deadline_seconds: int = _setting(1800, "Cloud Tasks dispatch deadline of convert tasks (max 1800)")
    expand_dispatch_deadline_seconds: int = _setting(1800, "dispatch deadline of expansion and redrive tasks")
    dead_letter_dispatch_deadline_seconds: int = _setting(300, "dispatch deadline of dead-letter tasks")
    changes_dispatch_deadline_seconds: int = _setting(540, "dispatch deadline of Drive changes tasks")
    answer_margin_seconds: int = _setting(
        60, "an attempt stops working this long before its dispatch deadline, to record the outcome and answer"
    )
    lease_seconds: int = _setting(
        300, "a conversion holds its series this long and renews the lease while it works (heartbeat)"
    )
    convert_timeout_seconds: int = _setting(1500, "dcm2niix is stopped after this many seconds")
    retention_days: int = _setting(30, "batches and their series are deleted this many days after they finish")
    sidecar_extra_keys: str = _setting(
        "", "comma-separated JSON sidecar keys to keep beyond the privacy allow-list (docs/privacy.md); off by default"
    )
    pseudonym_key: str = _setting(
        "",
        "hex secret (32+ bytes) that de-identified folder names are derived from; local mode keeps one per "
        "destination in DEST/.dicomflow/pseudonym.key, the cloud reads it from Secret Manager",
        secret=True,
    )
    memory_budget_mb: int = _setting(0, "refuse series needing more memory/disk than this (0 = no limit)")
    download_concurrency: int = _setting(16, "parallel downloads per series from Drive")
    expand_chunk_files: int = _setting(1000, "files per expansion task when a source is large")
    max_batch_sources: int = _setting(100, "most source folders one batch may list")
    max_batch_series: int = _setting(50_000, "most series one batch may hold")
    idempotency_ttl_hours: int = _setting(24, "how long an Idempotency-Key is remembered")

    allow_local_paths: bool = _setting(False, "accept local folder paths in the batch API (the dev stack only)")
    local_roots: str = _setting(
        "", "comma-separated folders: local paths in the batch API must lie inside one (the dev stack's roots)"
    )

    # Access (issue 11; docs/operations.md "Users, roots and limits"). The caller is the e-mail of the
    # Google-signed ID token on each batch API request, verified here again (signature, audience, expiry).
    auth_certs_url: str = _setting(
        "https://www.googleapis.com/oauth2/v1/certs", "public keys of the ID-token issuer (Google's by default)"
    )
    auth_issuers: str = _setting(
        "https://accounts.google.com,accounts.google.com", "comma-separated accepted `iss` claims of ID tokens"
    )
    auth_audiences: str = _setting(
        "", "comma-separated accepted `aud` claims of batch API tokens (default: DICOMFLOW_PUBLIC_URL)"
    )
    admins: str = _setting("", "comma-separated e-mails (users or groups) who see and act on every batch and watch")
    access_grants: str = _setting(
        "",
        'JSON: {"user-or-group@email": ["drive://ROOT_ID", ...] or {"roots": [...], "max_unfinished_batches": n, '
        '"max_batch_files": n, "max_batch_bytes": n}}; sources and destinations must lie inside the caller\'s roots',
    )
    access_groups: str = _setting(
        "", 'JSON: {"group@email": ["member@email", ...]}: group membership as the grants and admins see it'
    )
    max_unfinished_batches: int = _setting(10, "unfinished batches one submitter may have at once (0 = no limit)")
    max_batch_files: int = _setting(0, "files one batch may list (0 = no limit); checked while listing")
    max_batch_bytes: int = _setting(0, "bytes one batch may list (0 = no limit); checked while listing")

    # cloud wiring (set by Terraform)
    project: str = _setting("", "Google Cloud project id")
    region: str = _setting("", "region of the queues and services")
    firestore_database: str = _setting("(default)", "Firestore database id")
    queue_convert: str = _setting("dicomflow-convert", "Cloud Tasks queue id for convert tasks")
    queue_dead_letter: str = _setting("dicomflow-dead-letter", "Cloud Tasks queue id for dead-letter tasks")
    queue_expand: str = _setting("dicomflow-expand", "Cloud Tasks queue id for expansion tasks")
    queue_changes: str = _setting("dicomflow-changes", "Cloud Tasks queue id for Drive change tasks")
    worker_url: str = _setting("", "URL of the Cloud Run worker (convert task target and OIDC audience)")
    expand_url: str = _setting("", "URL of the expand task handler function")
    dead_letter_url: str = _setting("", "URL of the dead-letter handler function")
    changes_url: str = _setting("", "URL of the Drive changes task handler function")
    public_url: str = _setting("", "public base URL of the batches API (for status links)")
    tasks_service_account: str = _setting("", "service account whose OIDC token Cloud Tasks sends")
    tasks_emulator_host: str = _setting("", "host:port of gcloud-tasks-emulator (dev stack and tests only)")
    tasks_emulator_python: str = _setting(
        ".venv-tasks/bin/python", "Python of the virtualenv holding gcloud-tasks-emulator (dev stack only)"
    )
    reconcile_interval_seconds: int = _setting(
        60, "how often the dev stack runs the reconciler (Cloud Scheduler: 10 min)"
    )

    # clients of the batch API (dicomflow submit/status in cloud mode)
    api_url: str = _setting("", "base URL of the batch API; when set, submit/status talk to it")
    api_token: str = _setting(
        "", "bearer token for the batch API (default: an ID token from Google credentials)", secret=True
    )

    # Google Drive
    drive_credentials: str = _setting("", "user OAuth token file for Drive (empty: the service's own identity)")
    drive_endpoint: str = _setting("", "Drive API base URL override (tests and the fake Drive server only)")
    drive_identity: str = _setting("", "e-mail of the account dicomflow uses on Drive (named in error messages)")
    drive_service_account: str = _setting(
        "", "service account to act as on Drive (one identity for every function; users share folders with it)"
    )
    drive_max_retry_sleep_seconds: float = _setting(32.0, "longest pause between retries of a Drive request")
    webhook_url: str = _setting("", "HTTPS address Drive sends push notifications to")
    webhook_token: str = _setting("", "shared secret Drive echoes in X-Goog-Channel-Token", secret=True)
    settle_seconds: int = _setting(300, "a watched folder is converted once quiet for this long")
    webhook_window_seconds: int = _setting(10, "Drive notifications within this window share one read of the feed")
    channel_ttl_seconds: int = _setting(604_800, "requested lifetime of a Drive changes channel (max 1 week)")
    channel_renew_before_seconds: int = _setting(172_800, "renew a channel this long before it expires")

    log_format: LogFormat = _setting(LogFormat.TEXT, "json (one object per line, for Cloud Logging) or text")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.retry_max_attempts,
            min_backoff_seconds=self.retry_min_backoff_seconds,
            max_backoff_seconds=self.retry_max_backoff_seconds,
            max_doublings=self.retry_max_doublings,
        )

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def access_policy(self) -> AccessPolicy:
        """Administrators, granted roots, groups and limits, parsed from their settings (checked at start-up)."""
        return AccessPolicy(
            admins=frozenset(a.lower() for a in _items(self.admins)),
            grants=parse_grants(_json(self.access_grants, "access_grants"), env_name("access_grants")),
            groups=parse_groups(_json(self.access_groups, "access_groups"), env_name("access_groups")),
            default_limits=Limits(self.max_unfinished_batches, self.max_batch_files, self.max_batch_bytes),
        )

    @property
    def audiences(self) -> tuple[str, ...]:
        """Accepted `aud` claims of batch API tokens: DICOMFLOW_AUTH_AUDIENCES, else the API's public URL."""
        return _items(self.auth_audiences) or _items(self.public_url.rstrip("/"))

    @property
    def task_audiences(self) -> tuple[str, ...]:
        """Accepted `aud` claims of task tokens: Cloud Tasks sets the target URL (adapters/cloud_tasks.py), and
        every target is ours and called by the same service account, so any of them is accepted."""
        urls = (self.worker_url, self.expand_url, self.dead_letter_url, self.changes_url)
        return tuple(sorted({u for u in urls if u} | {u.rstrip("/") for u in urls if u}))


def _items(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _json(text: str, name: str) -> object:
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{env_name(name)} is not valid JSON: {exc}") from None


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def describe(setting: str) -> str:
    """Help text of a setting with its variable name, for CLI --help."""
    for f in fields(Settings):
        if f.name == setting:
            return f"{f.metadata['help']} [env: {env_name(setting)}]"
    raise KeyError(setting)


def _convert(name: str, kind: Any, raw: Any) -> Any:
    if isinstance(raw, str):
        raw = raw.strip()
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            return _boolean(raw)
        if kind in (Mode, "Mode"):
            return Mode(str(raw).lower())
        if kind in (LogFormat, "LogFormat"):
            return LogFormat(str(raw).lower())
        return str(raw)
    except ValueError as exc:
        raise ConfigError(f"{env_name(name)}={raw!r} is not a valid value: {exc}") from exc


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("use true or false")
    return text in ("true", "1", "yes")


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, with explicit overrides (CLI flags) on top. None overrides are
    ignored, so a CLI can pass every option through and only the ones the user gave take effect."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        override = overrides.get(f.name)
        if override is not None:
            values[f.name] = _convert(f.name, f.type, override)
        elif env_name(f.name) in env and env[env_name(f.name)] != "":
            values[f.name] = _convert(f.name, f.type, env[env_name(f.name)])
    if not values.get("project"):
        # The Google client libraries and Cloud Run set these; accept them so nothing is configured twice.
        for fallback in ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"):
            if env.get(fallback):
                values["project"] = env[fallback]
                break
    unknown = set(overrides) - {f.name for f in fields(Settings)}
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    try:
        return Settings(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


_CHECKS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("workers", lambda v: 0 <= v <= 256, "must be between 0 and 256"),
    ("retry_max_attempts", lambda v: 1 <= v <= 100, "must be between 1 and 100"),
    ("retry_min_backoff_seconds", lambda v: v >= 0, "must be >= 0"),
    ("retry_max_doublings", lambda v: 0 <= v <= 16, "must be between 0 and 16"),
    (
        "dispatch_deadline_seconds",
        lambda v: 15 <= v <= 1800,
        "must be between 15 and 1800 (Cloud Tasks limits)",
    ),
    ("convert_timeout_seconds", lambda v: v >= 1, "must be >= 1"),
    ("lease_seconds", lambda v: 10 <= v <= 3600, "must be between 10 and 3600"),
    ("answer_margin_seconds", lambda v: 0 <= v <= 600, "must be between 0 and 600"),
    (
        "expand_dispatch_deadline_seconds",
        lambda v: 15 <= v <= 1800,
        "must be between 15 and 1800 (Cloud Tasks limits)",
    ),
    (
        "dead_letter_dispatch_deadline_seconds",
        lambda v: 15 <= v <= 1800,
        "must be between 15 and 1800 (Cloud Tasks limits)",
    ),
    (
        "changes_dispatch_deadline_seconds",
        lambda v: 15 <= v <= 1800,
        "must be between 15 and 1800 (Cloud Tasks limits)",
    ),
    ("retention_days", lambda v: 1 <= v <= 3650, "must be between 1 and 3650"),
    ("reconcile_interval_seconds", lambda v: v >= 1, "must be >= 1"),
    ("memory_budget_mb", lambda v: v >= 0, "must be >= 0"),
    ("download_concurrency", lambda v: 1 <= v <= 64, "must be between 1 and 64"),
    ("drive_max_retry_sleep_seconds", lambda v: v >= 0, "must be >= 0"),
    ("expand_chunk_files", lambda v: 10 <= v <= 5000, "must be between 10 and 5000"),
    ("max_batch_sources", lambda v: v >= 1, "must be >= 1"),
    ("max_batch_series", lambda v: v >= 1, "must be >= 1"),
    ("idempotency_ttl_hours", lambda v: v >= 1, "must be >= 1"),
    ("max_unfinished_batches", lambda v: v >= 0, "must be >= 0"),
    ("max_batch_files", lambda v: v >= 0, "must be >= 0"),
    ("max_batch_bytes", lambda v: v >= 0, "must be >= 0"),
    ("settle_seconds", lambda v: v >= 0, "must be >= 0"),
    ("webhook_window_seconds", lambda v: 1 <= v <= 600, "must be between 1 and 600"),
    ("channel_ttl_seconds", lambda v: 60 <= v <= 604_800, "must be between 60 and 604800 (Drive's maximum)"),
    ("channel_renew_before_seconds", lambda v: v >= 0, "must be >= 0"),
    (
        "log_level",
        lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
        "must be DEBUG/INFO/WARNING/ERROR",
    ),
    (
        "webhook_token",
        lambda v: len(v) <= 256,
        "must be at most 256 characters (Drive's channel token limit)",
    ),
    ("pseudonym_key", lambda v: v == "" or _is_hex_key(v), "must be at least 32 bytes written in hex"),
]


def _is_hex_key(value: str) -> bool:
    try:
        return len(bytes.fromhex(value)) >= 32
    except ValueError:
        return False


def _validate(settings: Settings) -> None:
    for name, ok, message in _CHECKS:
        if not ok(getattr(settings, name)):
            raise ConfigError(f"{env_name(name)}={getattr(settings, name)!r} {message}")
    if settings.retry_max_backoff_seconds < settings.retry_min_backoff_seconds:
        raise ConfigError(f"{env_name('retry_max_backoff_seconds')} must be >= {env_name('retry_min_backoff_seconds')}")
    try:
        settings.access_policy  # noqa: B018 - parsed now so a bad grant fails at start-up, naming the variable
    except InvalidInput as exc:
        raise ConfigError(f"{exc.field}: {exc.reason}") from None
    if settings.convert_timeout_seconds >= settings.dispatch_deadline_seconds and settings.mode is Mode.CLOUD:
        raise ConfigError(
            f"{env_name('convert_timeout_seconds')} must be shorter than "
            f"{env_name('dispatch_deadline_seconds')}, or Cloud Tasks re-dispatches a series still converting"
        )
