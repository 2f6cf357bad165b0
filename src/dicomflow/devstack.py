"""The dev stack on loopback: Firestore emulator, Cloud Tasks emulator, the functions and the worker.

Used by `dicomflow dev` and by the emulator/e2e test tiers. Every component is a real process started
the way production runs it: the official Firestore emulator, gcloud-tasks-emulator (its own virtualenv:
it pins an old protobuf), functions-framework serving the real entry points of functions/main.py, and
the worker started with the exact CMD of container/Dockerfile. Each runs in its own process group,
stopped as a group (the Firestore emulator's wrapper spawns a JVM that outlives a plain kill), and a
stop waits until no process of the group is left. A lifeline (dicomflow/lifeline.py) stops every group
when the process that started the stack dies, even by SIGKILL (issue 12: no orphans).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dicomflow.config import Settings, env_name
from dicomflow.dev_issuer import DevIssuer
from dicomflow.domain.failures import ConfigError
from dicomflow.lifeline import Lifeline, stop_groups

PROJECT = "dicomflow-dev"
REGION = "us-central1"
REPO = Path(__file__).resolve().parents[2]
FUNCTIONS = ("batches_api", "expand_task", "dead_letter_task", "drive_changes_task", "reconcile", "renew_channels",
             "drive_webhook")  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# How long a stopping component may take to end after SIGTERM before its group is killed. The Firestore
# emulator's JVM takes about 5 s; `dicomflow dev` must be gone within 10 s of Ctrl-C (issue 12).
STOP_GRACE_SECONDS = 5.0


@dataclass
class Managed:
    """A child process in its own process group, with its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    lifeline: Lifeline | None = None

    def stop(self, timeout: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the group, SIGKILL it after `timeout`; returns once no process of the group is left."""
        stop_groups([self.process.pid], timeout, reap=[self.process])
        self.process.wait(timeout=10)
        if self.lifeline is not None:
            self.lifeline.release(self.process.pid)

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash or an OOM kill, as far as the others can tell."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        stop_groups([self.process.pid], 0.0, reap=[self.process])
        if self.lifeline is not None:
            self.lifeline.release(self.process.pid)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_process(name: str, args: list[str], log_dir: Path, *, env: Mapping[str, str] | None = None,
                  cwd: Path | None = None, lifeline: Lifeline | None = None) -> Managed:  # fmt: skip
    """Start a component in a new process group (guarded by `lifeline` when given: it dies with us)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    if lifeline is not None:
        lifeline.watch(process.pid)
    return Managed(name, process, log_path, lifeline)


def wait_http(url: str, managed: Managed, timeout: float, expect: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if managed.process.poll() is not None:
            raise ConfigError(f"{managed.name} exited with code {managed.process.returncode}:\n{managed.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback URL we built
                body = response.read().decode(errors="replace")
                if expect is None or expect in body:
                    return
        except urllib.error.HTTPError:
            return  # the server answers: it is up (the path may simply not exist)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    managed.stop()
    raise ConfigError(f"{managed.name} did not come up within {timeout:.0f} s:\n{managed.tail()}")


def wait_port(port: int, managed: Managed, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if managed.process.poll() is not None:
            raise ConfigError(f"{managed.name} exited with code {managed.process.returncode}:\n{managed.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    managed.stop()
    raise ConfigError(f"{managed.name} did not open port {port} within {timeout:.0f} s:\n{managed.tail()}")


def firestore_emulator_available() -> bool:
    return shutil.which("gcloud") is not None and shutil.which("java") is not None


def start_firestore(log_dir: Path, port: int | None = None, *, lifeline: Lifeline | None = None) -> tuple[Managed, str]:
    if not firestore_emulator_available():
        raise ConfigError(
            "the Firestore emulator needs gcloud and Java: install google-cloud-cli-firestore-emulator "
            "(make tools does it)"
        )
    port = port or free_port()
    host = f"127.0.0.1:{port}"
    managed = start_process(
        "firestore-emulator",
        ["gcloud", "emulators", "firestore", "start", f"--host-port={host}", "--quiet"],
        log_dir,
        lifeline=lifeline,
    )
    wait_http(f"http://{host}/", managed, timeout=120, expect="Ok")
    return managed, host


def queue_ids(settings: Settings) -> list[str]:
    return [settings.queue_convert, settings.queue_dead_letter, settings.queue_expand, settings.queue_changes]


# gcloud-tasks-emulator binds its gRPC server to [::]:PORT whatever it is told (GCP_FACTS §4): every
# interface of the machine. This launcher runs the same emulator with that one call bound to 127.0.0.1.
_LOOPBACK_TASKS_EMULATOR = """
import runpy, sys, grpc
_server = grpc.server
def _loopback_server(*args, **kwargs):
    server = _server(*args, **kwargs)
    add = server.add_insecure_port
    server.add_insecure_port = lambda address: add(address.replace("[::]:", "127.0.0.1:"))
    return server
grpc.server = _loopback_server
sys.argv[0] = "gcloud_tasks_emulator"
runpy.run_module("gcloud_tasks_emulator", run_name="__main__", alter_sys=True)
"""


def start_tasks_emulator(
    python: str,
    log_dir: Path,
    project: str,
    queues: list[str],
    *,
    max_retries: int,
    port: int | None = None,
    lifeline: Lifeline | None = None,
) -> tuple[Managed, str]:
    if not Path(python).is_absolute():
        python = str(REPO / python)  # the default .venv-tasks/bin/python is relative to the repository
    if not Path(python).exists():
        raise ConfigError(
            f"gcloud-tasks-emulator is not installed at {python}; run `make tools` (it lives in its own virtualenv)"
        )
    port = port or free_port()
    args = [python, "-c", _LOOPBACK_TASKS_EMULATOR, "start", f"--port={port}", f"--max-retries={max_retries}"]
    for queue in queues:
        args.append(f"--default-queue=projects/{project}/locations/{REGION}/queues/{queue}")
    managed = start_process("tasks-emulator", args, log_dir, lifeline=lifeline)
    wait_port(port, managed, timeout=60)
    return managed, f"127.0.0.1:{port}"


def dockerfile_cmd() -> list[str]:
    """The exact CMD of container/Dockerfile (exec form), so the dev stack runs what the image runs."""
    for line in (REPO / "container" / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("CMD "):
            command = json.loads(line.strip()[4:])
            if not isinstance(command, list):
                break
            return [str(part) for part in command]
    raise ConfigError("container/Dockerfile has no exec-form CMD")


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


DEV_USER = "developer@dicomflow.dev"  # the dev stack's default user: an administrator with its roots
TASK_ROUTES = {"convert": "worker", "expand": "expand_task", "dead-letter": "dead_letter_task",
               "changes": "drive_changes_task"}  # fmt: skip


@dataclass
class DevStack:
    settings_env: dict[str, str]
    urls: dict[str, str]
    processes: dict[str, Managed] = field(default_factory=dict)
    firestore_host: str = ""
    tasks_host: str = ""
    log_dir: Path = Path()
    issuer: DevIssuer | None = None
    gateway: Gateway | None = None
    public_url: str = ""
    lifeline: Lifeline | None = None

    @property
    def api_url(self) -> str:
        return self.public_url or self.urls["batches_api"]

    def token(self, email: str = DEV_USER, **claims: Any) -> str:
        """An ID token for the batch API signed by the stack's issuer (what Google signs in the cloud)."""
        if self.issuer is None:
            raise ConfigError("the dev stack's issuer is not running")
        return self.issuer.token(email, self.api_url.rstrip("/"), **claims)

    def stop(self) -> None:
        """Stop every component at once (SIGTERM to every group, SIGKILL after the grace period), so the
        whole stack is gone within STOP_GRACE_SECONDS + a few, whatever each component does."""
        managed = list(self.processes.values())
        stop_groups([m.process.pid for m in managed], STOP_GRACE_SECONDS, reap=[m.process for m in managed])
        for m in managed:
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.process.wait(timeout=2)
            if m.lifeline is not None:
                m.lifeline.release(m.process.pid)
        if self.gateway is not None:
            self.gateway.stop()
        if self.issuer is not None:
            self.issuer.stop()

    def restart(self, name: str) -> None:
        """Start a stopped or killed component again on its port (Cloud Run replacing an instance)."""
        old = self.processes[name]
        old.stop()
        self.processes[name] = _start_app(name, self.settings_env, self.urls, self.log_dir, self.lifeline)

    def add_worker(self, name: str) -> str:
        """One more worker instance on its own port (Cloud Run scaling out); returns its URL."""
        self.urls[name] = f"http://127.0.0.1:{free_port()}/"
        self.processes[name] = _start_app(name, self.settings_env, self.urls, self.log_dir, self.lifeline)
        return self.urls[name]


class Gateway:
    """Loopback hops the dev stack puts where Google's infrastructure stands in production:

    - Cloud Tasks attaches an OIDC token of the tasks service account to every delivery; the emulator
      does not (GCP_FACTS §4). Tasks are addressed to `/<queue>/` here; the gateway adds a token signed by
      the stack's issuer (audience: the URL the task was addressed to, as Cloud Tasks does) and forwards.
    - Failure modes for `dicomflow smoke`: `block_convert` answers convert deliveries 403 like a Cloud Run
      ingress or invoker setting that keeps Cloud Tasks out; `api_prefix` serves the batch API at a URL
      whose paths reach the function with an extra prefix, like a proxy that does not strip its route.
    """

    def __init__(self, issuer: DevIssuer, tasks_email: str) -> None:
        self.issuer = issuer
        self.tasks_email = tasks_email
        self.upstreams: dict[str, str] = {}
        self.api_upstream = ""
        self.api_prefix = ""
        self.block_convert = False
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                gateway.forward(self, b"")

            def do_POST(self) -> None:
                gateway.forward(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def log_message(self, *_args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def task_url(self, queue: str) -> str:
        return f"{self.base}/{queue}/"

    def forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        queue = handler.path.strip("/").split("/")[0]
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        if queue in self.upstreams and handler.command == "POST":
            if queue == "convert" and self.block_convert:
                self._answer(handler, 403, b'{"title": "Forbidden", "detail": "blocked by ingress (dev stack)"}')
                return
            # Whatever the sender claimed, the token is the gateway's: like Cloud Tasks, which sets it itself.
            headers["Authorization"] = "Bearer " + self.issuer.token(self.tasks_email, self.task_url(queue))
            target = self.upstreams[queue]
        elif self.api_upstream:
            target = self.api_upstream.rstrip("/") + self.api_prefix + handler.path
        else:
            self._answer(handler, 404, b'{"title": "Not Found"}')
            return
        request = urllib.request.Request(target, data=body if handler.command == "POST" else None,  # noqa: S310
                                         method=handler.command, headers=headers)  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=1900) as response:  # noqa: S310 - loopback
                status, answer, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, answer, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        except OSError as exc:
            status, answer, kind = 502, str(exc).encode(), "text/plain"
        self._answer(handler, status, answer, kind)

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, kind: str = "application/json") -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind or "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _start_app(
    name: str, env: Mapping[str, str], urls: Mapping[str, str], log_dir: Path, lifeline: Lifeline | None = None
) -> Managed:
    port = int(urls[name].rsplit(":", 1)[1].split("/")[0])
    child_env = {**os.environ, **env, "PORT": str(port)}
    if name.startswith("worker"):
        # The image runs the installed package; here the same command runs in this virtualenv, bound to
        # loopback (gunicorn binds 0.0.0.0:$PORT when given no --bind).
        child_env["GUNICORN_CMD_ARGS"] = f"{env.get('GUNICORN_CMD_ARGS', '')} --bind=127.0.0.1:{port}".strip()
        command = dockerfile_cmd()
        command[0] = _venv_bin(command[0])
        managed = start_process(name, command, log_dir, env=child_env, cwd=REPO / "container", lifeline=lifeline)
    else:
        args = [_venv_bin("functions-framework"), f"--target={name}", f"--source={REPO / 'functions' / 'main.py'}",
                f"--port={port}", "--host=127.0.0.1"]  # fmt: skip
        managed = start_process(f"function-{name}", args, log_dir, env=child_env, lifeline=lifeline)
    wait_port(port, managed, timeout=60)
    return managed


@contextlib.contextmanager
def dev_stack(
    settings: Settings,
    log_dir: Path,
    *,
    extra_env: Mapping[str, str] | None = None,
    tasks_max_retries: int | None = None,
    firestore_host: str = "",
    reconcile_loop: bool = True,
    project: str = PROJECT,
    local_roots: Sequence[Path] = (),
    task_upstreams: Mapping[str, str] | None = None,
    api_prefix: str = "",
    block_worker: bool = False,
) -> Iterator[DevStack]:
    """Start everything; stop everything on exit. `firestore_host` reuses a running emulator; a distinct
    `project` keeps this stack's data apart from another stack's on the same emulator.

    Access works as in the cloud: the stack's own issuer signs ID tokens (`stack.token(email)`), the
    functions verify them, and Cloud Tasks' OIDC tokens are added by the gateway. Local paths are accepted
    only under `local_roots` (default: DICOMFLOW_LOCAL_ROOTS, else the current folder). Without grants in
    `settings`, DEV_USER is an administrator granted those roots. `task_upstreams` sends a queue's
    deliveries elsewhere (an interceptor in tests); `api_prefix` and `block_worker` plant the mistakes
    `dicomflow smoke` must report."""
    lifeline = Lifeline(STOP_GRACE_SECONDS)
    stack = DevStack(settings_env={}, urls={}, log_dir=log_dir, lifeline=lifeline)
    try:
        stack.issuer = DevIssuer()
        certs_url = stack.issuer.start()
        tasks_email = f"dicomflow-tasks@{project}.iam.gserviceaccount.com"
        stack.gateway = Gateway(stack.issuer, tasks_email)
        if firestore_host:
            stack.firestore_host = firestore_host
        else:
            managed, stack.firestore_host = start_firestore(log_dir, lifeline=stack.lifeline)
            stack.processes["firestore"] = managed
        retries = settings.retry_max_attempts - 1 if tasks_max_retries is None else tasks_max_retries
        managed, stack.tasks_host = start_tasks_emulator(
            settings.tasks_emulator_python,
            log_dir,
            project,
            queue_ids(settings),
            max_retries=retries,
            lifeline=stack.lifeline,
        )
        stack.processes["tasks"] = managed
        stack.urls = {name: f"http://127.0.0.1:{free_port()}/" for name in (*FUNCTIONS, "worker")}
        gateway = stack.gateway
        gateway.upstreams = {queue: stack.urls[name] for queue, name in TASK_ROUTES.items()}
        gateway.upstreams.update(task_upstreams or {})
        gateway.block_convert = block_worker
        stack.public_url = stack.urls["batches_api"].rstrip("/")
        if api_prefix:
            gateway.api_upstream, gateway.api_prefix = stack.urls["batches_api"], "/" + api_prefix.strip("/")
            stack.public_url = gateway.base
        roots = [str(Path(r).resolve()) for r in local_roots] or list(_items(settings.local_roots)) or [str(Path.cwd())]
        env = _stack_env(
            settings, stack, project=project, roots=roots, gateway=gateway, issuer=stack.issuer,
            tasks_email=tasks_email, certs_url=certs_url,
        ) | dict(extra_env or {})  # fmt: skip
        stack.settings_env = env
        for name in (*FUNCTIONS, "worker"):
            stack.processes[name] = _start_app(name, env, stack.urls, log_dir, stack.lifeline)
        stop = threading.Event()
        loop = None
        if reconcile_loop:
            loop = threading.Thread(
                target=_reconcile_loop, args=(stack, settings.reconcile_interval_seconds, stop), daemon=True
            )
            loop.start()
        try:
            yield stack
        finally:
            stop.set()
            if loop is not None:
                # A reconcile request in flight ends on its own once the functions stop; do not wait for it.
                loop.join(timeout=0.5)
    finally:
        stack.stop()
        lifeline.close()


def _stack_env(
    settings: Settings,
    stack: DevStack,
    *,
    project: str,
    roots: Sequence[str],
    gateway: Gateway,
    issuer: DevIssuer,
    tasks_email: str,
    certs_url: str,
) -> dict[str, str]:
    """The environment every function and the worker of the stack get (Terraform's shared_env, for loopback)."""
    env = {
        env_name("mode"): "cloud",
        env_name("project"): project,
        env_name("region"): REGION,
        env_name("tasks_emulator_host"): stack.tasks_host,
        env_name("allow_local_paths"): "true",
        env_name("local_roots"): ",".join(roots),
        env_name("log_format"): "json",
        env_name("worker_url"): gateway.task_url("convert"),
        env_name("expand_url"): gateway.task_url("expand"),
        env_name("dead_letter_url"): gateway.task_url("dead-letter"),
        env_name("changes_url"): gateway.task_url("changes"),
        env_name("public_url"): stack.public_url,
        env_name("webhook_url"): stack.urls["drive_webhook"],
        env_name("auth_certs_url"): certs_url,
        env_name("auth_issuers"): issuer.issuer,
        env_name("tasks_service_account"): tasks_email,
        env_name("admins"): settings.admins or DEV_USER,
        env_name("access_grants"): settings.access_grants or json.dumps({DEV_USER: roots}),
        "FIRESTORE_EMULATOR_HOST": stack.firestore_host,
        "GOOGLE_CLOUD_PROJECT": project,
    }
    for f in (
        "retry_max_attempts", "retry_min_backoff_seconds", "retry_max_backoff_seconds", "retry_max_doublings",
        "dispatch_deadline_seconds", "expand_dispatch_deadline_seconds", "dead_letter_dispatch_deadline_seconds",
        "changes_dispatch_deadline_seconds", "convert_timeout_seconds", "lease_seconds", "answer_margin_seconds",
        "settle_seconds", "retention_days", "webhook_token", "drive_endpoint", "work_dir", "webhook_window_seconds",
        "drive_identity", "drive_max_retry_sleep_seconds", "access_groups", "max_unfinished_batches",
        "max_batch_files", "max_batch_bytes",
    ):  # fmt: skip
        value = getattr(settings, f)
        if value not in ("", None):
            env[env_name(f)] = str(value)
    # The worker's request timeout is the convert dispatch deadline plus a margin, as Terraform sets it on
    # Cloud Run (the image's CMD leaves it to GUNICORN_CMD_ARGS; gunicorn's own default is 30 s).
    env["GUNICORN_CMD_ARGS"] = f"--timeout={settings.dispatch_deadline_seconds + 30}"
    # One pseudonym key for every component of this stack (scan tasks of one batch must agree on folder
    # names); a real deployment keeps it in Secret Manager.
    env[env_name("pseudonym_key")] = settings.pseudonym_key or secrets.token_hex(32)
    return env


def _items(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _reconcile_loop(stack: DevStack, interval: float, stop: threading.Event) -> None:
    """Cloud Scheduler's job in the dev stack: POST to the reconcile function every `interval` seconds."""
    while not stop.wait(interval):
        request = urllib.request.Request(stack.urls["reconcile"], data=b"{}", method="POST",  # noqa: S310
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with contextlib.suppress(OSError, urllib.error.URLError):
            urllib.request.urlopen(request, timeout=60).close()  # noqa: S310
