"""The batch API against its OpenAPI document: schemathesis generates requests (valid and invalid) from
the document and checks the answers — no server errors, responses that match the document."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import flask
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from dicomflow import bootstrap, http, openapi
from dicomflow.config import load_settings
from tests.support.access import Issued, grants
from tests.support.fakes import InlineQueue

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


USER = "tester@example.org"


def _app(state_dir: Path) -> tuple[flask.Flask, Issued]:
    settings = load_settings(
        environ={}, mode="local", state_path=str(state_dir / "state.sqlite"), local_roots="/",
        access_grants=grants({USER: ["/"]}),
    )  # fmt: skip
    issued = Issued(settings)
    ctx = bootstrap.build(settings, queue=InlineQueue(), authenticator=issued.authenticator)
    app = flask.Flask("schemathesis-target")

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def route(path: str) -> flask.Response:
        return http.batches_api(lambda: ctx, flask.request)

    # Paths Flask's router cannot match at all (e.g. an encoded newline) still reach the API's router.
    for code in (404, 405):
        app.register_error_handler(code, lambda _exc: http.batches_api(lambda: ctx, flask.request))
    return app, issued


schema = schemathesis.openapi.from_dict(openapi.document())


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> tuple[flask.Flask, Issued]:
    return _app(tmp_path_factory.mktemp("openapi"))


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_answers_match_the_document(case: Any, target: tuple[flask.Flask, Issued]) -> None:
    app, issued = target
    response = case.call(app=app, headers=issued.bearer(USER))
    case.validate_response(response, checks=[not_a_server_error, content_type_conformance, response_schema_conformance])


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_without_a_token_is_refused(case: Any, target: tuple[flask.Flask, Issued]) -> None:
    app, _ = target
    response = case.call(app=app)
    if case.method.upper() != case.operation.method.upper():
        # Undocumented methods: routed (405) before authentication; OPTIONS is Flask's own, with no data.
        assert response.status_code == 405 or case.method.upper() == "OPTIONS", (case.method, response.text)
        return
    if response.status_code == 404 and "no such resource" in response.text:
        return  # a path parameter outside its documented pattern: not this operation's route at all
    assert response.status_code == 401, (case.operation.label, response.text)
    challenge = {k.lower(): v for k, v in response.headers.items()}["www-authenticate"]
    assert "Bearer" in str(challenge)
    case.validate_response(response, checks=[content_type_conformance, response_schema_conformance])


def _operations() -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, item in openapi.document()["paths"].items() for method in item]


@pytest.mark.parametrize(("method", "path"), _operations())
def test_every_operation_answers_401_without_a_token_or_with_a_bad_one(
    method: str, path: str, target: tuple[flask.Flask, Issued]
) -> None:
    app, issued = target
    client = app.test_client()
    url = re.sub(r"\{[a-z_]+\}", "abcdef123456", path)
    stranger = Issued(load_settings(environ={}))  # another key: a forged token
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, stranger.bearer(USER), issued.bearer(USER, "https://elsewhere"),
                    issued.bearer(USER, exp=1_000_000, iat=999_000), issued.bearer(USER, email_verified=False),
                    {"Authorization": "Basic " + "dXNlcjpwYXNz"}):  # fmt: skip
        response = client.open(url, method=method, json={}, headers=headers)
        assert response.status_code == 401, (method, url, headers, response.data)
        assert response.mimetype == "application/problem+json"
    assert "401" in openapi.document()["paths"][path][method.lower()]["responses"]


def test_the_document_declares_the_bearer_scheme_for_every_operation() -> None:
    document = openapi.document()
    scheme = document["components"]["securitySchemes"]["googleIdToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"googleIdToken": []}]


def test_docs_copy_of_the_document_is_current() -> None:
    on_disk = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert on_disk == openapi.document(), "run: dicomflow openapi > docs/openapi.json"
