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

#: HOST:PORT as channel.addr.parse_hostport takes it: a host name (its labels) or an IPv4 address,
#: or an IPv6 address in brackets; a port 1..65535 (a listener's may be 0, its host empty).
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join([f"({_H16}:){{7}}{_H16}", f"({_H16}:){{1,7}}:", f"({_H16}:){{1,6}}:{_H16}",
                  *(f"({_H16}:){{1,{6 - n}}}(:{_H16}){{1,{n + 1}}}" for n in range(1, 6)),
                  f":((:{_H16}){{1,7}}|:)"])
_LABEL = "[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = f"({_LABEL}(\\.{_LABEL})*\\.?|\\[({_IPV6})\\])"
_PORT = "0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_HOSTPORT = {"type": "string", "minLength": 1, "maxLength": 300, "description": "HOST:PORT ([IPv6]:PORT)",
             "pattern": f"^\\s*{_HOST}:{_PORT}\\s*$"}
_LISTEN = {**_HOSTPORT, "pattern": f"^\\s*{_HOST}?:({_PORT}|0+)\\s*$",
           "description": "HOST:PORT; :PORT for every interface; port 0 picks one (the `listening` event "
                          "gives it)"}
#: A path: no NUL byte (the kernel ends a unix socket path at one, so "/a\0b" would reach "/a").
_NO_NUL = "^[^\\x00]*$"
_QMP = {"type": "string", "minLength": 1, "maxLength": 107, "pattern": _NO_NUL,
        "description": "the QEMU's QMP unix socket"}
_NODES = {"type": "array", "minItems": 1, "maxItems": 64,
          "items": {"type": "string", "minLength": 1, "maxLength": 256},
          "description": "disks by block node name or device id (default: every writable disk)"}
_DOWNTIME = {"type": "integer", "minimum": 1, "maximum": 2_000_000, "default": 300,
             "description": "the guest's pause QEMU may take at the switchover (ms)"}
#: The channel options of both sides.
_CHANNEL: dict[str, Any] = {
    "bandwidth": _RATE,
    "compress": {"enum": ["auto", "on", "off"], "default": "auto"},
    "grace": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 60,
              "description": "seconds a session survives with no connection"},
    "workdir": {"type": "string", "minLength": 1, "maxLength": 60,
                "description": "where the private socket directories go (default: the system's tmp)"},
}

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
            "target": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": _NO_NUL,
                       "description": "a file path, a host block device (/dev/...) or blockdev JSON"},
            "format": {"enum": ["raw", "qcow2"], "description": "of a file target; default the disk's own"},
        },
    },
    "StorageMigrationRequest": {
        "type": "object", "additionalProperties": False, "required": ["disks"],
        "oneOf": [{"required": ["qmp"]}, {"required": ["libvirt"]}],
        "properties": {
            "qmp": _QMP,
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
    "Tls": {
        "type": "object", "additionalProperties": False,
        "description": "mutual TLS of the channel: a `dataplane certs init` directory (`peer_name` may "
                       "override the peer's name), or `cert`, `key`, `ca` and `peer_name`; or `plaintext` "
                       "(loopback only unless `plaintext_network_is_isolated`). Paths are the daemon's.",
        "oneOf": [{"required": ["certs"]}, {"required": ["cert", "key", "ca", "peer_name"]},
                  {"required": ["plaintext"]}],
        "properties": {
            "certs": {"type": "string", "minLength": 1, "maxLength": 4096},
            "cert": {"type": "string", "minLength": 1, "maxLength": 4096},
            "key": {"type": "string", "minLength": 1, "maxLength": 4096},
            "ca": {"type": "string", "minLength": 1, "maxLength": 4096},
            "peer_name": {"type": "string", "minLength": 1, "maxLength": 253},
            "plaintext": {"const": True},
            "plaintext_network_is_isolated": {"type": "boolean"},
        },
    },
    "MigrationRequest": {
        "type": "object", "additionalProperties": False, "required": ["to", "tls"],
        "oneOf": [{"required": ["qmp"]}, {"required": ["libvirt"]}],
        "description": "the parameters of `dataplane migrate` (the source side)",
        "properties": {
            "to": _HOSTPORT,
            "qmp": _QMP,
            "libvirt": {"$ref": "#/components/schemas/LibvirtDomain"},
            "tls": {"$ref": "#/components/schemas/Tls"},
            "disks": _NODES,
            "disk_map": {"type": "object", "maxProperties": 64,
                         "additionalProperties": {"type": "string", "minLength": 1, "maxLength": 256},
                         "description": "disk here -> node or device id on the destination"},
            "downtime_ms": _DOWNTIME,
            "multifd": {"type": "integer", "minimum": 0, "maximum": 255, "default": 0},
            "postcopy": {"enum": ["never", "auto"], "default": "auto"},
            "auto_converge": {"enum": ["auto", "on", "off"], "default": "auto"},
            "stall_window": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 10},
            "stall_shrink": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.05},
            "timeout_base": {"type": "number", "exclusiveMinimum": 0, "maximum": 7 * 86400, "default": 120},
            "timeout_per_gib": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400, "default": 120},
            "connections": {"type": "integer", "minimum": 1, "maximum": 16, "default": 1},
            "receiver": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9._-]+$",
                         "description": "the receiver (its job id) that must take the migration on the "
                                        "destination daemon's shared listener"},
            **_CHANNEL,
        },
    },
    "ReceiverRequest": {
        "type": "object", "additionalProperties": False,
        "allOf": [{"oneOf": [{"required": ["qmp"]}, {"required": ["libvirt"]}]},
                  {"oneOf": [{"required": ["listen", "tls"]},
                             {"required": ["peer"], "not": {"anyOf": [{"required": ["listen"]},
                                                                      {"required": ["tls"]}]}}]}],
        "description": "the parameters of `dataplane receive` (the destination side): on a listener of "
                       "its own (`listen`, `tls`), or on the daemon's shared one (`serve --listen`) for "
                       "the source whose certificate carries `peer`",
        "properties": {
            "peer": {"type": "string", "minLength": 1, "maxLength": 253,
                     "description": "on the daemon's shared listener: the name the source's "
                                    "certificate must carry"},
            "listen": _LISTEN,
            "qmp": _QMP,
            "libvirt": {"$ref": "#/components/schemas/LibvirtDomain"},
            "tls": {"$ref": "#/components/schemas/Tls"},
            "disks": _NODES,
            "paused": {"type": "boolean", "default": False},
            "preallocated": {"type": "boolean", "default": False},
            **_CHANNEL,
        },
    },
    "MigrationChange": {
        "type": "object", "additionalProperties": False, "minProperties": 1,
        "properties": {"bandwidth": _RATE, "downtime_ms": _DOWNTIME},
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
            "kind": {"enum": ["storage-migration", "migration", "receiver"]},
            "state": {"enum": ["queued", "running", "completed", "rolled-back", "partial", "in-doubt",
                               "refused", "aborted", "cancelled", "failed"]},
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


def _job_paths(resource: str, what: str, request: str, change: str | None, changes: str,
               cancel: str) -> dict[str, Any]:
    """The paths of one kind of job: list, create, get, cancel, (change), events."""
    item: dict[str, Any] = {
        "parameters": [_JOB_ID],
        "get": {"summary": "get", "responses": {
            "200": {"description": "the job", "content": _json("Job")}, "404": _error("no such job")}},
        "delete": {"summary": f"cancel: {cancel}",
                   "responses": {"202": {"description": "cancel requested", "content": _json("Job")},
                                 "404": _error("no such job"),
                                 "409": _error("the job already ended")}},
    }
    if change is not None:
        item["patch"] = {"summary": f"change a queued or running job live: {changes}",
                         "requestBody": {"required": True, "content": _json(change)},
                         "responses": {"200": {"description": "changed (a running job within a progress "
                                                              "interval)", "content": _json("Job")},
                                       "400": _error("the body is not valid"), "404": _error("no such job"),
                                       "409": _error("the job already ended"),
                                       "413": _error("the body is over 1 MiB"), "415": _error("not JSON")}}
    return {
        f"/v1/{resource}": {
            "get": {"summary": "list", "responses": {"200": {
                "description": "the jobs, oldest first",
                "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"items": {
                        "type": "array", "items": {"$ref": "#/components/schemas/Job"}}}}}}}}},
            "post": {"summary": f"start a {what} (queued beyond the node's limit)",
                     "requestBody": {"required": True, "content": _json(request)},
                     "responses": {"201": {"description": "created", "content": _json("Job")},
                                   "400": _error("the body is not valid"),
                                   "403": _error("a disallowed peer (plaintext on an address other "
                                                 "hosts may reach)"),
                                   "413": _error("the body is over 1 MiB"),
                                   "415": _error("not JSON"),
                                   "503": _error("shutting down, or reconciling what a previous run left")}},
        },
        f"/v1/{resource}/{{id}}": item,
        f"/v1/{resource}/{{id}}/events": {
            "parameters": [_JOB_ID, {"name": "Last-Event-ID", "in": "header", "required": False,
                                     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
                           {"name": "after", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}}],
            "get": {"summary": "the job's events as server-sent events (the CLI's JSON events), from "
                               "the first or after an event id; the stream ends after the report",
                    "responses": {"200": {"description": "text/event-stream"},
                                  "400": _error("a bad event id"), "404": _error("no such job")}},
        },
    }


DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "dataplane node daemon", "version": API_VERSION,
             "description": "Live migrations on this node: storage live migrations, cross-cluster "
                            "migrations (the source side) and receivers (the destination side)."},
    "paths": {
        "/healthz": {"get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "readiness", "responses": {"200": {"description": "ready"},
                                                                   "503": {"description": "shutting down"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text format 0.0.4"}}}},
        "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "it"}}}},
        **_job_paths("storage-migrations", "storage live migration", "StorageMigrationRequest",
                     "StorageMigrationChange", "its copy bandwidth", "rolls back unless the pivot happened"),
        **_job_paths("migrations", "cross-cluster live migration (the source side)", "MigrationRequest",
                     "MigrationChange", "its channel bandwidth and its downtime limit",
                     "rolls back unless the switchover happened"),
        **_job_paths("receivers", "receiver of one cross-cluster migration (the destination side)",
                     "ReceiverRequest", None, "",
                     "aborts unless the guest already resumed here"),
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
