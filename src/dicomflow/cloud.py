"""The Context of a Cloud Function or Cloud Run instance: built on first use, once per process.

Entry points (functions/main.py, container/worker.py) call `context()` inside a request, never at
import: imports stay cheap (cold starts) and tests can import the entry points without credentials.
"""

from __future__ import annotations

import functools

from dicomflow import bootstrap, logs
from dicomflow.config import load_settings
from dicomflow.services.context import Context


@functools.cache
def context() -> Context:
    settings = load_settings()
    logs.configure(settings)
    return bootstrap.build(settings)
