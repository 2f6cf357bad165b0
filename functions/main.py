"""Cloud Functions (gen2) entry points: a few lines each — parse, call one use case, answer.

Deployed by infra/functions.tf, one function per entry point; served locally by functions-framework
(`dicomflow dev`). The logic lives in the dicomflow package (http.py, services/).
"""

from __future__ import annotations

import functions_framework
from flask import Request, Response

from dicomflow import http
from dicomflow.cloud import context
from dicomflow.ports import QueueName


@functions_framework.http
def batches_api(request: Request) -> Response:
    """POST /batches, GET /batches/{id}, POST /batches/{id}:retry-dead-letters, POST /batches/{id}:cancel."""
    return http.batches_api(context, request)


@functions_framework.http
def expand_task(request: Request) -> Response:
    """Cloud Tasks target of the expand queue: list, scan and group a batch's sources."""
    return http.handle_task_request(context, QueueName.EXPAND, request)


@functions_framework.http
def dead_letter_task(request: Request) -> Response:
    """Cloud Tasks target of the dead-letter queue: record a series' final failure, once."""
    return http.handle_task_request(context, QueueName.DEAD_LETTER, request)


@functions_framework.http
def drive_changes_task(request: Request) -> Response:
    """Cloud Tasks target of the changes queue: read Drive changes after a push notification."""
    return http.handle_task_request(context, QueueName.CHANGES, request)


@functions_framework.http
def reconcile(request: Request) -> Response:
    """Cloud Scheduler, every 10 minutes: finish what crashed workers left behind."""
    return http.reconcile_request(context, request)


@functions_framework.http
def renew_channels(request: Request) -> Response:
    """Cloud Scheduler, daily: replace Drive watch channels before they expire."""
    return http.renew_channels_request(context, request)


@functions_framework.http
def drive_webhook(request: Request) -> Response:
    """Drive push notifications (public; the channel token is checked)."""
    return http.drive_webhook(context, request)
