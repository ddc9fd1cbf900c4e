"""The daemon's API contract: its OpenAPI 3.1 document, and the validation of request bodies
against the document's own schemas (JSON Schema 2020-12, through ``jsonschema``).

::

    body = validate_body("StorageMigrationRequest", await request.json())   # raises BadRequest
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

__all__ = ["DOCUMENT", "BadRequest", "validate_body"]

API_VERSION = "1"

_RATE = {"type": "integer", "minimum": 0, "maximum": 1 << 40,
         "description": "bytes per second; 0: unlimited"}

_SCHEMAS: dict[str, Any] = {
    "LibvirtDomain": {
        "type": "object", "additionalProperties": False, "required": ["uri", "domain"],
        "properties": {"uri": {"type": "string", "minLength": 1, "maxLength": 1024},
                       "domain": {"type": "string", "minLength": 1, "maxLength": 256}},
    },
    "DiskMove": {
        "type": "object", "additionalProperties": False, "required": ["disk", "target"],
        "properties": {
            "disk": {"type": "string", "minLength": 1, "maxLength": 256,
                     "description": "block node name or device id (libvirt: target, alias or source)"},
            "target": {"type": "string", "minLength": 1, "maxLength": 4096,
                       "description": "a file path, a host block device (/dev/...) or blockdev JSON"},
            "format": {"enum": ["raw", "qcow2"], "description": "of a file target; default the disk's own"},
        },
    },
    "StorageMigrationRequest": {
        "type": "object", "additionalProperties": False, "required": ["disks"],
        "oneOf": [{"required": ["qmp"]}, {"required": ["libvirt"]}],
        "properties": {
            "qmp": {"type": "string", "minLength": 1, "maxLength": 107,
                    "description": "the QEMU's QMP unix socket"},
            "libvirt": {"$ref": "#/components/schemas/LibvirtDomain"},
            "disks": {"type": "array", "minItems": 1, "maxItems": 64,
                      "items": {"$ref": "#/components/schemas/DiskMove"}},
            "bandwidth": _RATE,
            "reuse": {"type": "boolean", "default": False},
            "remove_source": {"type": "boolean", "default": False},
            "stall_window": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 10},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 7 * 86400, "default": 3600},
        },
    },
    "StorageMigrationChange": {
        "type": "object", "additionalProperties": False, "required": ["bandwidth"],
        "properties": {"bandwidth": _RATE},
    },
    "Job": {
        "type": "object",
        "required": ["id", "kind", "state", "params", "created", "last_event"],
        "properties": {
            "id": {"type": "string"},
            "kind": {"enum": ["storage-migration"]},
            "state": {"enum": ["queued", "running", "completed", "rolled-back", "partial", "in-doubt",
                               "refused", "cancelled", "failed"]},
            "params": {"type": "object"},
            "created": {"type": "number"}, "started": {"type": ["number", "null"]},
            "ended": {"type": ["number", "null"]}, "cancel_requested": {"type": "boolean"},
            "error": {"type": ["string", "null"]}, "report": {"type": ["object", "null"]},
            "last_event": {"type": "integer"}, "queue_position": {"type": "integer"},
        },
    },
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string"},
                       "details": {"type": "array", "items": {"type": "string"}}},
    },
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _error(text: str) -> dict[str, Any]:
    return {"description": text, "content": _json("Error")}


_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "dataplane node daemon", "version": API_VERSION,
             "description": "Storage live migrations on this node (receivers and cross-cluster "
                            "migrations are not served yet)."},
    "paths": {
        "/healthz": {"get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "readiness", "responses": {"200": {"description": "ready"},
                                                                   "503": {"description": "shutting down"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text format 0.0.4"}}}},
        "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "it"}}}},
        "/v1/storage-migrations": {
            "get": {"summary": "list", "responses": {"200": {
                "description": "the jobs, oldest first",
                "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"items": {
                        "type": "array", "items": {"$ref": "#/components/schemas/Job"}}}}}}}}},
            "post": {"summary": "start a storage live migration (queued beyond the node's limit)",
                     "requestBody": {"required": True, "content": _json("StorageMigrationRequest")},
                     "responses": {"201": {"description": "created", "content": _json("Job")},
                                   "400": _error("the body is not valid"),
                                   "415": _error("not JSON")}},
        },
        "/v1/storage-migrations/{id}": {
            "parameters": [_JOB_ID],
            "get": {"summary": "get", "responses": {
                "200": {"description": "the job", "content": _json("Job")}, "404": _error("no such job")}},
            "patch": {"summary": "change a queued or running migration live (its copy bandwidth)",
                      "requestBody": {"required": True, "content": _json("StorageMigrationChange")},
                      "responses": {"200": {"description": "changed (a running copy within a progress "
                                                           "interval: a bandwidth event)",
                                            "content": _json("Job")},
                                    "400": _error("the body is not valid"), "404": _error("no such job"),
                                    "409": _error("the job already ended"), "415": _error("not JSON")}},
            "delete": {"summary": "cancel: rolls back unless the pivot happened",
                       "responses": {"202": {"description": "cancel requested", "content": _json("Job")},
                                     "404": _error("no such job"),
                                     "409": _error("the job already ended")}},
        },
        "/v1/storage-migrations/{id}/events": {
            "parameters": [_JOB_ID, {"name": "Last-Event-ID", "in": "header", "required": False,
                                     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
                           {"name": "after", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 0}}],
            "get": {"summary": "the job's events as server-sent events (the CLI's JSON events), from "
                               "the first or after an event id; the stream ends after the report",
                    "responses": {"200": {"description": "text/event-stream"},
                                  "400": _error("a bad event id"), "404": _error("no such job")}},
        },
    },
    "components": {"schemas": _SCHEMAS},
}


class BadRequest(ValueError):
    """A request body the contract refuses: ``message`` says what, ``details`` every problem."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


def _where(err: ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    return path.lstrip(".") or "body"


def validate_body(schema: str, body: Any) -> dict[str, Any]:
    """``body`` checked against component schema ``schema``.

    :returns: the body (a dict).
    :raises BadRequest: every problem found, as ``"<where>: <what>"``.
    """
    resolver_doc = {"$ref": f"#/components/schemas/{schema}", "components": DOCUMENT["components"]}
    validator = Draft202012Validator(resolver_doc)
    errors = sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        details = [f"{_where(e)}: {e.message}" for e in errors]
        raise BadRequest(f"invalid {schema}: {details[0]}", details)
    assert isinstance(body, dict)
    return body
