"""The Cloud Run worker: converts one series per request (one request at a time, see the Dockerfile's CMD).

Cloud Tasks POSTs each convert task here. The answer comes only after the work is done: 2xx when the
series is finished (or the delivery was a duplicate), 503 when the queue should retry it.
"""

from __future__ import annotations

from flask import Flask, Response, request

from dicomflow import http
from dicomflow.cloud import context
from dicomflow.ports import QueueName

app = Flask(__name__)


@app.post("/")
def convert() -> Response:
    return http.handle_task_request(context, QueueName.CONVERT, request)


@app.get("/healthz")
def health() -> Response:
    return http.json_response({"status": "ok"})
