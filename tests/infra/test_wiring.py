"""What infra/ promises the code: one source for each queue's dispatch deadline, deadlines on every process
that enqueues, enqueue grants exactly as the code needs them, retention and TTL, the indexes of the
reconciler's queries, the worker image by digest, alerts that say what to do."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from dicomflow.config import Settings
from dicomflow.domain.failures import ConfigError
from tests.infra import constraints
from tests.infra.tfcheck import INFRA_DIR, REPO_ROOT, TfModule, single_block, unquote
from tests.infra.tfeval import Evaluator

pytestmark = pytest.mark.infra

# queue -> (the env a process reads, the Settings field, the expression the handler's timeout is written with)
DEADLINES = {
    "convert": ("DICOMFLOW_DISPATCH_DEADLINE_SECONDS", "dispatch_deadline_seconds", "var.dispatch_deadline_seconds"),
    "expand": (
        "DICOMFLOW_EXPAND_DISPATCH_DEADLINE_SECONDS",
        "expand_dispatch_deadline_seconds",
        "local.functions.expand.timeout",
    ),
    "dead_letter": (
        "DICOMFLOW_DEAD_LETTER_DISPATCH_DEADLINE_SECONDS",
        "dead_letter_dispatch_deadline_seconds",
        "local.functions.dead_letter.timeout",
    ),
    "changes": (
        "DICOMFLOW_CHANGES_DISPATCH_DEADLINE_SECONDS",
        "changes_dispatch_deadline_seconds",
        "local.functions.changes.timeout",
    ),
}

# Who creates tasks on which queue (the code's side of the contract; issue 12 and the batch API rewrite):
# the batch API only on expand (submit, redrive, cancel sweeps); expansion on expand and convert; the worker
# hands series to the dead-letter queue; the reconciler re-enqueues convert and expand tasks; the Drive
# changes path keeps its own queue.
ENQUEUERS = {
    "worker": {"dead_letter"},
    "batches": {"expand"},
    "expand": {"expand", "convert"},
    "reconcile": {"convert", "expand"},
    "changes": {"changes", "expand"},
    "renew": {"expand"},
    "webhook": {"changes"},
}

# Queries the code runs on collection group `items` that need a composite index:
# (equality fields, range/order field).
ITEM_QUERIES = {
    "reconciler: pending/retrying untouched since (state ==, updated_at <)": ({"state"}, "updated_at"),
    "reconciler: running with an expired lease (state ==, lease_until <)": ({"state"}, "lease_until"),
    "already converted (dest_key ==, state ==, fingerprint in)": ({"dest_key", "state"}, "fingerprint"),
    # Three equalities paged by name: the third field's place in the index is what the check looks at.
    "BIDS finish step: a destination's series (dest_key ==, state ==, layout ==)": ({"dest_key", "state"}, "layout"),
}

TTL_GROUPS = {"batches", "items", "files", "chunks", "idempotency_keys"}


def _evaluator(module: TfModule) -> Evaluator:
    return Evaluator(module, constraints.SAMPLE_VARIABLES)


def _environments(module: TfModule) -> dict[str, dict[str, object]]:
    """Process key (worker or function key) -> environment."""
    ev = _evaluator(module)
    envs: dict[str, dict[str, object]] = {"worker": ev.local("worker_env")}
    envs.update(ev.local("function_env"))
    return envs


@pytest.fixture(scope="module")
def module() -> TfModule:
    return TfModule.load(INFRA_DIR)


# --- dispatch deadlines: one source per queue ----------------------------------------------------------------


def _deadline_source_errors(module: TfModule) -> list[str]:
    errors = []
    locals_ = module.locals()
    timeouts = locals_.get("queue_handler_timeouts")
    deadline_env = locals_.get("dispatch_deadline_env")
    if not isinstance(timeouts, dict) or not isinstance(deadline_env, dict):
        return ["main.tf: local.queue_handler_timeouts and local.dispatch_deadline_env must be literal maps"]
    for queue, (env, _, handler_source) in DEADLINES.items():
        written = unquote(str(timeouts.get(queue, "")))
        if written != f"${{{handler_source}}}":
            errors.append(f"local.queue_handler_timeouts.{queue} = {written!r}; it must read {handler_source}")
        value = unquote(str(deadline_env.get(env, "")))
        if value != f"${{tostring(local.queue_handler_timeouts.{queue})}}":
            errors.append(f"{env} = {value!r}; it must be tostring(local.queue_handler_timeouts.{queue})")
    # The handlers' side: the worker's request timeout and each function's timeout_seconds.
    (worker,) = module.resources("google_cloud_run_v2_service")
    if unquote(str(single_block(worker.body, "template").get("timeout"))) != "${var.dispatch_deadline_seconds}s":
        errors.append("worker.tf: template.timeout must be var.dispatch_deadline_seconds")
    (function,) = module.resources("google_cloudfunctions2_function")
    if str(single_block(function.body, "service_config").get("timeout_seconds")) != "${each.value.timeout}":
        errors.append("functions.tf: timeout_seconds must be each.value.timeout (local.functions)")
    # Nothing else may set a deadline variable.
    text = module.text_without_comments()
    for env, *_ in DEADLINES.values():
        assignments = re.findall(rf"\b{env}\s*=", text)
        if len(assignments) != 1:
            errors.append(f"{env} is set {len(assignments)} times in infra/ (once, in local.dispatch_deadline_env)")
    return errors


def _deadline_reach_errors(module: TfModule) -> list[str]:
    """Every process that enqueues on a queue carries that queue's deadline, equal to the handler's timeout."""
    ev = _evaluator(module)
    timeouts = ev.local("queue_handler_timeouts")
    envs = _environments(module)
    errors = []
    for grant in ev.local("enqueue_grants"):
        process, queue = grant.split("/")
        env_name = DEADLINES[queue][0]
        value = envs.get(process, {}).get(env_name)
        if value != str(timeouts[queue]):
            errors.append(f"{process} enqueues on {queue} but has {env_name}={value!r} (handler: {timeouts[queue]})")
    return errors


def test_each_queue_deadline_has_one_source(module: TfModule) -> None:
    errors = _deadline_source_errors(module)
    assert not errors, "\n".join(errors)


def test_every_enqueuer_carries_the_deadline_of_its_queues(module: TfModule) -> None:
    errors = _deadline_reach_errors(module)
    assert not errors, "\n".join(errors)


def test_deadline_defaults_equal_the_code_defaults(module: TfModule) -> None:
    timeouts = _evaluator(module).local("queue_handler_timeouts")
    settings = Settings()
    for queue, (_, field, _) in DEADLINES.items():
        assert timeouts[queue] == getattr(settings, field), f"{queue}: infra {timeouts[queue]}, Settings.{field}"


def _sub(file_name: str, pattern: str, replacement: str) -> tuple[str, Callable[[str], str]]:
    return file_name, lambda text: re.sub(pattern, replacement, text, count=1)


DEADLINE_MUTATIONS = {
    "a handler timeout written twice": _sub(
        "main.tf", r"expand      = local\.functions\.expand\.timeout", "expand      = 1800"
    ),
    "an env value written as a literal": _sub(
        "main.tf",
        r"(DICOMFLOW_DEAD_LETTER_DISPATCH_DEADLINE_SECONDS = )tostring\(local\.queue_handler_timeouts\.dead_letter\)",
        r'\1"300"',
    ),
    "the worker's timeout from elsewhere": _sub("worker.tf", r"var\.dispatch_deadline_seconds\}s", "local.x}s"),
    "a second assignment on the worker": _sub(
        "main.tf",
        r"(DICOMFLOW_WORKER_URL\s+= local\.worker_self_url)",
        r'\1\n    DICOMFLOW_DISPATCH_DEADLINE_SECONDS = "1800"',
    ),
    "deadlines dropped from the shared environment": _sub("main.tf", r"local\.dispatch_deadline_env, ", ""),
}


@pytest.mark.parametrize("mutation", sorted(DEADLINE_MUTATIONS))
def test_deadline_checks_catch_a_drift(module: TfModule, mutation: str) -> None:
    file_name, apply = DEADLINE_MUTATIONS[mutation]
    texts = {path.name: text for path, text in module.texts.items()}
    mutated = apply(texts[file_name])
    assert mutated != texts[file_name], f"{mutation!r} changed nothing: update it together with infra/"
    texts[file_name] = mutated
    bad = TfModule.from_texts(INFRA_DIR, texts)
    assert _deadline_source_errors(bad) + _deadline_reach_errors(bad), f"{mutation!r} went unnoticed"


# --- enqueue grants --------------------------------------------------------------------------------------------


def test_enqueue_grants_are_exactly_what_the_code_needs(module: TfModule) -> None:
    ev = _evaluator(module)
    granted: dict[str, set[str]] = {}
    for key in ev.local("enqueue_grants"):
        process, queue = key.split("/")
        granted.setdefault(process, set()).add(queue)
    assert granted == ENQUEUERS
    # actAs on the tasks service account (to attach its OIDC token) for exactly the same processes.
    assert set(ev.local("enqueuers")) == set(ENQUEUERS)


# --- retention and TTL -------------------------------------------------------------------------------------------


def test_retention_days_reaches_every_process(module: TfModule) -> None:
    variable = module.variables()["retention_days"]
    assert variable["default"] == Settings().retention_days
    for process, env in _environments(module).items():
        assert env.get("DICOMFLOW_RETENTION_DAYS") == str(variable["default"]), process
    assert "var.retention_days" in str(module.locals()["shared_env"])


@pytest.mark.parametrize(
    ("days", "valid"), [(1, True), (30, True), (3650, True), (0, False), (3651, False), (1.5, False)]
)
def test_retention_days_validation_matches_the_code(module: TfModule, days: float, valid: bool) -> None:
    variable = module.variables()["retention_days"]
    condition = unquote(str(variable["validation"][0]["condition"]))[2:-1]
    ev = Evaluator(module, {**constraints.SAMPLE_VARIABLES, "retention_days": days})
    assert ev.expression(condition) is valid
    assert _code_accepts_retention(days) is valid


def _code_accepts_retention(days: float) -> bool:
    if days != int(days):
        return False
    try:
        Settings(retention_days=int(days))
    except ConfigError:
        return False
    return True


def test_ttl_policies_cover_every_expiring_collection_group(module: TfModule) -> None:
    ev = _evaluator(module)
    ttl = {}
    for block in module.resources("google_firestore_field"):
        if "ttl_config" in block.body:
            ttl[ev.value(block.body["collection"])] = ev.value(block.body["field"])
    assert set(ttl) == TTL_GROUPS
    assert set(ttl.values()) == {"expires_at"}


# --- indexes for the code's queries ------------------------------------------------------------------------------


def _indexes(module: TfModule) -> list[tuple[str, str, list[str]]]:
    ev = _evaluator(module)
    found = []
    for key, spec in ev.local("firestore_indexes").items():
        assert isinstance(spec, dict), key
        found.append((spec["collection"], spec["scope"], [f[0] for f in spec["fields"]]))
    return found


def _serves(fields: list[str], equalities: set[str], range_field: str) -> bool:
    head = fields[: len(equalities)]
    return set(head) == equalities and len(fields) > len(equalities) and fields[len(equalities)] == range_field


@pytest.mark.parametrize("query", sorted(ITEM_QUERIES))
def test_an_index_serves_each_items_query(module: TfModule, query: str) -> None:
    equalities, range_field = ITEM_QUERIES[query]
    indexes = [f for collection, scope, f in _indexes(module) if collection == "items" and scope == "COLLECTION_GROUP"]
    assert any(_serves(fields, equalities, range_field) for fields in indexes), f"no index for {query}: {indexes}"


def test_the_index_check_fails_without_the_index(module: TfModule) -> None:
    texts = {path.name: text for path, text in module.texts.items()}
    texts["firestore.tf"] = re.sub(
        r"\n    items_state_updated = \{.*?\n    \}\n", "\n", texts["firestore.tf"], count=1, flags=re.DOTALL
    )
    bad = TfModule.from_texts(INFRA_DIR, texts)
    equalities, range_field = ITEM_QUERIES["reconciler: pending/retrying untouched since (state ==, updated_at <)"]
    indexes = [f for collection, scope, f in _indexes(bad) if collection == "items" and scope == "COLLECTION_GROUP"]
    assert not any(_serves(fields, equalities, range_field) for fields in indexes)


# --- the worker image by digest ----------------------------------------------------------------------------------

DIGEST = "sha256:" + "a1" * 32


@pytest.mark.parametrize(
    ("image", "valid"),
    [
        (f"europe-west1-docker.pkg.dev/proj/dicomflow/worker@{DIGEST}", True),
        (f"localhost:5000/worker@{DIGEST}", True),
        ("europe-west1-docker.pkg.dev/proj/dicomflow/worker:v1", False),
        ("europe-west1-docker.pkg.dev/proj/dicomflow/worker", False),
        (f"europe-west1-docker.pkg.dev/proj/dicomflow/worker:v1@{DIGEST[:-1]}", False),
        (f"worker@{DIGEST}", False),
        (f"europe-west1-docker.pkg.dev/proj/dicomflow/worker@{DIGEST.upper()}", False),
    ],
)
def test_the_worker_image_must_be_a_digest(module: TfModule, image: str, valid: bool) -> None:
    condition = unquote(str(module.variables()["image"]["validation"][0]["condition"]))
    match = re.fullmatch(r'\$\{can\(regex\("(.*)", var\.image\)\)\}', condition)
    assert match, f"image validation is not can(regex(...)): {condition}"
    pattern = match.group(1).encode().decode("unicode_escape")  # HCL string escapes -> the RE2 pattern
    assert (re.search(pattern, image) is not None) is valid, (pattern, image)


def test_the_example_tfvars_deploy_by_digest() -> None:
    example = (INFRA_DIR / "terraform.tfvars.example").read_text(encoding="utf-8")
    assert re.search(r'^image\s*=\s*"[^"]+@sha256:[0-9a-f]{64}"', example, re.MULTILINE)


# --- alerts an operator can act on -------------------------------------------------------------------------------


def test_every_alert_says_what_to_do(module: TfModule) -> None:
    ev = _evaluator(module)
    policies = module.resources("google_monitoring_alert_policy")
    for policy in policies:
        content = ev.value(single_block(policy.body, "documentation")["content"])
        assert "**What it means.**" in content, policy.address
        assert re.search(r"\*\*What to do[^*]*\*\*", content), policy.address
        assert "docs/operations.md" in content, policy.address
    runbook = (REPO_ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for policy in policies:
        title = ev.value(policy.body["display_name"]).removeprefix("dicomflow: ")
        assert title in runbook, f"docs/operations.md does not describe the alert {title!r}"


def test_the_operator_signals_exist(module: TfModule) -> None:
    """Issue 12: attempts by response code, stall, function 5xx, scheduler failures, failed batches, a logs
    panel of dead letters."""
    ev = _evaluator(module)
    filters = " ".join(
        str(ev.value(c["condition_threshold"][0]["filter"]))
        for policy in module.resources("google_monitoring_alert_policy")
        for c in policy.body["conditions"]
    )
    metrics = {ev.value(m.body["name"]): m for m in module.resources("google_logging_metric")}
    assert "dicomflow/task_attempts" in metrics
    assert "status" in ev.value(metrics["dicomflow/task_attempts"].body["label_extractors"])
    for needle in (
        "dicomflow/task_attempts",  # attempts by response status
        "cloudtasks.googleapis.com/queue/depth",  # stall: tasks waiting ...
        "dicomflow/series_finished",  # ... and nothing finishing
        "run.googleapis.com/request_count",  # function 5xx
        "dicomflow/scheduler_job_failed",
        "dicomflow/batch_failed",
    ):
        assert needle in filters, f"no alert condition reads {needle}"
    assert "task_attempt_delays" not in filters, "raw queue age is not an alert any more (the stall alert is)"
    dashboard = str(ev.value(module.resource("google_monitoring_dashboard", "main").body["dashboard_json"]))
    assert "logsPanel" in dashboard and 'jsonPayload.event=\\"series_dead_lettered\\"' in dashboard


# --- access (issue 11) -------------------------------------------------------------------------------------------

# Queries the batch API runs on `batches` for a caller: (equality fields, order field).
BATCH_QUERIES = {
    "a caller's batches, newest first (owner ==, created_at desc)": ({"owner"}, "created_at"),
    "a caller's unfinished batches (owner ==, status in, created_at desc)": ({"owner", "status"}, "created_at"),
}


@pytest.mark.parametrize("query", sorted(BATCH_QUERIES))
def test_an_index_serves_each_batch_query(module: TfModule, query: str) -> None:
    equalities, order = BATCH_QUERIES[query]
    indexes = [f for collection, scope, f in _indexes(module) if collection == "batches" and scope == "COLLECTION"]
    assert any(_serves(fields, equalities, order) for fields in indexes), f"no index for {query}: {indexes}"


def test_the_batch_index_check_fails_without_the_owner_index(module: TfModule) -> None:
    texts = {path.name: text for path, text in module.texts.items()}
    texts["firestore.tf"] = re.sub(
        r"\n    batches_owner_created = \{.*?\n    \}\n", "\n", texts["firestore.tf"], count=1, flags=re.DOTALL
    )
    bad = TfModule.from_texts(INFRA_DIR, texts)
    equalities, order = BATCH_QUERIES["a caller's batches, newest first (owner ==, created_at desc)"]
    indexes = [f for collection, scope, f in _indexes(bad) if collection == "batches"]
    assert not any(_serves(fields, equalities, order) for fields in indexes)


ACCESS_ENV = (
    "DICOMFLOW_ADMINS",
    "DICOMFLOW_ACCESS_GRANTS",
    "DICOMFLOW_ACCESS_GROUPS",
    "DICOMFLOW_MAX_UNFINISHED_BATCHES",
    "DICOMFLOW_AUTH_AUDIENCES",
)


def test_the_access_policy_reaches_every_process_and_parses(module: TfModule) -> None:
    """The API enforces it, expansion applies listing limits, the changes path re-checks watch owners: every
    process gets the same policy, and what Terraform encodes is what Settings accepts."""
    grants = {"Alice@Example.org": {"roots": ["drive://" + "A" * 20], "max_batch_files": 5,
                                    "max_unfinished_batches": None, "max_batch_bytes": None}}  # fmt: skip
    ev = Evaluator(module, {**constraints.SAMPLE_VARIABLES, "access_grants": grants, "admins": ["boss@example.org"],
                            "access_groups": {"team@example.org": ["bob@example.org"]}})  # fmt: skip
    envs = {"worker": ev.local("worker_env"), **ev.local("function_env")}
    for process, env in envs.items():
        for name in ACCESS_ENV:
            assert name in env, (process, name)
    env = envs["batches"]
    settings = Settings(
        admins=env["DICOMFLOW_ADMINS"],
        access_grants=env["DICOMFLOW_ACCESS_GRANTS"],
        access_groups=env["DICOMFLOW_ACCESS_GROUPS"],
        max_unfinished_batches=int(env["DICOMFLOW_MAX_UNFINISHED_BATCHES"]),
    )
    policy = settings.access_policy
    assert policy.is_admin("boss@example.org") and not policy.is_admin("alice@example.org")
    assert [r.uri for r in policy.roots("alice@example.org")] == ["drive://" + "A" * 20]
    limits = policy.limits("alice@example.org")
    assert limits.max_batch_files == 5 and limits.max_unfinished_batches == settings.max_unfinished_batches
    assert env["DICOMFLOW_AUTH_AUDIENCES"].split(",")[0] == ev.local("function_urls")["batches"]
