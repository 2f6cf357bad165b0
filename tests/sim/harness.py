"""One simulated run of the whole cloud path, from a seed: build, drive, check.

The real services and HTTP edges run unchanged — the batch API (`http.batches_api`: submit, status,
cancel, retry-dead-letters), the task edge (`http.handle_task_request`: expand, convert, dead-letter,
redrive and cancel steps, with its status mapping), the reconciler — wired by the real composition root
(`bootstrap.build`) to: the Cloud Tasks model, a StateStore held to the contract suite (in memory, or the
Firestore emulator), the simulated source/scanner/converter/heartbeat, and the real LocalFolderSink.
Faults are injected at every port call while faults are on; then faults stop and the run must settle.

Invariants checked at the end (DESIGN.md §4):
1. every batch reaches a final state within a bounded time after faults stop (liveness);
2. succeeded + skipped + dead_lettered == series_total, and every status read during the run added up;
3. no series is lost at expansion: a batch's items are exactly the series of its source;
4. each series' recorded outputs are the files present in the destination, and nothing else is there;
5. a permanent failure is never converted again in its generation;
6. a success is never overwritten; no older generation's message ends a redriven series.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Request
from werkzeug.test import EnvironBuilder

from dicomflow import bootstrap, http
from dicomflow.auth import LocalAuthenticator
from dicomflow.config import Settings, load_settings
from dicomflow.domain.bids_files import top_level_files
from dicomflow.domain.dataset import short_digest
from dicomflow.domain.layout import Layout
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import BATCH_FINAL, Batch, BatchStatus, Item, ItemState
from dicomflow.domain.paths import display
from dicomflow.domain.retry import CONTROL_POLICY
from dicomflow.domain.series import SeriesKey
from dicomflow.ports import Attempt, QueueName, StateStore
from dicomflow.services.context import Context
from dicomflow.services.finish import REPORT, dataset_info, planned_dataset
from dicomflow.services.reconcile import convert_task_lost_after, expansion_stalled_after
from tests.fakes.memory_store import MemoryStateStore
from tests.sim.cloud_tasks import CloudTasksModel, QueueConfig
from tests.sim.faults import FaultPlan, Faulty, FaultyQueue, Rule
from tests.sim.kernel import Sim, SimEvent
from tests.sim.world import (
    MR,
    Archive,
    NoProfile,
    SimConverter,
    SimHeartbeat,
    SimInspector,
    SimScanner,
    SimSource,
    make_archive,
)

_CONVERT_TASK = re.compile(r"convert-(?P<batch>[A-Za-z0-9_]+)-(?P<item>[0-9a-f]{32})-g(?P<generation>\d+)-t\d+")
RECONCILE_EVERY = 600.0  # Cloud Scheduler's period in infra/scheduler.tf
API_TIMEOUT = 60.0  # the batch API function's timeout
STATUS_POLL = 300.0


class SimulationFailure(AssertionError):
    pass


@dataclass(frozen=True)
class Answer:
    """What a task handler answered (status and the outcome in its body), and the series' generation
    when the delivery arrived."""

    queue: QueueName
    task_id: str
    status: int
    outcome: str
    payload: dict[str, Any]
    item_generation: int | None
    item_state: str = ""


@dataclass
class Scenario:
    """What varies between runs. `random_scenario` draws one from a seed; named scenarios set it."""

    seed: int
    batches: int = 1
    series: tuple[int, ...] = (4,)
    fault_rate: float = 0.03
    fault_seconds: float = 3 * 3600.0
    duplicate_rate: float = 0.05
    outages: tuple[tuple[float, float], ...] = ()  # worker unreachable (start, seconds) since start
    refusals: float = 0.0  # share of convert attempts refused before the handler (Cloud Run 429/503)
    cancel: tuple[bool, ...] = (False,)
    cancel_after: float = 900.0
    redrive: tuple[bool, ...] = (True,)
    same_source_twice: bool = False
    rules: tuple[Rule, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    queue_exists: bool = True  # whether the queue can tell if a task exists (GetTask; the emulator cannot)
    convert_concurrency: int = 4
    kinds: tuple[str, ...] = ()  # series kinds of every source (default: drawn from the seed)
    files: int = 0  # files per series (default: drawn from the seed)
    list_seconds: float = 0.0  # how long listing a source takes on top of the usual
    task_deadlines: dict[QueueName, float] | None = None  # what tasks carry (default: the settings')
    poll_seconds: float = STATUS_POLL  # how often the client reads the batch's status
    idempotency_keys: bool = True  # whether the client sends an Idempotency-Key (and repeats it on retries)
    bids: tuple[bool, ...] = (False,)  # per batch: --layout bids (staged outputs placed by the finish step)
    shared_destination: bool = False  # every batch converts into one destination (their finish steps meet)

    def describe(self) -> str:
        return (
            f"seed={self.seed} batches={self.batches} series={self.series} fault_rate={self.fault_rate:.3f} "
            f"duplicates={self.duplicate_rate:.2f} outages={self.outages} refusals={self.refusals:.2f} "
            f"cancel={self.cancel} redrive={self.redrive} same_source_twice={self.same_source_twice} "
            f"queue_exists={self.queue_exists} rules={len(self.rules)} bids={self.bids}"
        )


def random_scenario(seed: int) -> Scenario:
    import random

    rng = random.Random(seed * 7919 + 1)
    batches = rng.choice((1, 1, 2, 2, 3))
    outages = tuple(
        (rng.uniform(0, 2 * 3600), rng.choice((60.0, 200.0, 900.0, 2400.0))) for _ in range(rng.choice((0, 0, 1, 2)))
    )
    return Scenario(
        seed=seed,
        batches=batches,
        series=tuple(rng.randint(1, 7) for _ in range(batches)),
        fault_rate=rng.choice((0.0, 0.01, 0.03, 0.06)),
        fault_seconds=rng.uniform(1800, 4 * 3600),
        duplicate_rate=rng.choice((0.0, 0.05, 0.2)),
        outages=outages,
        refusals=rng.choice((0.0, 0.0, 0.1, 0.3)),
        cancel=tuple(rng.random() < 0.12 for _ in range(batches)),
        cancel_after=rng.uniform(10, 2400),
        redrive=tuple(rng.random() < 0.6 for _ in range(batches)),
        same_source_twice=batches > 1 and rng.random() < 0.25,
        queue_exists=rng.random() < 0.7,
        convert_concurrency=rng.choice((1, 2, 4, 8)),
        bids=tuple(rng.random() < 0.2 for _ in range(batches)),
    )


def sim_settings(**overrides: Any) -> Settings:
    """Production values: simulated time costs nothing, so nothing is shortened."""
    values: dict[str, Any] = {
        "mode": "cloud",
        "allow_local_paths": True,
        "retry_max_attempts": 5,
        "retry_min_backoff_seconds": 10.0,
        "retry_max_backoff_seconds": 600.0,
        "retry_max_doublings": 4,
        "dispatch_deadline_seconds": 1800,
        "convert_timeout_seconds": 1500,
        "lease_seconds": 300,
        "answer_margin_seconds": 60,
        "retention_days": 30,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


class Observed:
    """A store (in memory, or Firestore on the emulator) recording every item transition for the checks.
    The simulation runs one process at a time, so reading before and after a write sees that write alone."""

    def __init__(self, inner: StateStore, on_transition: Callable[[Item, Item], None]) -> None:
        self._inner = inner
        self._on_transition = on_transition

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def update_item(self, batch_id: str, item_id: str, change: Any) -> tuple[Item, bool]:
        before = self._inner.get_item(batch_id, item_id)
        after, changed = self._inner.update_item(batch_id, item_id, change)
        if changed:
            self._on_transition(before, after)
        return after, changed


class Run:
    def __init__(
        self, scenario: Scenario, work: Path, store: Callable[[Callable[[], float]], StateStore] | None = None
    ) -> None:
        self.scenario = scenario
        self.sim = sim = Sim(scenario.seed)
        self.settings = sim_settings(**scenario.settings)
        self.plan = FaultPlan(sim, rate=scenario.fault_rate, until=sim.start + scenario.fault_seconds,
                              rules=list(scenario.rules))  # fmt: skip
        self.violations: list[str] = []
        self.status_reads: list[tuple[str, dict[str, int]]] = []
        self.work = work
        self.dest_root = work / "dest"
        self.dest_root.mkdir(parents=True, exist_ok=True)

        # The archives: one per batch (or the same one twice), each its own "folder".
        self.archives: dict[str, Archive] = {}
        self.batch_sources: list[str] = []
        for n, count in enumerate(scenario.series):
            if scenario.same_source_twice and n == 1:
                self.batch_sources.append(self.batch_sources[0])
                continue
            ref = f"/sim/source-{n}"
            self.archives[ref] = make_archive(
                sim, f"source-{n}", count, kinds=scenario.kinds, files=scenario.files,
                list_seconds=scenario.list_seconds,
            )  # fmt: skip
            self.batch_sources.append(ref)
        shared = scenario.same_source_twice or scenario.shared_destination
        self.destinations = [str(self.dest_root / ("shared" if shared else f"d{n}"))
                             for n in range(scenario.batches)]  # fmt: skip

        inner: Any = Observed(store(sim.clock) if store else MemoryStateStore(sim.clock), self._transition)
        self.inner = inner
        self.converter = SimConverter(sim, self.archives, on_call=self._converter_called)
        self.source = SimSource(sim, self.archives)
        self.model = CloudTasksModel(
            sim,
            {
                QueueName.CONVERT: QueueConfig(
                    self.settings.retry_policy, self.settings.dispatch_deadline_seconds, scenario.convert_concurrency
                ),
                QueueName.EXPAND: QueueConfig(CONTROL_POLICY, self.settings.expand_dispatch_deadline_seconds, 10),
                QueueName.DEAD_LETTER: QueueConfig(
                    CONTROL_POLICY, self.settings.dead_letter_dispatch_deadline_seconds, 10
                ),
                QueueName.CHANGES: QueueConfig(CONTROL_POLICY, self.settings.changes_dispatch_deadline_seconds, 10),
            },
            self._deliver,
            duplicate_rate=scenario.duplicate_rate,
            deadlines=scenario.task_deadlines or {q: http.dispatch_deadline(self.settings, q) for q in QueueName},
        )
        queue = FaultyQueue(self.model if scenario.queue_exists else _NoGetTask(self.model), self.plan)
        from dicomflow.adapters.local.files import LocalFolderSink

        self.ctx: Context = bootstrap.build(
            self.settings,
            store=Faulty(inner, self.plan, "store"),  # type: ignore[arg-type]
            queue=queue,  # type: ignore[arg-type]
            converter=Faulty(self.converter, self.plan, "converter", latency=0.0),  # type: ignore[arg-type]
            sources={LocationKind.LOCAL: lambda: Faulty(self.source, self.plan, "source")},  # type: ignore[dict-item]
            sinks={LocationKind.LOCAL: lambda: Faulty(LocalFolderSink(), self.plan, "sink")},  # type: ignore[dict-item]
            scanners={LocationKind.LOCAL: lambda: Faulty(SimScanner(sim, self.archives), self.plan, "scanner")},  # type: ignore[dict-item,return-value]
            clock=sim.clock,
            work_dir=work / "scratch",
            heartbeat=SimHeartbeat(sim),
            new_id=sim.new_id,
            deidentifier=NoProfile(),
            inspector=SimInspector(),
            authenticator=LocalAuthenticator(),  # it models delivery, not identity (tests/integration/test_access.py)
        )
        self.batch_ids: list[str | None] = [None] * scenario.batches
        self.clients_done = 0
        self._dlq_generation: dict[object, int] = {}
        self.answers: list[Answer] = []
        self._permanent: set[tuple[str, str, int]] = set()  # (batch, item, generation) with a permanent failure

    # --- the edges, as Cloud Tasks and clients reach them ----------------------------------------------

    def _worker_down(self) -> bool:
        elapsed = self.sim.now - self.sim.start
        return any(start <= elapsed < start + seconds for start, seconds in self.scenario.outages)

    def _deliver(self, queue: QueueName, payload: dict[str, Any], attempt: Attempt) -> int:
        if queue is QueueName.CONVERT:
            # Cloud Run refusing or unreachable: the attempt is used up without reaching the handler.
            if self._worker_down():
                return 503
            if self.plan.on() and self.sim.rng.random() < self.scenario.refusals:
                return 429
        headers = {"X-CloudTasks-TaskRetryCount": str(attempt.retry_count), "X-CloudTasks-TaskName": attempt.task_id,
                   "X-CloudTasks-QueueName": attempt.queue}  # fmt: skip
        request = Request(EnvironBuilder(method="POST", path="/", json=payload, headers=headers).get_environ())
        if queue is QueueName.DEAD_LETTER:
            self._dlq_generation[self.sim.current()] = int(payload.get("generation", 0))
        generation_then, state_then = self._item_then(payload)
        try:
            response = http.handle_task_request(lambda: self.ctx, queue, request)
        finally:
            self._dlq_generation.pop(self.sim.current(), None)
        body = response.get_json(silent=True) or {}
        outcome = str(body.get("outcome", ""))
        self.answers.append(
            Answer(queue, attempt.task_id, response.status_code, outcome, dict(payload), generation_then, state_then)
        )
        return response.status_code

    def _item_then(self, payload: dict[str, Any]) -> tuple[int | None, str]:
        try:
            item = self.inner.get_item(str(payload["batch_id"]), str(payload["item_id"]))
        except Exception:  # not an item task, or an item not created yet
            return None, ""
        return item.generation, item.state.value

    def api(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One request to the batch API function, in a process of its own (an instance that may crash);
        no answer within the function's timeout is a status of 0."""
        box: dict[str, Any] = {}
        done = SimEvent(self.sim)

        def handle() -> None:
            environ = EnvironBuilder(method=method, path=path, json=body, headers=headers or {},
                                     base_url="https://api.sim").get_environ()  # fmt: skip
            response = http.batches_api(lambda: self.ctx, Request(environ))
            box["status"], box["json"] = response.status_code, response.get_json(silent=True)
            done.set()

        self.sim.spawn(f"api:{method} {path}", handle)
        done.wait(API_TIMEOUT)
        return int(box.get("status", 0)), box.get("json")

    # --- the workload -------------------------------------------------------------------------------------

    def client(self, n: int) -> None:
        sim = self.sim
        body: dict[str, Any] = {"source": self.batch_sources[n], "destination": self.destinations[n],
                                "label": f"sim-{n}"}  # fmt: skip
        if n < len(self.scenario.bids) and self.scenario.bids[n]:
            body["layout"] = {"kind": "bids"}
        headers = {"Idempotency-Key": f"sim-{self.scenario.seed}-{n}"} if self.scenario.idempotency_keys else {}
        sim.sleep(sim.rng.uniform(0, 120))
        batch_id = None
        while batch_id is None:
            status, answer = self.api("POST", "/batches", body, headers)
            if status == 202:
                batch_id = answer["batch_id"]
            elif 400 <= status < 500:
                self.violations.append(f"submit of batch {n} refused: {status} {answer}")
                self.clients_done += 1
                return
            else:
                sim.sleep(sim.rng.uniform(5, 60))  # a client retrying with the same Idempotency-Key
        self.batch_ids[n] = batch_id
        if self.scenario.cancel[n]:
            sim.spawn(f"canceller-{n}", self._cancel_later, batch_id)
        redriven = False
        while True:
            sim.sleep(self.scenario.poll_seconds)
            status, answer = self.api("GET", f"/batches/{batch_id}?page_size=1")
            if status != 200:
                continue
            self._check_status_read(batch_id, answer)
            if answer["status"] not in {s.value for s in BATCH_FINAL}:
                continue
            if answer["status"] == "completed_with_failures" and self.scenario.redrive[n] and not redriven:
                self.source.reexport(self.batch_sources[n])  # the user fixes the source, then asks for a retry
                status, _ = self.api("POST", f"/batches/{batch_id}:retry-dead-letters")
                redriven = status == 202
                continue
            break
        self.clients_done += 1

    def _cancel_later(self, batch_id: str) -> None:
        self.sim.sleep(self.scenario.cancel_after)
        for _ in range(30):
            status, _ = self.api("POST", f"/batches/{batch_id}:cancel")
            if status in (202, 409):
                return
            self.sim.sleep(30)

    def _check_status_read(self, batch_id: str, answer: dict[str, Any]) -> None:
        counters = answer["counters"]
        self.status_reads.append((batch_id, counters))
        parts = sum(counters[k] for k in ("pending", "running", "retrying", "succeeded", "skipped", "dead_lettered"))
        if parts != counters["series_total"]:
            self.violations.append(f"a status read of {batch_id} does not add up: {counters}")

    def cron(self) -> None:
        """Cloud Scheduler: POST the reconcile function every period (a crashed run is just missed)."""
        while True:
            self.sim.sleep(RECONCILE_EVERY)
            self.sim.spawn("cron:reconcile", self._reconcile_once)

    def _reconcile_once(self) -> None:
        request = Request(EnvironBuilder(method="POST", path="/", json={}).get_environ())
        http.reconcile_request(lambda: self.ctx, request)

    # --- observers -----------------------------------------------------------------------------------------

    def _transition(self, before: Item, after: Item) -> None:
        failure = after.failure
        if failure is not None and failure.permanent and (after.handed_off or after.state is ItemState.DEAD_LETTERED):
            self._permanent.add((after.batch_id, after.item_id, after.generation))
        if before.state is ItemState.SUCCEEDED and after.state is not ItemState.SUCCEEDED:
            self.violations.append(f"a success was overwritten: {_who(before)} became {after.state.value}")
        if after.generation < before.generation:
            self.violations.append(
                f"{_who(before)} went back from generation {before.generation} to {after.generation}"
            )
        if self.sim.in_process() and after.state is not before.state:
            sent = self._dlq_generation.get(self.sim.current())
            if sent is not None and sent != before.generation:
                self.violations.append(
                    f"a dead-letter message of generation {sent} changed {_who(before)} in generation "
                    f"{before.generation} ({before.state.value} -> {after.state.value})"
                )

    def _converter_called(self, series_uid: str) -> None:
        """dcm2niix is about to run for the task this handler process serves: its series must not carry a
        permanent failure recorded in the same generation."""
        proc = self.sim.current()
        while proc.parent is not None:
            proc = proc.parent
        match = _CONVERT_TASK.search(proc.name)
        if match is None:
            self.violations.append(f"dcm2niix ran outside a convert task: {proc.name}")
            return
        # Once a permanent failure was recorded in a generation (handed off or dead-lettered), no attempt of
        # that generation may convert the series again, whatever happened to the record since.
        if (match["batch"], match["item"], int(match["generation"])) in self._permanent:
            item = self.inner.get_item(match["batch"], match["item"])
            self.violations.append(f"a permanent failure was converted again: {_who(item)}")

    # --- running and checking ---------------------------------------------------------------------------

    def settled(self) -> bool:
        if self.clients_done < self.scenario.batches:
            return False
        for batch_id in filter(None, self.batch_ids):
            batch = self.inner.get_batch(batch_id)
            if not batch.is_final or batch.counters.finished != batch.counters.series_total:
                return False
        if self.inner.find_unretracted(limit=1):
            return False  # an unrecorded publish not yet removed: the reconciler's next run retracts it
        if self.inner.find_unfinished(limit=1):
            return False  # a final batch whose report (and BIDS placement) is not written yet
        return self.model.pending() == 0 and self.model.in_flight() == 0 and not self._zombies()

    def _zombies(self) -> bool:
        busy = ("handler:", "duplicate:", "api:", "cron:reconcile")
        return any(not p.done for p in self._procs() if p.name.startswith(busy))

    def _procs(self) -> list[Any]:
        procs = [p for _, _, p, _ in self.sim._timers] + list(self.sim._ready)
        return procs

    def bound(self) -> float:
        """How long after faults stop every batch must be final: the longest time a lost task or a
        stalled expansion takes to be noticed (derived from the queues' settings), twice, plus cycles."""
        longest = max(convert_task_lost_after(self.settings), expansion_stalled_after(self.settings))
        return 2 * longest + 4 * RECONCILE_EVERY + 4 * STATUS_POLL

    def run(self) -> None:
        sim = self.sim
        for n in range(self.scenario.batches):
            sim.spawn(f"client-{n}", self.client, n)
        sim.spawn("cloud-scheduler", self.cron)
        faults_end = sim.start + self.scenario.fault_seconds
        sim.run(until=faults_end)
        sim.run(until=faults_end + self.bound(), stop=self.settled)
        if sim.errors:
            name, error = sim.errors[0]
            raise SimulationFailure(self._report(f"process {name} raised {type(error).__name__}: {error}")) from error
        if not self.settled():
            self.violations.append(self._liveness_problem(faults_end))
        self._check_end()
        if self.violations:
            raise SimulationFailure(self._report("\n".join(dict.fromkeys(self.violations))))

    def _liveness_problem(self, faults_end: float) -> str:
        lines = [f"not settled {self.sim.now - faults_end:.0f} s after faults stopped "
                 f"(clients done {self.clients_done}/{self.scenario.batches}, tasks queued {self.model.pending()}, "
                 f"in flight {self.model.in_flight()})"]  # fmt: skip
        unretracted = self.inner.find_unretracted()
        if unretracted:
            lines.append(f"  {len(unretracted)} series still hold an unrecorded publish to retract")
        unfinished = self.inner.find_unfinished()
        if unfinished:
            lines.append(f"  {len(unfinished)} final batches still owe their finish step (report, BIDS placement)")
        for batch_id in filter(None, self.batch_ids):
            batch = self.inner.get_batch(batch_id)
            items = self.inner.list_items(batch_id, limit=1000)
            states = Counter(f"{i.state.value}{'+handed_off' if i.handed_off else ''}" for i in items)
            lines.append(f"  batch {batch_id}: {batch.status.value}, epoch {batch.epoch}, items {dict(states)}")
        return "\n".join(lines)

    def _check_end(self) -> None:
        recorded: dict[tuple[str, str], tuple[str, str]] = {}
        for n, batch_id in enumerate(self.batch_ids):
            if batch_id is None:
                continue
            batch = self.inner.get_batch(batch_id)
            items = self.inner.list_items(batch_id, limit=10_000)
            counters = batch.counters
            if counters.finished != counters.series_total:
                self.violations.append(f"batch {batch_id}: counters do not add up at the end: {counters}")
            if batch.status is BatchStatus.COMPLETED and counters.dead_lettered:
                self.violations.append(f"batch {batch_id} reads completed with {counters.dead_lettered} dead letters")
            if batch.status is BatchStatus.COMPLETED_WITH_FAILURES and not counters.dead_lettered:
                self.violations.append(f"batch {batch_id} reads completed_with_failures with no dead letter")
            if batch.status is not BatchStatus.FAILED:
                self._check_nothing_lost(batch, items, self.archives[self.batch_sources[n]])
            for item in items:
                if item.state is ItemState.SUCCEEDED:
                    for output in item.outputs:
                        recorded[(item.dest_key, output.name)] = (output.sha256, _who(item))
        for dest in sorted(set(self.destinations)):
            self._check_outputs(Path(dest), recorded)
        for dest in sorted({d for n, d in enumerate(self.destinations) if n < len(self.scenario.bids)
                            and self.scenario.bids[n] and self.batch_ids[n]}):  # fmt: skip
            self._check_dataset(Path(dest))

    def _check_dataset(self, dest: Path) -> None:
        """A BIDS destination is what its records plan: every series at its planned names (none left
        staged), and the top-level files written from the plan of every series, by whichever batch
        finished last — never a stale writer's participants.tsv or scans.tsv."""
        key = Location(LocationKind.LOCAL, str(dest)).key
        plan = planned_dataset(self.ctx, key, Layout(kind="bids"))
        planned = {(o.series_id, f.source): display(f.path) for o in plan.outputs for f in o.files}
        for item in self.inner.list_destination_items(key, limit=10_000):
            for output in item.outputs:
                if output.name.startswith(".dicomflow/"):
                    self.violations.append(f"{_who(item)} still records a staged output: {output.name}")
                elif planned.get((item.item_id, output.original), output.name) != output.name:
                    self.violations.append(f"{_who(item)} records {output.name}, planned as "
                                           f"{planned[(item.item_id, output.original)]}")  # fmt: skip
        for name, text in top_level_files(plan, dataset_info(self.ctx)).items():
            path = dest / name
            if not path.is_file() or path.read_text() != text:
                self.violations.append(f"{dest.name}/{name} is not what the dataset's records call for")

    def _check_nothing_lost(self, batch: Batch, items: list[Item], archive: Archive) -> None:
        expected = {SeriesKey(s.uid, MR).item_id for s in archive.series}
        found = {i.item_id for i in items}
        if batch.status is BatchStatus.CANCELLED and found <= expected:
            return  # cancelled while expanding: fewer series, never others
        if found != expected:
            self.violations.append(
                f"batch {batch.batch_id} ({batch.status.value}) lost series at expansion: "
                f"missing {sorted(expected - found)}, unexpected {sorted(found - expected)}"
            )

    def _check_outputs(self, dest: Path, recorded: dict[tuple[str, str], tuple[str, str]]) -> None:
        """Every file of the destination is a succeeded series' recorded output, or one its dataset record
        owns (report.html, BIDS top-level files) — with the recorded content — and nothing else; staged
        outputs (.dicomflow/staging) count as files, dicomflow's private state does not."""
        from dicomflow.adapters.local.files import sha256_file

        key = Location(LocationKind.LOCAL, str(dest)).key
        present = {}
        if dest.exists():
            present = {
                p.relative_to(dest).as_posix(): p
                for p in dest.rglob("*")
                if p.is_file()
                and (
                    ".dicomflow" not in p.relative_to(dest).parts
                    or p.relative_to(dest).parts[:2] == (".dicomflow", "staging")
                )
            }
        owned = dict(self.inner.get_dataset(key).files)
        if self.batch_ids and any(self.batch_ids) and REPORT not in owned:
            self.violations.append(f"{dest.name} has no report.html recorded by its dataset")
        for name, digest in sorted(owned.items()):
            if name not in present:
                self.violations.append(f"the dataset of {dest.name} records {name}, which is not there")
            elif short_digest(sha256_file(present.pop(name))) != digest:
                self.violations.append(f"{dest.name}/{name} differs from what its dataset record says")
        for name, path in sorted(present.items()):
            if (key, name) not in recorded:
                self.violations.append(f"output {dest.name}/{name} is present but no succeeded series records it")
            elif sha256_file(path) != recorded[(key, name)][0]:
                self.violations.append(
                    f"output {dest.name}/{name} differs from what {recorded[(key, name)][1]} recorded"
                )
        for (dest_key, name), (_, who) in sorted(recorded.items()):
            if dest_key == key and name not in present:
                self.violations.append(f"{who} records output {name}, which is not in {dest.name}")

    def _report(self, problem: str) -> str:
        return (
            f"simulation failed: {problem}\n\nscenario: {self.scenario.describe()}\n"
            f"fault schedule ({len(self.plan.injected)} faults):\n{self.plan.schedule()}\n\n"
            f"replay: .venv/bin/python -m tests.sim --seed {self.scenario.seed}"
            + (" (named scenario: see tests/sim/test_scenarios.py)" if self.scenario.rules else "")
        )


def _who(item: Item) -> str:
    return f"series {item.item_id[:8]} of batch {item.batch_id}"


class _NoGetTask:
    """The Cloud Tasks model without GetTask (like the emulator): the reconciler must go by time."""

    def __init__(self, model: CloudTasksModel) -> None:
        self._model = model

    def enqueue(self, tasks: Any) -> None:
        self._model.enqueue(tasks)

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        return None


def run_scenario(scenario: Scenario, store: Callable[[Callable[[], float]], StateStore] | None = None) -> Run:
    """Run one scenario; `store` builds the StateStore from the simulated clock (default: in memory)."""
    work = Path(tempfile.mkdtemp(prefix=f"dicomflow-sim-{scenario.seed}-"))
    try:
        run = Run(scenario, work, store)
        run.run()
        return run
    finally:
        shutil.rmtree(work, ignore_errors=True)
