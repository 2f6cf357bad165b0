"""The batch API client over real HTTP: every submission carries an Idempotency-Key, a 503 or a lost
connection is retried with the same key, and a token never travels over plain http to another host."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dicomflow.api_client import ApiClient
from dicomflow.domain.failures import ConfigError, ServiceUnavailable

pytestmark = pytest.mark.integration


class Flaky:
    """Answers the first `fail` submissions with 503 (or by dropping the connection), then 202."""

    def __init__(self, fail: int, drop: bool = False, status: int = 503) -> None:
        self.fail, self.drop, self.status = fail, drop, status
        self.keys: list[str] = []
        self.auth: list[str] = []
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                flaky.keys.append(self.headers.get("Idempotency-Key", ""))
                flaky.auth.append(self.headers.get("Authorization", ""))
                if len(flaky.keys) <= flaky.fail:
                    if flaky.drop:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.close()
                        return
                    body = json.dumps({"title": "Service Unavailable", "status": flaky.status}).encode()
                    self.send_response(flaky.status)
                    self.send_header("Retry-After", "0")
                else:
                    body = json.dumps(
                        {"batch_id": "b1", "status": "expanding", "status_url": "u", "created": True}
                    ).encode()
                    self.send_response(202)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def servers() -> Iterator[list[Flaky]]:
    made: list[Flaky] = []
    yield made
    for server in made:
        server.server.shutdown()
        server.server.server_close()


def test_a_submission_is_retried_with_the_same_key(servers: list[Flaky]) -> None:
    for drop in (False, True):
        flaky = Flaky(fail=2, drop=drop)
        servers.append(flaky)
        pauses: list[float] = []
        accepted = ApiClient(flaky.url, "a.b.c", sleep=pauses.append).submit({"source": "x", "destination": "y"})
        assert accepted["batch_id"] == "b1"
        assert len(flaky.keys) == 3 and len(set(flaky.keys)) == 1 and len(flaky.keys[0]) >= 20, flaky.keys
        assert flaky.auth == ["Bearer a.b.c"] * 3 and len(pauses) == 2


def test_each_submission_has_its_own_key_and_a_given_key_is_kept(servers: list[Flaky]) -> None:
    flaky = Flaky(fail=0)
    servers.append(flaky)
    client = ApiClient(flaky.url)
    for key in ("", "", "mine"):
        client.submit({}, key)
    assert flaky.keys[0] != flaky.keys[1] and flaky.keys[2] == "mine"


def test_retries_end_and_other_server_errors_are_not_repeated(servers: list[Flaky]) -> None:
    always = Flaky(fail=100)
    broken = Flaky(fail=100, status=500)
    servers.extend([always, broken])
    with pytest.raises(ServiceUnavailable):
        ApiClient(always.url, sleep=lambda _s: None).submit({})
    assert len(always.keys) == 4
    with pytest.raises(ServiceUnavailable):
        ApiClient(broken.url, sleep=lambda _s: None).submit({})
    assert len(broken.keys) == 1


def test_no_token_over_plain_http_except_to_this_machine() -> None:
    with pytest.raises(ConfigError, match="plain http"):
        ApiClient("http://api.example.test", "a.b.c").batches()
    with pytest.raises(ConfigError, match="plain http"):
        ApiClient("http://10.1.2.3:8080", "a.b.c").batches()
