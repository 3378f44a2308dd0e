"""The OpenAPI document of the node API (``GET /api/v1/openapi.json``).

Written by hand, beside the routes of ``app``: the t1 API test checks that every
route is described here and every path described is a route.
"""

from __future__ import annotations

from typing import Any

from .documents import FORMAT

_JSON = {"application/json": {"schema": {"type": "object"}}}
_ERROR = {"description": "refused: {\"error\": \"one line\"}", "content": _JSON}
_READ = {"401": _ERROR}
_HEALTH = {"200": {"description": "yes", "content": _JSON},
           "503": {"description": "no", "content": _JSON}}

PATHS: dict[str, dict[str, Any]] = {
    "/health": {"get": {"summary": "The node runs: its role and lag", "security": [],
                        "responses": {"200": {"description": "running", "content": _JSON}}}},
    "/primary": {"get": {"summary": "200 only on the primary that takes writes",
                         "security": [], "responses": _HEALTH}},
    "/replica": {"get": {
        "summary": "200 only on a replica (with lag=N: at most N records behind)",
        "security": [], "parameters": [{"name": "lag", "in": "query",
                                        "schema": {"type": "integer"}}],
        "responses": {**_HEALTH, "400": _ERROR}}},
    "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format)",
                         "responses": {"200": {"description": "metrics", "content": {
                             "text/plain": {"schema": {"type": "string"}}}}, **_READ}}},
    "/api/v1/status": {"get": {
        "summary": "The store's status, as cdpfs status --json prints it",
        "responses": {"200": {"description": "status", "content": _JSON}, **_READ,
                      "503": _ERROR}}},
    "/api/v1/node": {"get": {"summary": "What the process serves and its role",
                             "responses": {"200": {"description": "node",
                                                   "content": _JSON}, **_READ}}},
    "/api/v1/events": {"get": {
        "summary": "Newline-delimited JSON events after an id, then as they happen; "
                   "ids are gap-free within a run (the first line tells the run)",
        "parameters": [{"name": "after", "in": "query", "schema": {"type": "integer"}},
                       {"name": "follow", "in": "query", "schema": {"type": "boolean"}}],
        "responses": {"200": {"description": "events", "content": {
            "application/x-ndjson": {"schema": {"type": "string"}}}}, **_READ,
            "400": _ERROR}}},
    "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [],
                                     "responses": {"200": {"description": "OpenAPI",
                                                           "content": _JSON}}}},
    "/api/v1/bookmarks": {"post": {
        "summary": "Bookmark a point of the live volume (admin)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"},
                           "at": {"type": "string", "description": "a moment"}}}}}},
        "responses": {"201": {"description": "made", "content": _JSON}, "400": _ERROR,
                      **_READ, "403": _ERROR, "409": _ERROR, "413": _ERROR,
                      "415": _ERROR}}},
}


def _query(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "schema": {"type": "string"}} for n in names]


def _reading(summary: str, *params: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": _query(*params),
                    "responses": {"200": {"description": summary, "content": _JSON},
                                  **_READ, "400": _ERROR, "503": _ERROR}}}


def _acting(summary: str, properties: dict[str, str]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": {k: {"type": t} for k, t in properties.items()}}}}},
        "responses": {"200": {"description": "done", "content": _JSON},
                      "202": {"description": "started", "content": _JSON}, "400": _ERROR,
                      **_READ, "403": _ERROR, "409": _ERROR, "413": _ERROR, "415": _ERROR}}}


PATHS.update({
    "/api/v1/stat": _reading("Where the store's bytes go (cdpfs stat --json)"),
    "/api/v1/changes": _reading("What changed between two moments (cdpfs diff --json)",
                                "a", "b", "path"),
    "/api/v1/tree": _reading("A directory as it was at a moment", "at", "path"),
    "/api/v1/versions": _reading("The versions of a file, newest first", "path"),
    "/api/v1/diff": _reading("A unified diff of a text file between two moments",
                             "path", "a", "b"),
    "/api/v1/timeline": _reading("Writes per interval and the marks on a stretch of time",
                                 "seconds", "buckets"),
    "/api/v1/restore": _acting("Put a file or directory back as it was (a mount)",
                               {"path": "string", "at": "string", "delete": "boolean"}),
    "/api/v1/switchover": _acting("Hand the primary role to a node (an HA node)",
                                  {"node": "string", "timeout": "number"}),
    "/api/v1/drtests": _acting("Run the scheduled DR test now (a replica server)", {}),
    "/api/v1/backups": _acting("Run the scheduled backup now (a replica server)", {}),
})


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "cdpfs node API", "version": str(FORMAT)},
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
        "paths": PATHS,
    }
