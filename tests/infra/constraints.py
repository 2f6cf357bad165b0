"""Rules the Google APIs enforce on values, checked offline on infra/.

The provider schema (tfcheck.py) knows argument names only; a plan with the right names can still fail
at apply with HTTP 400 because a value breaks a rule of the API behind it. Each rule below names its
source (API reference, a provider or sample-repository issue that hit it). Values are computed with
tfeval.Evaluator (variable defaults, locals, for_each instances); a value that is only known after apply
is skipped, and `Report.checked` counts what was really checked, so a rule that silently checks nothing
shows up in the tests.

    python -m tests.infra.constraints          # prints every violation in infra/
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.infra.tfcheck import INFRA_DIR, Block, TfModule, is_block_list
from tests.infra.tfeval import UNKNOWN, EvalError, Evaluator

# Values for the variables that have no default (terraform.tfvars.example's shape).
SAMPLE_VARIABLES = {
    "project_id": "my-imaging-project",
    "alert_email": "imaging-ops@example.org",
    "image": "europe-west1-docker.pkg.dev/my-imaging-project/dicomflow/worker@sha256:" + "0" * 64,
}


@dataclass(frozen=True)
class Constraint:
    id: str
    rule: str
    source: str
    check: Callable[[Context], Iterator[str]]


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)


@dataclass
class Context:
    module: TfModule
    ev: Evaluator
    constraint_id: str = ""
    report: Report = field(default_factory=Report)

    def known(self, value: Any) -> bool:
        """True (and counted as checked) when the value is known offline."""
        if value is UNKNOWN:
            return False
        self.report.checked[self.constraint_id] += 1
        return True

    def instances(self, type_: str) -> Iterator[tuple[Block, str, dict[str, Any]]]:
        """(block, address of the instance, scope) of every instance of every resource of a type."""
        for block in self.module.resources(type_):
            for key, scope in self.ev.instances(block):
                where = block.address if key is None else f'{block.address}["{key}"]'
                yield block, where, scope

    def value(self, raw: Any, scope: dict[str, Any]) -> Any:
        try:
            return self.ev.value(raw, scope)
        except (EvalError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
            return UNKNOWN


def blocks(body: dict[str, Any], *path: str) -> Iterator[dict[str, Any]]:
    """Nested blocks along a path (`conditions`, `condition_threshold`), static and dynamic content."""
    if not path:
        yield body
        return
    head, rest = path[0], path[1:]
    value = body.get(head)
    if is_block_list(value):
        for item in value:
            yield from blocks(item, *rest)
    for dynamic in body.get("dynamic", []) or []:
        for label, spec in dynamic.items():
            if label.strip('"') == head and isinstance(spec, dict):
                for content in spec.get("content", []) or []:
                    yield from blocks(content, *rest)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")


def seconds(value: Any) -> float | None:
    """A protobuf Duration string ("600s") or a number of seconds; None when it is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return float(match.group(1))
    return None


def number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# --- Cloud Monitoring alert policies ------------------------------------------------------------------------

CONDITION_KINDS = ("condition_threshold", "condition_absent", "condition_monitoring_query_language")


def _conditions(ctx: Context) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for block, where, scope in ctx.instances("google_monitoring_alert_policy"):
        for i, condition in enumerate(blocks(block.body, "conditions")):
            for kind in CONDITION_KINDS:
                for body in blocks(condition, kind):
                    yield f"{where}.conditions[{i}].{kind}", body, scope


def missing_data_needs_duration(ctx: Context) -> Iterator[str]:
    for where, body, scope in _conditions(ctx):
        if "evaluation_missing_data" not in body:
            continue
        duration = ctx.value(body.get("duration", '"0s"'), scope)
        if ctx.known(duration) and (seconds(duration) or 0) < 60:
            yield (
                f"{where}: evaluation_missing_data with duration {duration!r}; the API answers 400 "
                '"Conditions setting evaluation_missing_data must have a non-zero duration" (at least 60s)'
            )


def duration_whole_minutes(ctx: Context) -> Iterator[str]:
    for where, body, scope in _conditions(ctx):
        if "duration" not in body:
            continue
        duration = ctx.value(body["duration"], scope)
        if not ctx.known(duration):
            continue
        value = seconds(duration)
        if value is None or value % 60 != 0:
            yield f"{where}: duration {duration!r} is not a whole number of minutes (0s, 60s, 120s, ...)"


def _aggregations(ctx: Context) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for where, body, scope in _conditions(ctx):
        for name in ("aggregations", "denominator_aggregations"):
            for i, aggregation in enumerate(blocks(body, name)):
                yield f"{where}.{name}[{i}]", aggregation, scope


def alignment_period_range(ctx: Context) -> Iterator[str]:
    for where, aggregation, scope in _aggregations(ctx):
        aligner = ctx.value(aggregation.get("per_series_aligner", '"ALIGN_NONE"'), scope)
        period = ctx.value(aggregation.get("alignment_period"), scope) if "alignment_period" in aggregation else None
        if period is None:
            if ctx.known(aligner) and aligner != "ALIGN_NONE":
                yield f"{where}: per_series_aligner {aligner} needs an alignment_period"
            continue
        if not ctx.known(period):
            continue
        value = seconds(period)
        if value is None or not 60 <= value <= 90_000:
            yield f"{where}: alignment_period {period!r} outside 60s..90000s (the range for alerting policies)"


def reducer_needs_aligner(ctx: Context) -> Iterator[str]:
    for where, aggregation, scope in _aggregations(ctx):
        reducer = ctx.value(aggregation.get("cross_series_reducer", '"REDUCE_NONE"'), scope)
        aligner = ctx.value(aggregation.get("per_series_aligner", '"ALIGN_NONE"'), scope)
        if not (ctx.known(reducer) and ctx.known(aligner)):
            continue
        if reducer != "REDUCE_NONE" and (aligner == "ALIGN_NONE" or "alignment_period" not in aggregation):
            yield (
                f"{where}: cross_series_reducer {reducer} needs a per_series_aligner other than ALIGN_NONE "
                "and an alignment_period"
            )


def at_most_six_conditions(ctx: Context) -> Iterator[str]:
    for block, where, _ in ctx.instances("google_monitoring_alert_policy"):
        count = len(list(blocks(block.body, "conditions")))
        ctx.known(count)
        if count > 6:
            yield f"{where}: {count} conditions; a policy may have 1 to 6"


def documentation_size(ctx: Context) -> Iterator[str]:
    for block, where, scope in ctx.instances("google_monitoring_alert_policy"):
        for documentation in blocks(block.body, "documentation"):
            content = ctx.value(documentation.get("content", '""'), scope)
            if not ctx.known(content):
                continue
            chars, size = len(content), len(content.encode("utf-8"))
            if chars > 8192 or size > 10_240:
                yield f"{where}.documentation.content: {chars} characters / {size} bytes (at most 8192 / 10240)"


_USER_METRIC = re.compile(r"logging\.googleapis\.com/user/")


def policies_wait_for_log_metrics(ctx: Context) -> Iterator[str]:
    """A policy reading a log-based metric created in the same apply must wait for it to propagate."""
    metric_addresses = {b.address for b in ctx.module.resources("google_logging_metric")}
    waits = {}
    for sleep in ctx.module.resources("time_sleep"):
        text = str(sleep.body.get("triggers", ""))
        waits[sleep.address] = {address for address in metric_addresses if f"{address}." in text}
    for block in ctx.module.resources("google_monitoring_alert_policy"):
        text = str(block.body.get("conditions", ""))
        used = {address for address in metric_addresses if f"{address}." in text}
        if not used and not _USER_METRIC.search(text):
            continue
        ctx.known(used)
        depends = " ".join(str(d) for d in block.body.get("depends_on", []) or [])
        covered: set[str] = set()
        for sleep, triggered in waits.items():
            if sleep in depends:
                covered |= triggered
        missing = sorted(used - covered)
        if missing or (not used and not covered):
            yield (
                f"{block.address}: reads log-based metrics {missing or ['(by name)']} without depending on a "
                "time_sleep triggered by them; the API answers 404 until a new metric has propagated"
            )


# --- Cloud Logging metrics ----------------------------------------------------------------------------------


def log_metric_labels_match(ctx: Context) -> Iterator[str]:
    for block, where, scope in ctx.instances("google_logging_metric"):
        extractors = ctx.value(block.body.get("label_extractors", {}), scope)
        if not ctx.known(extractors):
            continue
        declared = {ctx.value(label.get("key"), scope) for label in blocks(block.body, "metric_descriptor", "labels")}
        for key in sorted(set(extractors) - declared):
            yield f"{where}: label_extractors[{key!r}] has no metric_descriptor.labels entry with that key"
        for key in sorted(k for k in declared - set(extractors) if k is not UNKNOWN):
            yield f"{where}: metric_descriptor label {key!r} has no extractor in label_extractors"
        if len(declared) > 10:
            yield f"{where}: {len(declared)} labels (a log-based metric may have at most 10)"


def log_metric_kind(ctx: Context) -> Iterator[str]:
    for block, where, scope in ctx.instances("google_logging_metric"):
        for descriptor in blocks(block.body, "metric_descriptor"):
            kind = ctx.value(descriptor.get("metric_kind", '"DELTA"'), scope)
            value_type = ctx.value(descriptor.get("value_type", '"INT64"'), scope)
            if not (ctx.known(kind) and ctx.known(value_type)):
                continue
            if kind != "DELTA":
                yield f"{where}: metric_kind {kind}; log-based metrics are DELTA"
            distribution = value_type == "DISTRIBUTION"
            if distribution and ("value_extractor" not in block.body or not list(blocks(block.body, "bucket_options"))):
                yield f"{where}: a DISTRIBUTION metric needs value_extractor and bucket_options"
            if not distribution and "value_extractor" in block.body:
                yield f"{where}: value_extractor on a {value_type} metric (only DISTRIBUTION metrics extract values)"
        name = ctx.value(block.body.get("name"), scope)
        log_filter = ctx.value(block.body.get("filter"), scope)
        if ctx.known(name) and len(name) > 100:
            yield f"{where}: name longer than 100 characters"
        if ctx.known(log_filter) and len(log_filter) > 20_000:
            yield f"{where}: filter longer than 20000 characters"


# --- Cloud Tasks -----------------------------------------------------------------------------------------------

DEADLINE_ENV = {
    "convert": "DICOMFLOW_DISPATCH_DEADLINE_SECONDS",
    "expand": "DICOMFLOW_EXPAND_DISPATCH_DEADLINE_SECONDS",
    "dead_letter": "DICOMFLOW_DEAD_LETTER_DISPATCH_DEADLINE_SECONDS",
    "changes": "DICOMFLOW_CHANGES_DISPATCH_DEADLINE_SECONDS",
}
# Which handler serves each queue: the worker (Cloud Run) or a function key of local.functions.
QUEUE_HANDLERS = {"convert": "worker", "expand": "expand", "dead_letter": "dead_letter", "changes": "changes"}


def environments(ctx: Context) -> Iterator[tuple[str, dict[str, Any]]]:
    """(process, environment) of the worker and of every function, as Terraform sets them."""
    for block, where, scope in ctx.instances("google_cloud_run_v2_service"):
        env: dict[str, Any] = {}
        for container in blocks(block.body, "template", "containers"):
            for item in blocks(container, "env"):
                env[str(ctx.value(item.get("name"), scope))] = ctx.value(item.get("value"), scope)
            for dynamic in container.get("dynamic", []) or []:
                spec = dynamic.get('"env"') or dynamic.get("env")
                if isinstance(spec, dict):
                    collection = ctx.value(spec.get("for_each"), scope)
                    if isinstance(collection, dict):
                        env.update(collection)
        yield where, env
    for block, where, scope in ctx.instances("google_cloudfunctions2_function"):
        for service in blocks(block.body, "service_config"):
            env = ctx.value(service.get("environment_variables", {}), scope)
            yield where, env if isinstance(env, dict) else {}


def dispatch_deadline_range(ctx: Context) -> Iterator[str]:
    for where, env in environments(ctx):
        for name in DEADLINE_ENV.values():
            if name not in env or not ctx.known(env[name]):
                continue
            value = number(env[name])
            if value is None or not 15 <= value <= 1800:
                yield f"{where}: {name}={env[name]!r}; Cloud Tasks accepts dispatch deadlines of 15s to 1800s"


def handler_timeouts(ctx: Context) -> dict[str, Any]:
    """Timeout in seconds of each queue's handler (the worker's request timeout, a function's timeout)."""
    found: dict[str, Any] = {}
    for block, _, scope in ctx.instances("google_cloud_run_v2_service"):
        for template in blocks(block.body, "template"):
            found["worker"] = seconds(ctx.value(template.get("timeout", '"300s"'), scope)) or UNKNOWN
    for block in ctx.module.resources("google_cloudfunctions2_function"):
        for key, scope in ctx.ev.instances(block):
            for service in blocks(block.body, "service_config"):
                found[str(key)] = number(ctx.value(service.get("timeout_seconds", 60), scope)) or UNKNOWN
    return found


def deadline_matches_handler(ctx: Context) -> Iterator[str]:
    timeouts = handler_timeouts(ctx)
    for where, env in environments(ctx):
        for queue, name in DEADLINE_ENV.items():
            handler = QUEUE_HANDLERS[queue]
            timeout = timeouts.get(handler, UNKNOWN)
            if name not in env or not (ctx.known(env[name]) and ctx.known(timeout)):
                continue
            if number(env[name]) != timeout:
                yield (
                    f"{where}: {name}={env[name]!r} but the {queue} queue's handler ({handler}) times out after "
                    f"{timeout:g}s; a shorter deadline re-dispatches work still running, a longer one waits "
                    "on a dead request"
                )


def queue_limits(ctx: Context) -> Iterator[str]:
    for block, where, scope in ctx.instances("google_cloud_tasks_queue"):
        for limits in blocks(block.body, "rate_limits"):
            rate = number(ctx.value(limits.get("max_dispatches_per_second"), scope))
            concurrent = number(ctx.value(limits.get("max_concurrent_dispatches"), scope))
            if ctx.known(rate) and rate is not None and not 0 < rate <= 500:
                yield f"{where}: max_dispatches_per_second {rate:g} outside (0, 500]"
            if ctx.known(concurrent) and concurrent is not None and not 1 <= concurrent <= 5000:
                yield f"{where}: max_concurrent_dispatches {concurrent:g} outside [1, 5000]"
        for retry in blocks(block.body, "retry_config"):
            attempts = number(ctx.value(retry.get("max_attempts"), scope))
            low = seconds(ctx.value(retry.get("min_backoff"), scope))
            high = seconds(ctx.value(retry.get("max_backoff"), scope))
            if ctx.known(attempts) and attempts is not None and attempts < -1:
                yield f"{where}: max_attempts {attempts:g} below -1"
            if low is not None and high is not None and ctx.known(low) and low > high:
                yield f"{where}: min_backoff {low:g}s above max_backoff {high:g}s"
        for logging_config in blocks(block.body, "stackdriver_logging_config"):
            ratio = number(ctx.value(logging_config.get("sampling_ratio"), scope))
            if ctx.known(ratio) and ratio is not None and not 0 <= ratio <= 1:
                yield f"{where}: sampling_ratio {ratio:g} outside [0, 1]"


# --- Cloud Scheduler ------------------------------------------------------------------------------------------


def scheduler_limits(ctx: Context) -> Iterator[str]:
    for block, where, scope in ctx.instances("google_cloud_scheduler_job"):
        http = list(blocks(block.body, "http_target"))
        if "attempt_deadline" in block.body and http:
            deadline = ctx.value(block.body["attempt_deadline"], scope)
            value = seconds(deadline) if ctx.known(deadline) else None
            if ctx.known(deadline) and (value is None or not 15 <= value <= 1800):
                yield f"{where}: attempt_deadline {deadline!r}; HTTP targets allow 15s to 1800s"
        for retry in blocks(block.body, "retry_config"):
            count = number(ctx.value(retry.get("retry_count"), scope))
            if ctx.known(count) and count is not None and not 0 <= count <= 5:
                yield f"{where}: retry_count {count:g} outside 0..5"


# --- Cloud Run and Cloud Functions ----------------------------------------------------------------------------


def run_limits(ctx: Context) -> Iterator[str]:
    for block, where, scope in ctx.instances("google_cloud_run_v2_service"):
        for template in blocks(block.body, "template"):
            timeout = ctx.value(template.get("timeout", '"300s"'), scope)
            value = seconds(timeout) if ctx.known(timeout) else None
            if ctx.known(timeout) and (value is None or not 1 <= value <= 3600):
                yield f"{where}: template.timeout {timeout!r}; Cloud Run allows up to 3600s"
            concurrency = number(ctx.value(template.get("max_instance_request_concurrency", 80), scope))
            if ctx.known(concurrency) and concurrency is not None and not 1 <= concurrency <= 1000:
                yield f"{where}: max_instance_request_concurrency {concurrency:g} outside 1..1000"


def function_timeouts(ctx: Context) -> Iterator[str]:
    for block, where, scope in ctx.instances("google_cloudfunctions2_function"):
        limit = 540 if list(blocks(block.body, "event_trigger")) else 3600
        for service in blocks(block.body, "service_config"):
            timeout = number(ctx.value(service.get("timeout_seconds", 60), scope))
            if ctx.known(timeout) and timeout is not None and not 1 <= timeout <= limit:
                kind = "an event-driven" if limit == 540 else "an HTTP"
                yield f"{where}: timeout_seconds {timeout:g}; {kind} function allows at most {limit}s"


# --- Firestore ------------------------------------------------------------------------------------------------


def one_ttl_field_per_group(ctx: Context) -> Iterator[str]:
    seen: dict[tuple[Any, Any], tuple[str, Any]] = {}
    for block, where, scope in ctx.instances("google_firestore_field"):
        if not list(blocks(block.body, "ttl_config")):
            continue
        database = ctx.value(block.body.get("database", '"(default)"'), scope)
        group = ctx.value(block.body.get("collection"), scope)
        name = ctx.value(block.body.get("field"), scope)
        if not (ctx.known(group) and ctx.known(name)):
            continue
        key = (database if database is not UNKNOWN else "?", group)
        if key in seen and seen[key][1] != name:
            first, first_name = seen[key]
            yield f"{where}: a second TTL field ({name!r}) for collection group {group!r}; {first} has {first_name!r}"
        seen.setdefault(key, (where, name))


def index_rules(ctx: Context) -> Iterator[str]:
    seen: dict[tuple[Any, ...], str] = {}
    for block, where, scope in ctx.instances("google_firestore_index"):
        fields: list[tuple[Any, Any]] = []
        static = block.body.get("fields")
        for item in static if is_block_list(static) else []:
            fields.append(
                (
                    ctx.value(item.get("field_path"), scope),
                    ctx.value(item.get("order", item.get("array_config")), scope),
                )
            )
        for dynamic in block.body.get("dynamic", []) or []:
            spec = dynamic.get('"fields"') or dynamic.get("fields")
            if isinstance(spec, dict):
                collection = ctx.value(spec.get("for_each"), scope)
                if not isinstance(collection, list):
                    fields = [(UNKNOWN, UNKNOWN)]
                    break
                fields.extend((entry[0], entry[1]) for entry in collection)
        if any(path is UNKNOWN for path, _ in fields):
            continue
        ctx.known(fields)
        real = [f for f in fields if f[0] != "__name__"]
        if len(real) < 2:
            yield (
                f'{where}: a composite index of {len(real)} field(s); the API answers 400 "this index is not '
                'necessary, configure using single field index controls"'
            )
        key = (
            ctx.value(block.body.get("database"), scope),
            ctx.value(block.body.get("collection"), scope),
            ctx.value(block.body.get("query_scope", '"COLLECTION"'), scope),
            tuple(fields),
        )
        if key in seen:
            yield f"{where}: the same index as {seen[key]}; the second create fails with 409 ALREADY_EXISTS"
        seen.setdefault(key, where)


# --- IAM ------------------------------------------------------------------------------------------------------

_ACCOUNT_ID = re.compile(r"^[a-z](?:[-a-z0-9]{4,28}[a-z0-9])$")


def service_account_ids(ctx: Context) -> Iterator[str]:
    for block, where, scope in ctx.instances("google_service_account"):
        account_id = ctx.value(block.body.get("account_id"), scope)
        if ctx.known(account_id) and not _ACCOUNT_ID.match(str(account_id)):
            yield f"{where}: account_id {account_id!r} must be 6-30 characters [a-z0-9-], starting with a letter"


CONSTRAINTS = (
    Constraint(
        "alert-missing-data-duration",
        "evaluation_missing_data only on a condition whose duration is at least 60 s",
        "GCP_FACTS gotcha 22; GoogleCloudPlatform/monitoring-dashboard-samples#280 and "
        "chainguard-dev/terraform-infra-common#401 (HTTP 400 'Conditions setting evaluation_missing_data must "
        "have a non-zero duration')",
        missing_data_needs_duration,
    ),
    Constraint(
        "alert-duration-minutes",
        "a condition's duration is a whole number of minutes",
        "Monitoring API v3, AlertPolicy.Condition duration: 'only values that are a multiple of a minute--e.g., "
        "0, 60, 120, or 300 seconds--are supported. If an invalid value is given, an error will be returned'",
        duration_whole_minutes,
    ),
    Constraint(
        "alert-alignment-period",
        "alignment_period between 60 s and 25 h in alert policies, and present whenever an aligner is",
        "Monitoring API v3, Aggregation.alignment_period: 'The value must be at least 60 seconds ... 90,000 "
        "seconds (25 hours) for alerting policies'; required when per_series_aligner is not ALIGN_NONE",
        alignment_period_range,
    ),
    Constraint(
        "alert-reducer-needs-aligner",
        "a cross_series_reducer needs a per_series_aligner other than ALIGN_NONE and an alignment_period",
        "Monitoring API v3, Aggregation.cross_series_reducer (https://cloud.google.com/monitoring/api/ref_v3/rest/v3/Aggregation)",
        reducer_needs_aligner,
    ),
    Constraint(
        "alert-max-conditions",
        "an alert policy holds 1 to 6 conditions",
        "https://cloud.google.com/monitoring/alerts/concepts-indepth "
        "('An alerting policy can contain up to 6 conditions')",
        at_most_six_conditions,
    ),
    Constraint(
        "alert-documentation-size",
        "documentation.content at most 8,192 characters and 10,240 bytes",
        "Monitoring API v3, AlertPolicy.Documentation.content",
        documentation_size,
    ),
    Constraint(
        "alert-waits-for-log-metrics",
        "an alert policy on a log-based metric depends on a time_sleep triggered by that metric",
        "hashicorp/terraform-provider-google#11102 (404 'If a metric was created recently, it could take up to "
        "10 minutes to become available'); GoogleCloudPlatform/cloud-foundation-fabric#3739",
        policies_wait_for_log_metrics,
    ),
    Constraint(
        "log-metric-labels",
        "every metric_descriptor label has an extractor and every extractor a label; at most 10 labels",
        "Logging API v2, LogMetric.metric_descriptor: 'Each label in the metric descriptor must have a matching "
        "label name as the key and an extractor expression as the value in the label_extractors map'",
        log_metric_labels_match,
    ),
    Constraint(
        "log-metric-kind",
        "log-based metrics are DELTA; DISTRIBUTION needs value_extractor and bucket_options; "
        "name <= 100, filter <= 20000 characters",
        "Logging API v2, LogMetric (metric_descriptor, value_extractor, bucket_options, name, filter)",
        log_metric_kind,
    ),
    Constraint(
        "tasks-dispatch-deadline-range",
        "every DICOMFLOW_*DISPATCH_DEADLINE_SECONDS is within Cloud Tasks' [15 s, 30 min]",
        "google-cloud-tasks types/task.py Task.dispatch_deadline (GCP_FACTS §4)",
        dispatch_deadline_range,
    ),
    Constraint(
        "tasks-deadline-equals-handler-timeout",
        "each queue's dispatch deadline equals its handler's timeout, in every process's environment",
        "GCP_FACTS gotchas 11 and 23 (the default deadline is 10 min; a deadline shorter than the handler "
        "re-dispatches work that is still running)",
        deadline_matches_handler,
    ),
    Constraint(
        "tasks-queue-limits",
        "rate limits within 500/s and 5,000 concurrent; max_attempts >= -1; min_backoff <= max_backoff; "
        "sampling_ratio in [0, 1]",
        "google-cloud-tasks types/queue.py RateLimits, RetryConfig, StackdriverLoggingConfig (GCP_FACTS §4)",
        queue_limits,
    ),
    Constraint(
        "scheduler-limits",
        "attempt_deadline of an HTTP job within [15 s, 30 min]; retry_count within 0..5",
        "Cloud Scheduler v1 Job.attempt_deadline ('For HTTP targets ... The deadline must be in the interval "
        "[15 seconds, 30 minutes]') and RetryConfig.retry_count ('Values greater than 5 and negative values are "
        "not allowed')",
        scheduler_limits,
    ),
    Constraint(
        "run-limits",
        "Cloud Run request timeout up to 3600 s; concurrency 1..1000",
        "https://cloud.google.com/run/docs/configuring/request-timeout and /about-concurrency (GCP_FACTS §6)",
        run_limits,
    ),
    Constraint(
        "function-timeout",
        "a gen2 function's timeout up to 3600 s (HTTP) or 540 s (event-driven)",
        "https://cloud.google.com/functions/docs/configuring/timeout (GCP_FACTS §6)",
        function_timeouts,
    ),
    Constraint(
        "firestore-one-ttl-per-group",
        "one TTL field per collection group",
        "https://cloud.google.com/firestore/docs/ttl (GCP_FACTS §5)",
        one_ttl_field_per_group,
    ),
    Constraint(
        "firestore-index-rules",
        "a composite index has at least two fields besides __name__, and no two are identical",
        "BasedHardware/omi#9678 (HTTP 400 'this index is not necessary, configure using single field index "
        "controls'); an identical second index is refused as already existing",
        index_rules,
    ),
    Constraint(
        "service-account-id",
        "service account ids are 6-30 characters of [a-z0-9-], starting with a letter",
        "IAM API, projects.serviceAccounts.create accountId (regex [a-z]([-a-z0-9]*[a-z0-9]), 6-30 characters)",
        service_account_ids,
    ),
)


def check(module: TfModule, variables: dict[str, Any] | None = None) -> Report:
    ev = Evaluator(module, {**SAMPLE_VARIABLES, **(variables or {})})
    report = Report()
    for constraint in CONSTRAINTS:
        ctx = Context(module, ev, constraint.id, report)
        report.errors.extend(f"[{constraint.id}] {message}" for message in constraint.check(ctx))
    return report


def main() -> int:
    report = check(TfModule.load(INFRA_DIR))
    for error in report.errors:
        sys.stdout.write(error + "\n")
    for constraint in CONSTRAINTS:
        sys.stdout.write(f"{constraint.id}: {report.checked[constraint.id]} value(s) checked\n")
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
