"""Offline checks of infra/ (no `terraform init` here: no provider downloads).

What they prove: every file parses; every resource matches the Google provider's real schema
(tests/infra/data/, vendored); every reference resolves; variables and outputs are
documented; the retry settings of the convert queue and of the worker come from one variable and equal
the code's defaults (DESIGN.md invariant 5); every DICOMFLOW_* variable is a real setting; every
log-metric event is one the code really logs; checkov and `terraform fmt` are clean.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicomflow.config import Settings, env_name
from dicomflow.domain.retry import CONTROL_POLICY, RetryPolicy
from dicomflow.events import Event
from tests.infra import tfcheck
from tests.infra.tfcheck import INFRA_DIR, REPO_ROOT, ProviderSchema, TfModule

pytestmark = pytest.mark.infra

SRC_DIR = REPO_ROOT / "src" / "dicomflow"
TF_FILES = sorted(INFRA_DIR.glob("*.tf"))
CONCERN_FILES = (
    "versions.tf",
    "variables.tf",
    "outputs.tf",
    "main.tf",
    "apis.tf",
    "iam.tf",
    "queues.tf",
    "firestore.tf",
    "worker.tf",
    "functions.tf",
    "storage.tf",
    "secrets.tf",
    "scheduler.tf",
    "observability.tf",
    "registry.tf",
)

RETRY_FIELDS = ("max_attempts", "min_backoff_seconds", "max_backoff_seconds", "max_doublings")
# Queue RetryConfig argument -> RetryPolicy field.
QUEUE_RETRY_ARGS = {
    "max_attempts": "max_attempts",
    "min_backoff": "min_backoff_seconds",
    "max_backoff": "max_backoff_seconds",
    "max_doublings": "max_doublings",
}
QUEUE_SUFFIXES = {"convert", "dead-letter", "expand", "changes"}
FUNCTION_CONTRACT = {
    "batches": "batches_api",
    "expand": "expand_task",
    "dead-letter": "dead_letter_task",
    "changes": "drive_changes_task",
    "reconcile": "reconcile",
    "renew": "renew_channels",
    "webhook": "drive_webhook",
}

_EVENT_FILTER = re.compile(r'jsonPayload\.event\s*=\s*\\?"([^"\\]+)\\?"')
_EXTRACTED_FIELD = re.compile(r"(?:REGEXP_)?EXTRACT\(\s*jsonPayload\.([A-Za-z_][\w]*)")
_ENV_NAME = re.compile(r"DICOMFLOW_[A-Z0-9_]+(?![A-Za-z0-9_*])")
_RETRY_ENV_ASSIGNMENT = re.compile(r'"?(DICOMFLOW_RETRY_[A-Z_]+)"?\s*=\s*([^\n]+)')
_TEMPLATE_REFERENCE = re.compile(r"^\$\{\s*((?:var|local)\.[\w.\[\]\"-]+?)\s*\}(s?)$")


def _infra_text() -> str:
    return "\n".join(tfcheck.strip_comments(path.read_text(encoding="utf-8")) for path in TF_FILES)


def _source_texts() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(SRC_DIR.rglob("*.py"))}


# Log sources other than dicomflow's own lines that a log-based metric may read (resource.type of the
# entries): Cloud Tasks' attempt logs and Cloud Scheduler's job logs. Their fields are Google's, not ours.
GOOGLE_LOG_RESOURCES = ("cloud_tasks_queue", "cloud_scheduler_job")


def _own_log_metric_texts() -> list[str]:
    """Filter + extractors of the log-based metrics that count dicomflow's own events."""
    try:
        module = TfModule.load(INFRA_DIR)
    except Exception:  # reported by test_every_tf_file_parses
        return []
    texts = []
    for metric in module.resources("google_logging_metric"):
        text = json.dumps({k: v for k, v in metric.body.items() if k != "__comments__"})
        if "jsonPayload.event" in text:
            texts.append(text)
    return texts


# Collected at import for parametrization (a parse failure here shows up in test_every_tf_file_parses).
INFRA_TEXT = _infra_text() if INFRA_DIR.is_dir() else ""
FILTER_EVENTS = sorted(set(_EVENT_FILTER.findall(INFRA_TEXT)))
EXTRACTED_FIELDS = sorted({f for text in _own_log_metric_texts() for f in _EXTRACTED_FIELD.findall(text)})


@pytest.fixture(scope="module")
def module() -> TfModule:
    return TfModule.load(INFRA_DIR)


@pytest.fixture(scope="module")
def schema() -> ProviderSchema:
    path = tfcheck.schema_path()
    if not path.is_file():
        pytest.fail(f"provider schema not found at {path} (tests/infra/data/README.md says how to make it)")
    return ProviderSchema.load(path)


# --- 1. parsing ---------------------------------------------------------------------------------------------


def test_infra_is_split_by_concern() -> None:
    missing = [name for name in CONCERN_FILES if not (INFRA_DIR / name).is_file()]
    assert not missing, f"infra/ lacks {missing}"


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: p.name)
def test_every_tf_file_parses(path: Path) -> None:
    parsed = tfcheck.hcl2.loads(path.read_text(encoding="utf-8"))
    assert isinstance(parsed, dict)


# --- 2. provider schema -------------------------------------------------------------------------------------


def test_resources_match_provider_schema(module: TfModule, schema: ProviderSchema) -> None:
    errors = tfcheck.schema_errors(module, schema)
    assert not errors, "\n".join(errors)


def test_schema_checker_catches_mistakes(schema: ProviderSchema) -> None:
    """The checker itself: each mistake below must be reported (otherwise the test above proves nothing)."""
    bad = TfModule.from_texts(
        INFRA_DIR,
        {
            "bad.tf": """
resource "google_cloud_tasks_queue" "q" {
  name  = "q"
  state = "RUNNING"
  colour = "red"
  retry_config = { max_attempts = 3 }
  rate_limits {
    max_burst_size = 10
  }
}
resource "google_cloud_run_v2_service" "s" {
  location = "x"
  name     = "s"
}
resource "google_made_up_thing" "t" {}
resource "google_cloud_run_v2_service" "d" {
  location = "x"
  name     = "d"
  template {
    dynamic "containerz" {
      for_each = []
      content {}
    }
  }
}
""",
        },
    )
    errors = "\n".join(tfcheck.schema_errors(bad, schema))
    for expected in (
        "google_cloud_tasks_queue.q: required argument `location` is missing",
        "google_cloud_tasks_queue.q.state: is read-only",
        "google_cloud_tasks_queue.q.colour: unknown argument",
        "google_cloud_tasks_queue.q.retry_config: is a nested block",
        "google_cloud_tasks_queue.q.rate_limits.max_burst_size: is read-only",
        "google_cloud_run_v2_service.s: required block `template` is missing",
        "unknown resource type `google_made_up_thing`",
        "dynamic[containerz]: `containerz` is not a nested block",
    ):
        assert expected in errors, f"checker missed: {expected}\n{errors}"


# --- 3. references ------------------------------------------------------------------------------------------


def test_references_resolve(module: TfModule, schema: ProviderSchema) -> None:
    errors = tfcheck.reference_errors(module, schema)
    assert not errors, "\n".join(errors)


def test_reference_checker_catches_undeclared(schema: ProviderSchema) -> None:
    bad = TfModule.from_texts(
        INFRA_DIR,
        {
            "bad.tf": """
variable "a" {
  type        = string
  description = "a"
}
locals {
  b = "${var.a}-${var.missing}"
  c = local.nope
  d = "literal var.not_a_reference"
}
resource "google_service_account" "x" {
  account_id = "${local.b}${google_service_account.y.email}${data.google_project.p.number}"
  display_name = google_cloud_run_v2_servce.w.uri
}
""",
        },
    )
    errors = "\n".join(tfcheck.reference_errors(bad, schema))
    for expected in (
        "`missing`",
        "`nope`",
        "`google_service_account.y`",
        "`google_project.p`",
        "google_cloud_run_v2_servce",
    ):
        assert expected in errors, f"checker missed {expected}\n{errors}"
    assert "not_a_reference" not in errors


# --- 4. documentation ---------------------------------------------------------------------------------------


def test_variables_have_type_and_description(module: TfModule) -> None:
    variables = module.variables()
    assert variables
    bad = [
        name
        for name, body in variables.items()
        if "type" not in body or not tfcheck.unquote(str(body.get("description", ""))).strip()
    ]
    assert not bad, f"variables without a type or a description: {bad}"


def test_outputs_have_description(module: TfModule) -> None:
    outputs = module.outputs()
    assert outputs
    bad = [name for name, body in outputs.items() if not tfcheck.unquote(str(body.get("description", ""))).strip()]
    assert not bad, f"outputs without a description: {bad}"


# --- 5. invariant 5: one source of truth for retry settings -------------------------------------------------


def _lookup(module: TfModule, path: str) -> Any:
    """Value of `var.x.y` (the default) or `local.x.y` (the literal), or None when not a literal."""
    parts = [p for p in re.split(r"[.\[\]\"]+", path) if p]
    root, name, rest = parts[0], parts[1], parts[2:]
    if root == "var":
        value: Any = module.variables().get(name, {}).get("default")
    else:
        value = module.locals().get(name)
    for key in rest:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return tfcheck.literal(value)


def _resolve_number(module: TfModule, raw: Any) -> float | None:
    """A number written literally, as a duration ("10s"), or as `${var.x.f}` / `"${local.x.f}s"`."""
    seconds = tfcheck.seconds(raw)
    if seconds is not None:
        return seconds
    if isinstance(raw, str):
        match = _TEMPLATE_REFERENCE.match(tfcheck.unquote(raw))
        if match:
            value = _lookup(module, match.group(1))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def _queue_name(module: TfModule, queue: tfcheck.Block) -> list[str]:
    """Resolved queue name(s) of a google_cloud_tasks_queue (one per for_each key)."""
    raw = queue.body.get("name")
    for_each = queue.body.get("for_each")
    candidates = [raw]
    if raw == "${each.value}" and isinstance(for_each, dict):
        candidates = [value for _, value in tfcheck.body_items(for_each)]
    names = []
    for candidate in candidates:
        text = tfcheck.unquote(str(candidate))
        match = _TEMPLATE_REFERENCE.match(text)
        if match:
            text = tfcheck.unquote(str(_lookup(module, match.group(1))))
        names.append(text)
    return names


def _queues(module: TfModule) -> dict[str, tfcheck.Block]:
    """Queue suffix (convert, dead-letter, ...) -> resource."""
    found: dict[str, tfcheck.Block] = {}
    for queue in module.resources("google_cloud_tasks_queue"):
        for name in _queue_name(module, queue):
            suffix = next((s for s in QUEUE_SUFFIXES if name.endswith(f"-{s}")), name)
            found[suffix] = queue
    return found


def _default_errors(module: TfModule) -> list[str]:
    default = module.variables().get("convert_retry", {}).get("default")
    if not isinstance(default, dict):
        return ["variables.tf: convert_retry has no object default"]
    errors = []
    policy = RetryPolicy()
    settings = Settings()
    for field in RETRY_FIELDS:
        tf_value = default.get(field)
        if tf_value != getattr(policy, field):
            errors.append(f"convert_retry.{field} default is {tf_value}, RetryPolicy() has {getattr(policy, field)}")
        if tf_value != getattr(settings, f"retry_{field}"):
            errors.append(
                f"convert_retry.{field} default is {tf_value}, Settings().retry_{field} is "
                f"{getattr(settings, f'retry_{field}')}"
            )
    return errors


def _convert_queue_errors(module: TfModule) -> list[str]:
    queue = _queues(module).get("convert")
    if queue is None:
        return ["no google_cloud_tasks_queue named <prefix>-convert"]
    try:
        retry = tfcheck.single_block(queue.body, "retry_config")
    except KeyError as exc:
        return [f"{queue.address}: {exc}"]
    errors = []
    for arg, field in QUEUE_RETRY_ARGS.items():
        raw = tfcheck.unquote(str(retry.get(arg, "")))
        expected = f"${{var.convert_retry.{field}}}" + ("s" if arg.endswith("backoff") else "")
        if raw != expected:
            errors.append(f"{queue.address}.retry_config.{arg} = {raw!r}; it must be {expected!r}")
    return errors


def _retry_env_errors(module: TfModule) -> list[str]:
    """Every place that sets DICOMFLOW_RETRY_* (map entries anywhere, env blocks) reads var.convert_retry."""
    errors = []
    wanted = {env_name(f"retry_{field}"): field for field in RETRY_FIELDS}
    seen: set[str] = set()
    for name, value in _RETRY_ENV_ASSIGNMENT.findall(module.text_without_comments()):
        seen.add(name)
        field = wanted.get(name)
        if field is None:
            errors.append(f"{name} is not a retry setting")
        elif f"var.convert_retry.{field}" not in value:
            errors.append(f"{name} = {value.strip()} does not read var.convert_retry.{field}")
    for block in module.resources():
        for env in _env_blocks(block.body):
            name = tfcheck.unquote(str(env.get("name", "")))
            if name in wanted:
                seen.add(name)
                if f"var.convert_retry.{wanted[name]}" not in str(env.get("value", "")):
                    errors.append(f"{block.address}: env {name} does not read var.convert_retry.{wanted[name]}")
    errors.extend(f"{name} is never set" for name in sorted(set(wanted) - seen))
    return errors


def _env_blocks(body: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(body, dict):
        for key, value in tfcheck.body_items(body):
            if key == "env" and tfcheck.is_block_list(value):
                found.extend(value)
            else:
                found.extend(_env_blocks(value))
    elif isinstance(body, list):
        for item in body:
            found.extend(_env_blocks(item))
    return found


def _retry_env_locals(module: TfModule) -> set[str]:
    retry_names = {env_name(f"retry_{field}") for field in RETRY_FIELDS}
    return {
        name
        for name, value in module.locals().items()
        if isinstance(value, dict) and retry_names <= {tfcheck.unquote(k) for k in value}
    }


def _env_expressions(block: tfcheck.Block) -> list[str]:
    """Expressions that make up a service's environment (Cloud Run env blocks or function env maps)."""
    found = []
    containers = [c for t in block.body.get("template", []) for c in t.get("containers", [])]
    for container in containers:
        for dyn in container.get("dynamic", []):
            for label, body in tfcheck.body_items(dyn):
                if tfcheck.unquote(label) == "env":
                    found.append(str(body.get("for_each", "")))
        found.extend(json.dumps(env) for env in container.get("env", []))
    for service_config in block.body.get("service_config", []):
        found.append(str(service_config.get("environment_variables", "")))
    return found


def _retry_env_reach_errors(module: TfModule) -> list[str]:
    retry_locals = _retry_env_locals(module)
    if not retry_locals:
        return ["no local map sets all DICOMFLOW_RETRY_* variables"]
    errors = []
    services = module.resources("google_cloud_run_v2_service") + module.resources("google_cloudfunctions2_function")
    for block in services:
        expressions = _env_expressions(block)
        reached = set().union(*(tfcheck.local_dependencies(module, e) for e in expressions)) if expressions else set()
        static = {tfcheck.unquote(str(env.get("name", ""))) for env in _env_blocks(block.body)}
        has_static = {env_name(f"retry_{f}") for f in RETRY_FIELDS} <= static
        if not (reached & retry_locals or has_static):
            errors.append(f"{block.address}: its environment does not include local.{sorted(retry_locals)[0]}")
    if not module.resources("google_cloud_run_v2_service"):
        errors.append("no Cloud Run worker")
    return errors


def _control_queue_errors(module: TfModule) -> list[str]:
    errors = []
    queues = _queues(module)
    for suffix in sorted(QUEUE_SUFFIXES - {"convert"}):
        queue = queues.get(suffix)
        if queue is None:
            errors.append(f"no google_cloud_tasks_queue named <prefix>-{suffix}")
            continue
        retry = tfcheck.single_block(queue.body, "retry_config")
        for arg, field in QUEUE_RETRY_ARGS.items():
            value = _resolve_number(module, retry.get(arg))
            if value != float(getattr(CONTROL_POLICY, field)):
                errors.append(
                    f"{queue.address} ({suffix}).retry_config.{arg} = {retry.get(arg)!r} -> {value}; "
                    f"CONTROL_POLICY.{field} is {getattr(CONTROL_POLICY, field)}"
                )
    return errors


INVARIANT5_CHECKS: tuple[Callable[[TfModule], list[str]], ...] = (
    _default_errors,
    _convert_queue_errors,
    _retry_env_errors,
    _retry_env_reach_errors,
    _control_queue_errors,
)


def _invariant5_errors(module: TfModule) -> list[str]:
    return [error for check in INVARIANT5_CHECKS for error in check(module)]


def test_convert_retry_default_equals_retry_policy_and_settings(module: TfModule) -> None:
    assert RetryPolicy() == Settings().retry_policy
    errors = _default_errors(module)
    assert not errors, "\n".join(errors)


def test_convert_queue_retry_config_reads_convert_retry(module: TfModule) -> None:
    errors = _convert_queue_errors(module)
    assert not errors, "\n".join(errors)


def test_retry_env_reads_convert_retry(module: TfModule) -> None:
    errors = _retry_env_errors(module)
    assert not errors, "\n".join(errors)


def test_worker_and_functions_get_retry_env(module: TfModule) -> None:
    errors = _retry_env_reach_errors(module)
    assert not errors, "\n".join(errors)


def test_control_queues_use_control_policy(module: TfModule) -> None:
    errors = _control_queue_errors(module)
    assert not errors, "\n".join(errors)


def _sub_in_block(pattern: str, replacement: str, anchor: str) -> Callable[[str], str]:
    """A substitution applied once, after `anchor` (so it hits the intended block)."""

    def apply(text: str) -> str:
        start = text.find(anchor)
        if start < 0:
            return text
        head, tail = text[:start], text[start:]
        return head + re.sub(pattern, replacement, tail, count=1)

    return apply


# One side changed, the other not: each must break invariant 5. If a target is no longer found, update the
# mutation together with the infra change (the test says so).
MUTATIONS = {
    "default max_attempts only": (
        "variables.tf",
        _sub_in_block(r"(max_attempts\s*=\s*)5\b", r"\g<1>6", 'variable "convert_retry"'),
    ),
    "default min_backoff only": (
        "variables.tf",
        _sub_in_block(r"(min_backoff_seconds\s*=\s*)10(\.0)?\b", r"\g<1>15.0", 'variable "convert_retry"'),
    ),
    "queue max_attempts literal": (
        "queues.tf",
        _sub_in_block(
            r"max_attempts(\s*)=\s*var\.convert_retry\.max_attempts", r"max_attempts\g<1>= 5", "retry_config"
        ),
    ),
    "queue min_backoff reads another field": (
        "queues.tf",
        _sub_in_block(
            r"var\.convert_retry\.min_backoff_seconds", "var.convert_retry.max_backoff_seconds", "retry_config"
        ),
    ),
    "worker env literal doublings": (
        "main.tf",
        _sub_in_block(
            r"(DICOMFLOW_RETRY_MAX_DOUBLINGS\s*=\s*)tostring\(var\.convert_retry\.max_doublings\)",
            r'\g<1>"4"',
            "retry_env",
        ),
    ),
    "retry env dropped from the shared environment": (
        "main.tf",
        _sub_in_block(r"merge\(local\.retry_env,\s*", "merge(", "shared_env"),
    ),
    "control queue attempts": ("main.tf", _sub_in_block(r"(max_attempts\s*=\s*)10\b", r"\g<1>9", "control_retry = {")),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_invariant5_fails_when_one_side_changes(module: TfModule, mutation: str) -> None:
    file_name, apply = MUTATIONS[mutation]
    texts = {path.name: text for path, text in module.texts.items()}
    mutated = apply(texts[file_name])
    assert mutated != texts[file_name], f"mutation {mutation!r} found nothing to change in {file_name}: update it"
    texts[file_name] = mutated
    assert _invariant5_errors(TfModule.from_texts(INFRA_DIR, texts)), f"{mutation!r} went unnoticed"


# --- 6. environment names -----------------------------------------------------------------------------------


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k != "__comments__" for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def test_dicomflow_env_names_are_settings(module: TfModule) -> None:
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    used = {name for parsed in module.files.values() for s in _strings(parsed) for name in _ENV_NAME.findall(s)}
    assert used, "infra/ sets no DICOMFLOW_* variable"
    unknown = sorted(used - known)
    assert not unknown, f"not settings of dicomflow.config.Settings: {unknown}"


# --- 7. log-based metrics follow the code's events ---------------------------------------------------------


def test_log_metrics_filter_on_events() -> None:
    assert FILTER_EVENTS, "no jsonPayload.event filter in infra/"
    assert {"series_succeeded", "series_dead_lettered", "batch_completed"} <= set(FILTER_EVENTS)


@pytest.mark.parametrize("event", FILTER_EVENTS)
def test_filtered_event_is_logged_by_the_code(event: str) -> None:
    members = {e.value: e.name for e in Event}
    assert event in members, f"jsonPayload.event={event!r} is not a member of dicomflow.events.Event"
    usage = re.compile(rf"\bEvent\.{members[event]}\b")
    users = [p for p, text in _source_texts().items() if p.name != "events.py" and usage.search(text)]
    assert users, f"no module under src/dicomflow logs Event.{members[event]} ({event!r}): the metric would stay at 0"


def test_every_log_metric_reads_dicomflow_events_or_a_known_google_log(module: TfModule) -> None:
    metrics = module.resources("google_logging_metric")
    assert metrics
    for metric in metrics:
        log_filter = str(metric.body.get("filter", ""))
        own = "jsonPayload.event" in log_filter
        google = [r for r in GOOGLE_LOG_RESOURCES if f'resource.type=\\"{r}\\"' in log_filter]
        assert own != bool(google), f"{metric.address}: filter on dicomflow events or on one Google log: {log_filter}"
    assert EXTRACTED_FIELDS, "no metric extracts a field of dicomflow's own events"


def test_task_attempt_logs_are_on_for_every_queue(module: TfModule) -> None:
    """The task-attempt metric exists only if every queue logs its attempts (stackdriver_logging_config),
    and the sampling ratio variable cannot switch that off."""
    queues = module.resources("google_cloud_tasks_queue")
    assert queues
    for queue in queues:
        logging_config = tfcheck.single_block(queue.body, "stackdriver_logging_config")
        assert "var.tasks_logging_sampling_ratio" in str(logging_config.get("sampling_ratio")), queue.address
    validation = module.variables()["tasks_logging_sampling_ratio"]["validation"][0]
    assert "> 0" in str(validation["condition"])


@pytest.mark.parametrize("field", EXTRACTED_FIELDS)
def test_extracted_field_is_logged_by_the_code(field: str) -> None:
    pattern = re.compile(rf"[\"']{field}[\"']|\b{field}\s*=")
    users = [p for p, text in _source_texts().items() if pattern.search(text)]
    assert users, f"jsonPayload.{field} is extracted by a log metric but no code under src/dicomflow logs it"


# --- 8. checkov ---------------------------------------------------------------------------------------------


def _checkov() -> Path:
    configured = os.environ.get("DICOMFLOW_CHECKOV")
    if configured:
        if not Path(configured).is_file():
            pytest.fail(f"DICOMFLOW_CHECKOV={configured} does not exist")
        return Path(configured)
    default = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"
    if default.is_file():
        return default
    reason = "checkov not found: set DICOMFLOW_CHECKOV or run `make tools` (creates .venv-checkov)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _checkov_reports(checkov: Path, args: list[str], *, quiet: bool = True) -> list[dict[str, Any]]:
    flags = ["--skip-download", "--compact", "--output", "json"] + (["--quiet"] if quiet else [])
    proc = subprocess.run(
        [str(checkov), *args, *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode not in (0, 1):
        pytest.fail(f"checkov failed to run (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout)
    reports = data if isinstance(data, list) else [data]
    return [r for r in reports if "summary" in r]


CHECKOV_TARGETS = (
    ["--directory", "infra", "--framework", "terraform"],
    ["--file", "container/Dockerfile", "--framework", "dockerfile"],
)


def test_checkov_passes_with_explained_skips() -> None:
    checkov = _checkov()
    reports = [r for target in CHECKOV_TARGETS for r in _checkov_reports(checkov, target)]
    assert reports, "checkov produced no report"
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    assert not any(r["summary"].get("parsing_errors") for r in reports), "checkov could not parse some files"
    assert sum(r["summary"].get("passed", 0) for r in reports) > 0, "checkov ran no check"
    if not any(r["summary"].get("skipped") for r in reports):
        return
    # --quiet leaves skipped checks out of the JSON: ask again in full to read their reasons.
    full = [r for target in CHECKOV_TARGETS for r in _checkov_reports(checkov, target, quiet=False)]
    skipped = [c for r in full for c in r.get("results", {}).get("skipped_checks", [])]
    assert skipped, "checkov reports skipped checks but lists none"
    unexplained = [
        f"{c['check_id']} {c['resource']}"
        for c in skipped
        if len((c.get("check_result", {}).get("suppress_comment") or "").strip()) < 15
        or (c.get("check_result", {}).get("suppress_comment") or "").startswith("No comment")
    ]
    assert not unexplained, f"skipped without a written reason: {unexplained}"


def test_checkov_skip_comments_carry_a_reason() -> None:
    texts = [p.read_text(encoding="utf-8") for p in [*TF_FILES, REPO_ROOT / "container" / "Dockerfile"] if p.is_file()]
    skips = [m for text in texts for m in re.finditer(r"checkov:skip=(\w+)(:?)(.*)", text)]
    bare = [m.group(1) for m in skips if not m.group(2) or len(m.group(3).strip()) < 15]
    assert not bare, f"checkov skips without a reason (write #checkov:skip=ID:why): {bare}"
    config = INFRA_DIR / ".checkov.yaml"
    if config.is_file():
        lines = config.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*-\s*CKV", line):
                commented = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
                assert commented, f"{config.name}:{i + 1}: skipped check without a comment saying why"


# --- 9. terraform fmt ---------------------------------------------------------------------------------------


def test_terraform_fmt() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not on PATH (optional check)")
    proc = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", "-no-color", "infra"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"terraform fmt would change:\n{proc.stdout}{proc.stderr}"


# --- contract with the code and with DESIGN.md ------------------------------------------------------------


def test_four_queues_exist(module: TfModule) -> None:
    assert set(_queues(module)) == QUEUE_SUFFIXES


def test_functions_match_entry_points(module: TfModule) -> None:
    functions = module.locals().get("functions")
    assert isinstance(functions, dict), "main.tf: local.functions must be a literal map"
    declared = {}
    for value in functions.values():
        name = tfcheck.unquote(str(value["name"]))
        declared[name.split("}-", 1)[-1]] = tfcheck.unquote(str(value["entry_point"]))
    assert declared == FUNCTION_CONTRACT
    main = REPO_ROOT / "functions" / "main.py"
    if not main.is_file():
        pytest.skip("functions/main.py does not exist yet: entry points not checked against it")
    source = main.read_text(encoding="utf-8")
    missing = [ep for ep in FUNCTION_CONTRACT.values() if not re.search(rf"^def {ep}\(", source, re.MULTILINE)]
    assert not missing, f"functions/main.py defines no {missing}"


def test_worker_converts_one_series_at_a_time_within_the_deadline(module: TfModule) -> None:
    (worker,) = module.resources("google_cloud_run_v2_service")
    template = tfcheck.single_block(worker.body, "template")
    assert tfcheck.literal(template["max_instance_request_concurrency"]) == 1
    assert tfcheck.unquote(template["timeout"]) == "${var.dispatch_deadline_seconds}s"
    assert tfcheck.literal(worker.body["deletion_protection"]) is True or "var.deletion_protection" in str(
        worker.body["deletion_protection"]
    )
    deadline = module.variables()["dispatch_deadline_seconds"]["default"]
    assert deadline == Settings().dispatch_deadline_seconds
    assert Settings().convert_timeout_seconds == deadline - 300


def test_iam_is_additive_only(module: TfModule) -> None:
    authoritative = [b.address for b in module.resources() if b.type.endswith(("_iam_policy", "_iam_binding"))]
    assert not authoritative, f"use *_iam_member only: {authoritative}"


def test_every_alert_is_documented_and_notifies(module: TfModule) -> None:
    alerts = module.resources("google_monitoring_alert_policy")
    assert len(alerts) >= 5
    for alert in alerts:
        documentation = tfcheck.single_block(alert.body, "documentation")
        assert len(tfcheck.unquote(str(documentation.get("content", "")))) > 200, alert.address
        assert "notification_channels" in alert.body, alert.address


def test_provider_is_pinned(module: TfModule) -> None:
    (terraform,) = [entry for parsed in module.files.values() for entry in parsed.get("terraform", [])]
    assert tfcheck.unquote(terraform["required_version"]) == ">= 1.5"
    google = terraform["required_providers"][0]["google"]
    assert tfcheck.unquote(google["source"]) == "hashicorp/google"
    assert tfcheck.unquote(google["version"]) == "~> 7.0"
