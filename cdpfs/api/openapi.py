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


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "cdpfs node API", "version": str(FORMAT)},
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
        "paths": PATHS,
    }
