"""The batch API against its OpenAPI document: schemathesis generates requests (valid and invalid) from
the document and checks the answers — no server errors, responses that match the document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flask
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from dicomflow import bootstrap, http, openapi
from dicomflow.config import load_settings
from tests.support.fakes import InlineQueue

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _app(state_dir: Path) -> flask.Flask:
    ctx = bootstrap.build(
        load_settings(environ={}, mode="local", state_path=str(state_dir / "state.sqlite")), queue=InlineQueue()
    )
    app = flask.Flask("schemathesis-target")

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def route(path: str) -> flask.Response:
        return http.batches_api(lambda: ctx, flask.request)

    # Paths Flask's router cannot match at all (e.g. an encoded newline) still reach the API's router.
    for code in (404, 405):
        app.register_error_handler(code, lambda _exc: http.batches_api(lambda: ctx, flask.request))
    return app


schema = schemathesis.openapi.from_dict(openapi.document())


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> flask.Flask:
    return _app(tmp_path_factory.mktemp("openapi"))


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_answers_match_the_document(case: Any, app: flask.Flask) -> None:
    response = case.call(app=app)
    case.validate_response(response, checks=[not_a_server_error, content_type_conformance, response_schema_conformance])


def test_docs_copy_of_the_document_is_current() -> None:
    on_disk = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert on_disk == openapi.document(), "run: dicomflow openapi > docs/openapi.json"
