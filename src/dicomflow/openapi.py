"""The OpenAPI 3.1 document of the batch API (served at GET /openapi.json; a copy is kept in
docs/openapi.json and a test keeps both identical). Schemathesis runs against it in the test suite."""

from __future__ import annotations

from typing import Any

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_BATCH_ID = {
    "name": "batch_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}


_CHANNEL_ID = {
    "name": "channel_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}


def _problems(*codes: int) -> dict[str, Any]:
    return {str(code): _PROBLEM for code in codes}


def document() -> dict[str, Any]:
    counters = {
        "type": "object",
        "properties": {
            name: {"type": "integer", "minimum": 0}
            for name in ("series_total", "pending", "running", "retrying", "succeeded", "skipped", "dead_lettered")
        },
        "required": ["series_total", "succeeded", "skipped", "dead_lettered"],
    }
    failure = {
        "type": ["object", "null"],
        "properties": {
            "code": {"type": "string"},
            "reason": {"type": "string", "description": "what happened and what to do, in plain language"},
            "permanent": {"type": "boolean"},
            "detail": {"type": "string"},
        },
        "required": ["code", "reason", "permanent"],
    }
    batch = {
        "type": "object",
        "properties": {
            "batch_id": {"type": "string"},
            "status": {
                "type": "string",
                "enum": ["expanding", "running", "completed", "completed_with_failures", "cancelled", "failed"],
            },
            "label": {"type": "string"},
            "source": {"type": "array", "items": {"type": "string"}},
            "destination": {"type": "string"},
            "options": {"$ref": "#/components/schemas/Options"},
            "force": {"type": "boolean"},
            "created_at": {"type": "number", "description": "Unix time, seconds"},
            "expanded_at": {"type": ["number", "null"]},
            "finished_at": {"type": ["number", "null"]},
            "counters": {"$ref": "#/components/schemas/Counters"},
            "files_seen": {"type": "integer"},
            "files_ignored": {"type": "integer", "description": "files that were not DICOM images"},
            "failure": {"$ref": "#/components/schemas/Failure"},
            "owner": {"type": "string", "description": "e-mail of the caller who submitted it"},
            "layout": {"$ref": "#/components/schemas/LayoutSummary"},
            "finishing": {
                "type": "boolean",
                "description": "final, but its report.html (and, for the bids layout, its dataset files) not yet "
                "written: wait while true to read the outputs",
            },
            "report_ref": {"type": "string", "description": "the batch's report.html: a Drive file id or local path"},
        },
        "required": ["batch_id", "status", "counters"],
    }
    label_pattern = "^(sub-|ses-)?[A-Za-z0-9]+$"
    layout = {
        "type": "object",
        "additionalProperties": False,
        "description": "How outputs are laid out (docs/bids.md): a mirror of the source folders (default), or a "
        "BIDS dataset with subject/session labels from `sub-`/`ses-` folders, `subject`/`session`, or `subjects`.",
        "properties": {
            "kind": {"type": "string", "enum": ["mirror", "bids"], "default": "mirror"},
            "subject": {"type": ["string", "null"], "pattern": label_pattern, "description": "one-subject source"},
            "session": {"type": ["string", "null"], "pattern": label_pattern},
            "subjects": {
                "type": "array",
                "description": "source folder (relative to the source) -> subject[, session]",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["folder", "subject"],
                    "properties": {
                        "folder": {"type": "string", "minLength": 1},
                        "subject": {"type": "string", "pattern": label_pattern},
                        "session": {"type": ["string", "null"], "pattern": label_pattern},
                    },
                },
            },
            "rules": {
                "type": "array",
                "description": "the rules of a rules file (docs/bids.md): first match wins, overriding dcm2niix",
                "items": {"type": "object"},
            },
            "fieldmaps": {"type": "string", "enum": ["intended_for", "b0field", "both"], "default": "intended_for"},
        },
    }
    layout_summary = {
        "type": "object",
        "required": ["kind"],
        "properties": {
            "kind": {"type": "string", "enum": ["mirror", "bids"]},
            "subject": {"type": ["string", "null"]},
            "session": {"type": ["string", "null"]},
            "subjects": {"type": "integer", "description": "rows of the subjects mapping (folders are not kept)"},
            "rules": {"type": "array", "items": {"type": "string"}, "description": "rule ids"},
            "fieldmaps": {"type": "string"},
        },
    }
    item = {
        "type": "object",
        "properties": {
            "item_id": {"type": "string"},
            "state": {
                "type": "string",
                "enum": ["pending", "running", "retrying", "succeeded", "skipped", "dead_lettered"],
            },
            "series_number": {"type": ["integer", "null"]},
            "modality": {"type": "string"},
            "description": {"type": "string"},
            "folder": {"type": "string"},
            "files": {"type": "integer"},
            "bytes": {"type": "integer"},
            "attempts": {"type": "integer"},
            "timings": {"type": "object"},
            "outputs": {"type": "array", "items": {"type": "object"}},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "incomplete": {
                "type": "boolean",
                "description": "dcm2niix says slices or files of this series are missing from its outputs",
            },
            "failure": {"$ref": "#/components/schemas/Failure"},
            "skip_reason": {"type": "string"},
        },
        "required": ["item_id", "state"],
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dicomflow batch API",
            "version": "1.0.0",
            "description": "Submit DICOM folders for conversion to NIfTI, follow progress, retry or cancel. "
            "Errors are application/problem+json (RFC 9457) and name the offending `field`.",
        },
        "security": [{"googleIdToken": []}],
        "paths": {
            "/watches": {
                "post": {
                    "operationId": "addWatch",
                    "summary": "Convert new exams in a Drive folder automatically (Drive push notifications)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/WatchRequest"}}},
                    },
                    "responses": {
                        "201": {
                            "description": "the watch channel",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Watch"}}},
                        },
                        **_problems(400, 401, 403, 413, 415, 422, 503),
                    },
                },
                "get": {
                    "operationId": "listWatches",
                    "summary": "The caller's active watches",
                    "responses": {
                        "200": {
                            "description": "watches",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "watches": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Watch"},
                                            }
                                        },
                                        "required": ["watches"],
                                    }
                                }
                            },
                        },
                        **_problems(401, 503),
                    },
                },
            },
            "/watches/{channel_id}:stop": {
                "post": {
                    "operationId": "stopWatch",
                    "summary": "Stop a watch: uploads are no longer converted automatically",
                    "parameters": [_CHANNEL_ID],
                    "responses": {
                        "200": {
                            "description": "stopped",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Watch"}}},
                        },
                        **_problems(401, 404, 503),
                    },
                }
            },
            "/batches": {
                "post": {
                    "operationId": "submitBatch",
                    "summary": "Submit a batch; answered at once, expansion continues in tasks",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                            "description": "a repeated submission with the same key returns the same batch",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}},
                    },
                    "responses": {
                        "202": {
                            "description": "accepted",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
                        },
                        **_problems(400, 401, 403, 409, 413, 415, 422, 429, 503),
                    },
                },
                "get": {
                    "operationId": "listBatches",
                    "summary": "The latest batches",
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}}
                    ],
                    "responses": {
                        "200": {
                            "description": "batches, newest first",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "batches": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Batch"},
                                            }
                                        },
                                        "required": ["batches"],
                                    }
                                }
                            },
                        },
                        **_problems(401, 422, 503),
                    },
                },
            },
            "/batches/{batch_id}": {
                "get": {
                    "operationId": "getBatch",
                    "summary": "Counters, state, ETA, failures with reasons, and a page of series",
                    "parameters": [
                        _BATCH_ID,
                        {
                            "name": "page_size",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                        {"name": "page_token", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"type": "string", "enum": item["properties"]["state"]["enum"]},  # type: ignore[index]
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "the batch",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchStatus"}}},
                        },
                        **_problems(401, 404, 422, 503),
                    },
                }
            },
            "/batches/{batch_id}:retry-dead-letters": {
                "post": {
                    "operationId": "retryDeadLetters",
                    "summary": "Re-enqueue the dead-lettered series (after fixing their cause)",
                    "parameters": [_BATCH_ID],
                    "responses": {
                        "202": {
                            "description": "re-enqueued",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"batch_id": {"type": "string"}, "redriven": {"type": "integer"}},
                                        "required": ["batch_id", "redriven"],
                                    }
                                }
                            },
                        },
                        **_problems(401, 404, 409, 503),
                    },
                }
            },
            "/batches/{batch_id}:cancel": {
                "post": {
                    "operationId": "cancelBatch",
                    "summary": "Cancel: series not started yet are skipped, running ones finish",
                    "parameters": [_BATCH_ID],
                    "responses": {
                        "202": {
                            "description": "cancelled",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}},
                        },
                        **_problems(401, 404, 409, 503),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "googleIdToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A Google-signed ID token whose audience is the API's URL and whose `email` is "
                    "the caller (e.g. `gcloud auth print-identity-token`). The caller sees and acts on their own "
                    "batches and watches only (administrators on all); anyone else's answer 404. Sources and "
                    "destinations must lie inside the Drive folders granted to the caller (else 403).",
                }
            },
            "schemas": {
                "Options": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "compress": {
                            "type": "boolean",
                            "default": True,
                            "description": "write .nii.gz (dcm2niix -z y)",
                        },
                        "merge_2d": {"type": "string", "enum": ["auto", "yes", "no"], "default": "auto"},
                    },
                },
                "BatchRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["source", "destination"],
                    "properties": {
                        "source": {
                            "description": "drive://FOLDER_ID (or a local absolute path in local mode), or a list",
                            "oneOf": [
                                {"type": "string", "minLength": 1},
                                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                            ],
                        },
                        "destination": {"type": "string", "minLength": 1},
                        "options": {"$ref": "#/components/schemas/Options"},
                        "label": {"type": "string", "maxLength": 200},
                        "force": {"type": "boolean", "description": "convert again even if already converted"},
                        "layout": {"$ref": "#/components/schemas/Layout"},
                    },
                },
                "Accepted": {
                    "type": "object",
                    "required": ["batch_id", "status", "status_url", "created"],
                    "properties": {
                        "batch_id": {"type": "string"},
                        "status": {"type": "string"},
                        "status_url": {"type": "string"},
                        "created": {"type": "boolean", "description": "false when an Idempotency-Key matched"},
                    },
                },
                "WatchRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["folder", "destination"],
                    "properties": {
                        "folder": {"type": "string", "description": "drive://FOLDER_ID to watch"},
                        "destination": {"type": "string", "description": "drive://FOLDER_ID for the NIfTI"},
                        "options": {"$ref": "#/components/schemas/Options"},
                        "label": {"type": "string"},
                        "layout": {"$ref": "#/components/schemas/Layout"},
                    },
                },
                "Watch": {
                    "type": "object",
                    "required": ["channel_id", "folder", "destination", "active"],
                    "properties": {
                        "channel_id": {"type": "string"},
                        "folder": {"type": "string"},
                        "destination": {"type": "string"},
                        "expires_at": {"type": "number"},
                        "active": {"type": "boolean"},
                        "label": {"type": "string"},
                        "owner": {"type": "string"},
                        "layout": {"$ref": "#/components/schemas/LayoutSummary"},
                    },
                },
                "Layout": layout,
                "LayoutSummary": layout_summary,
                "Counters": counters,
                "Failure": failure,
                "Batch": batch,
                "Item": item,
                "BatchStatus": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Batch"},
                        {
                            "type": "object",
                            "properties": {
                                "status_url": {"type": "string"},
                                "eta_seconds": {"type": ["number", "null"]},
                                "failures": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
                                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
                                "next_page_token": {"type": "string"},
                            },
                            "required": ["failures", "items", "next_page_token"],
                        },
                    ]
                },
                "Problem": {
                    "type": "object",
                    "required": ["title", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "field": {"type": "string", "description": "the request field at fault"},
                        "errors": {"type": "array", "items": {"type": "object"}},
                    },
                },
            },
            "responses": {
                "Problem": {
                    "description": "an error, as RFC 9457 problem details",
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
            },
        },
    }
