"""API rules on values (tests/infra/constraints.py): infra/ meets each one, each one checks real values,
and each one reports a mistake planted in a copy of infra/ (so none of them can pass by checking nothing)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.infra import constraints
from tests.infra.tfcheck import INFRA_DIR, TfModule

pytestmark = pytest.mark.infra

Mutation = Callable[[str], str]


def after(anchor: str, pattern: str, replacement: str) -> Mutation:
    """Replace the first match of `pattern` that follows `anchor` (so it hits the intended block)."""

    def apply(text: str) -> str:
        start = text.find(anchor)
        if start < 0:
            return text
        return text[:start] + re.sub(pattern, replacement, text[start:], count=1, flags=re.DOTALL)

    return apply


def repeat_first_condition(anchor: str, copies: int) -> Mutation:
    def apply(text: str) -> str:
        start = text.find(anchor)
        block_start = text.find("  conditions {", start)
        block_end = text.find("\n  }\n", block_start) + len("\n  }\n")
        if start < 0 or block_start < 0:
            return text
        block = text[block_start:block_end]
        return text[:block_end] + ("\n" + block) * copies + text[block_end:]

    return apply


DEAD_LETTERS = 'resource "google_monitoring_alert_policy" "dead_letters"'
FAILURE_RATE = 'resource "google_monitoring_alert_policy" "failure_rate"'
STALL = 'resource "google_monitoring_alert_policy" "convert_stall"'

# name -> (constraint id, file, mutation). Each is a mistake somebody could make (several were made).
PLANTS: dict[str, tuple[str, str, Mutation]] = {
    "missing-data on a 0 s condition (the original bug)": (
        "alert-missing-data-duration",
        "observability.tf",
        after(
            DEAD_LETTERS,
            r"(      trigger \{\n        count = 1\n      \}\n)",
            r'\1      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"\n',
        ),
    ),
    "stall condition shortened to 0 s": (
        "alert-missing-data-duration",
        "observability.tf",
        after(STALL, r'duration        = "\$\{var\.stall_alert_minutes \* 60\}s"', 'duration        = "0s"'),
    ),
    "duration of 30 s": ("alert-duration-minutes", "observability.tf", after(DEAD_LETTERS, r'"0s"', '"30s"')),
    "alignment period of 30 s": (
        "alert-alignment-period",
        "observability.tf",
        after(FAILURE_RATE, r'alignment_period     = "1800s"', 'alignment_period     = "30s"'),
    ),
    "alignment period of two days": (
        "alert-alignment-period",
        "observability.tf",
        after(FAILURE_RATE, r'alignment_period     = "1800s"', 'alignment_period     = "172800s"'),
    ),
    "reducer without aligner": (
        "alert-reducer-needs-aligner",
        "observability.tf",
        after(DEAD_LETTERS, r'per_series_aligner   = "ALIGN_SUM"', 'per_series_aligner   = "ALIGN_NONE"'),
    ),
    "seven conditions": ("alert-max-conditions", "observability.tf", repeat_first_condition(DEAD_LETTERS, 6)),
    "a runbook too long for the API": (
        "alert-documentation-size",
        "observability.tf",
        after(DEAD_LETTERS, r"\*\*What it means\.\*\*", "**What it means.** " + "x" * 9000),
    ),
    "alert created without waiting for its metric": (
        "alert-waits-for-log-metrics",
        "observability.tf",
        after(DEAD_LETTERS, r"\n  depends_on = \[time_sleep\.log_metrics_propagation\]\n", "\n"),
    ),
    "new metric missing from the wait's triggers": (
        "alert-waits-for-log-metrics",
        "observability.tf",
        after("triggers = {", r"\n\s*google_logging_metric\.task_attempts\.name,", ""),
    ),
    "label without extractor": (
        "log-metric-labels",
        "observability.tf",
        after('"task_attempts"', r'\n\s*queue  = "EXTRACT\(resource\.labels\.queue_id\)"', ""),
    ),
    "gauge log metric": (
        "log-metric-kind",
        "observability.tf",
        after('"series_succeeded"', r'metric_kind  = "DELTA"', 'metric_kind  = "GAUGE"'),
    ),
    "distribution without buckets": (
        "log-metric-kind",
        "observability.tf",
        after('"convert_seconds"', r"\n  bucket_options \{.*?\n  \}\n", "\n"),
    ),
    "expand function allowed an hour": (
        "tasks-dispatch-deadline-range",
        "main.tf",
        after("    expand = {", r"timeout       = 1800", "timeout       = 3600"),
    ),
    "expand deadline written as a literal": (
        "tasks-deadline-equals-handler-timeout",
        "main.tf",
        after("queue_handler_timeouts = {", r"expand      = local\.functions\.expand\.timeout", "expand      = 600"),
    ),
    "worker timeout changed alone": (
        "tasks-deadline-equals-handler-timeout",
        "worker.tf",
        after("template {", r'timeout = "\$\{var\.dispatch_deadline_seconds\}s"', 'timeout = "900s"'),
    ),
    "queue concurrency above the limit": (
        "tasks-queue-limits",
        "queues.tf",
        after(
            '"control"',
            r"max_concurrent_dispatches = var\.control_max_concurrent_dispatches",
            "max_concurrent_dispatches = 10000",
        ),
    ),
    "backoffs swapped": (
        "tasks-queue-limits",
        "main.tf",
        after("control_retry = {", r"min_backoff_seconds = 5", "min_backoff_seconds = 500"),
    ),
    "scheduler deadline of an hour": (
        "scheduler-limits",
        "scheduler.tf",
        after('resource "google_cloud_scheduler_job"', r'attempt_deadline = "[^\n]*"', 'attempt_deadline = "3600s"'),
    ),
    "scheduler retrying six times": (
        "scheduler-limits",
        "scheduler.tf",
        after("renew = {", r"retry_count = 5", "retry_count = 6"),
    ),
    "worker timeout of two hours": (
        "run-limits",
        "worker.tf",
        after("template {", r'timeout = "\$\{var\.dispatch_deadline_seconds\}s"', 'timeout = "7200s"'),
    ),
    "worker concurrency of 2000": (
        "run-limits",
        "worker.tf",
        after("template {", r"max_instance_request_concurrency = 1", "max_instance_request_concurrency = 2000"),
    ),
    "function timeout beyond an hour": (
        "function-timeout",
        "main.tf",
        after("    renew = {", r"timeout       = 540", "timeout       = 4000"),
    ),
    "second TTL field on items": (
        "firestore-one-ttl-per-group",
        "firestore.tf",
        after(
            '"item_files_ttl"',
            r'collection = "files"\n  field      = "expires_at"',
            'collection = "items"\n  field      = "purge_at"',
        ),
    ),
    "one-field composite index": (
        "firestore-index-rules",
        "firestore.tf",
        after(
            "items_state_lease = {",
            r'\[\["state", "ASCENDING"\], \["lease_until", "ASCENDING"\]\]',
            '[["lease_until", "ASCENDING"]]',
        ),
    ),
    "the same index twice": (
        "firestore-index-rules",
        "firestore.tf",
        after(
            "firestore_indexes = {",
            r"(\n    items_state_lease = \{\n.*?\n    \}\n)",
            r"\1    items_state_lease_again = {\n      collection = "
            + '"items"'
            + ", scope = "
            + '"COLLECTION_GROUP"'
            + r"\n      fields     = [["
            + '"state", "ASCENDING"], ["lease_until", "ASCENDING"'
            + r"]]\n    }\n",
        ),
    ),
    "service account id too long": (
        "service-account-id",
        "iam.tf",
        after(
            '"scheduler"',
            r'account_id   = "\$\{var\.name_prefix\}-scheduler"',
            'account_id   = "${var.name_prefix}-cloud-scheduler-invoker-account"',
        ),
    ),
}


@pytest.fixture(scope="module")
def module() -> TfModule:
    return TfModule.load(INFRA_DIR)


def test_infra_meets_every_constraint(module: TfModule) -> None:
    report = constraints.check(module)
    assert not report.errors, "\n".join(report.errors)


def test_every_constraint_checks_real_values(module: TfModule) -> None:
    report = constraints.check(module)
    idle = [c.id for c in constraints.CONSTRAINTS if report.checked[c.id] == 0]
    assert not idle, f"these rules found no value to check in infra/ (the evaluator missed them?): {idle}"


def test_every_constraint_has_a_planted_mistake() -> None:
    planted = {constraint_id for constraint_id, _, _ in PLANTS.values()}
    missing = [c.id for c in constraints.CONSTRAINTS if c.id not in planted]
    assert not missing, f"rules without a planted-mistake test: {missing}"


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_planted_mistake_is_reported(module: TfModule, plant: str) -> None:
    constraint_id, file_name, mutate = PLANTS[plant]
    texts = {path.name: text for path, text in module.texts.items()}
    mutated = mutate(texts[file_name])
    assert mutated != texts[file_name], f"plant {plant!r} found nothing to change in {file_name}: update it with infra/"
    texts[file_name] = mutated
    report = constraints.check(TfModule.from_texts(INFRA_DIR, texts))
    assert any(e.startswith(f"[{constraint_id}]") for e in report.errors), (
        f"{plant!r} was not reported by {constraint_id}; errors: {report.errors}"
    )


def test_the_evaluator_computes_what_terraform_would(module: TfModule) -> None:
    """Spot checks of tfeval on infra/: for-expressions, merge, ternaries, resource arguments, templates."""
    ev = constraints.Evaluator(module, constraints.SAMPLE_VARIABLES)
    assert ev.local("queue_handler_timeouts") == {"convert": 1800, "expand": 1800, "dead_letter": 300, "changes": 540}
    assert ev.local("convert_timeout_seconds") == 1500
    assert ev.local("queue_resource_names")["dead_letter"] == "dicomflow-dead-letter"
    assert (
        ev.local("function_urls")["batches"]
        == "https://europe-west1-my-imaging-project.cloudfunctions.net/dicomflow-batches"
    )
    assert ev.expression('min(10 + 30 * 2, 50) == 50 ? "a${1 + 1}" : "b"') == "a2"
    assert ev.expression("[for k, v in {a = 1, b = 2} : k if v > 1]") == ["b"]
    assert ev.expression("google_service_account.worker.email") is constraints.UNKNOWN
