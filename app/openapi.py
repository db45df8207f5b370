"""The OpenAPI 3 document of the public API, written by hand, served at ``/openapi.json``.

tests/test_openapi.py runs schemathesis against it: every response of every
operation must match what is written here, and none may be a 5xx.
"""

from __future__ import annotations

from flask import Blueprint

from app.errors import json_response

openapi_api = Blueprint("openapi", __name__)

# Ids are trimmed, then must be 1-128 characters without control characters. The pattern says
# exactly that (no maxLength: surrounding whitespace does not count), so anything the schema
# refuses the service refuses too, which the negative schemathesis run checks.
# Whitespace is spelled out (Python's str.strip() set): regex engines disagree on what \s means.
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_EDGE = rf"[^{_SPACE}\x00-\x1f\x7f]"  # first and last character: neither whitespace nor control
ID_PATTERN = rf"^[{_SPACE}]*{_EDGE}(?:[^\x00-\x1f\x7f]{{0,126}}{_EDGE})?[{_SPACE}]*$"
ID_SCHEMA = {"type": "string", "minLength": 1, "pattern": ID_PATTERN}
# A list parameter's value may hold several ids, comma-separated (``genre=Drama,Comedy``): each part is
# trimmed and, unless blank (ignored), must be an id as above (app.api.Query.many).
_EDGE_OF_PART = rf"[^{_SPACE}\x00-\x1f\x7f,]"
_PART = rf"[{_SPACE}]*(?:{_EDGE_OF_PART}(?:[^,\x00-\x1f\x7f]{{0,126}}{_EDGE_OF_PART})?)?[{_SPACE}]*"
LIST_ITEM_PATTERN = rf"^{_PART}(?:,{_PART})*$"


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _id_param(name: str, description: str) -> dict:
    return {"name": name, "in": "query", "required": True, "description": description, "schema": ID_SCHEMA}


K_PARAM = {
    "name": "k",
    "in": "query",
    "required": False,
    "description": "how many titles to return",
    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
}
def _query(name: str, description: str, schema: dict, explode: bool = False) -> dict:
    param = {"name": name, "in": "query", "required": False, "description": description, "schema": schema}
    if explode:
        param.update(style="form", explode=True)
    return param


_LIST = {"type": "array", "items": {"type": "string", "pattern": LIST_ITEM_PATTERN}}
FILTER_PARAMS = [
    _query("genre", "any of these genres (repeat, or comma-separate); unknown -> 400 naming the valid ones", _LIST, True),
    _query("kind", "show or film", {"type": "string", "enum": ["show", "film"]}),
    _query("year_min", "released in or after (titles without a year are left out)", {"type": "integer", "minimum": 0, "maximum": 9999}),
    _query("year_max", "released in or before", {"type": "integer", "minimum": 0, "maximum": 9999}),
    _query("max_maturity", "highest minimum viewer age allowed (unrated titles are left out)", {"type": "integer", "minimum": 0, "maximum": 99}),
    _query("region", "ISO 3166-1 alpha-2 code of the viewer's country", {"type": "string", "pattern": "^[A-Za-z]{2}$"}),
    _query(
        "exclude", "title ids already on the page (repeat, or comma-separate; at most 500; POST /recommend for more)",
        {**_LIST, "maxItems": 500}, True,
    ),
]
DIVERSITY_PARAM = _query(
    "diversity", "0-1: re-rank by maximal marginal relevance over the item vectors (0 = by score only)",
    {"type": "number", "minimum": 0, "maximum": 1},
)
FILTER_BODY = {
    "type": "object",
    "required": ["user"],
    "properties": {
        "user": ID_SCHEMA,
        "k": {"type": "integer", "minimum": 1, "maximum": 100},
        "genre": {"type": "array", "maxItems": 50, "items": {"type": "string", "pattern": LIST_ITEM_PATTERN}},
        "kind": {"type": "string", "enum": ["show", "film"]},
        "year_min": {"type": "integer", "minimum": 0, "maximum": 9999},
        "year_max": {"type": "integer", "minimum": 0, "maximum": 9999},
        "max_maturity": {"type": "integer", "minimum": 0, "maximum": 99},
        "region": {"type": "string", "pattern": "^[A-Za-z]{2}$"},
        "diversity": {"type": "number", "minimum": 0, "maximum": 1},
        "exclude": {"type": "array", "maxItems": 10000, "items": {"type": "string", "pattern": LIST_ITEM_PATTERN}},
    },
}
NO_MODEL = _error("no model is published yet")
BAD_PARAMS = _error("a parameter is missing, repeated, too long, has control characters or is out of range")

ANSWER_ORIGIN = {
    "recommendation_id": {
        "type": "string",
        "description": "signed id of this answer: send it back with POST /impressions (and, if known, on the events it led to)",
    },
    "model_version": {"type": "string"},
    "arm": {"type": ["string", "null"], "description": "the experiment arm that served this user; null when no experiment runs"},
}

SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "EventErrors": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "rows": {
                "type": "array",
                "description": "one entry per problem (at most 100); index is the 0-based position in the batch",
                "items": {
                    "type": "object",
                    "required": ["index", "field", "error"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "field": {"type": ["string", "null"]},
                        "error": {"type": "string"},
                    },
                },
            },
        },
    },
    "Event": {
        "type": "object",
        "description": "one viewing; the data contract of the event files (extra fields are ignored)",
        "required": ["user_id", "item_id", "timestamp"],
        "properties": {
            "user_id": ID_SCHEMA,
            "item_id": ID_SCHEMA,
            "timestamp": {
                "description": "unix seconds, or an ISO-8601 string (UTC if no zone); from 1970 up to one day from now",
                "oneOf": [
                    {"type": "number", "minimum": 0},
                    {"type": "string", "minLength": 1, "maxLength": 64},
                ],
            },
            "watch_seconds": {
                "type": ["number", "null"],
                "minimum": 0,
                "maximum": 86400,
                "description": "seconds watched, if known (one viewing lasts at most a day)",
            },
            "recommendation_id": {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": 256,
                "description": "the answer this viewing came from, if the client knows it (else the latest impression "
                "that showed this title to this user within ATTRIBUTION_WINDOW is credited)",
            },
        },
    },
    "Impression": {
        "type": "object",
        "description": "one list of titles shown to a user, in the order shown",
        "required": ["user_id", "recommendation_id", "items", "timestamp"],
        "properties": {
            "user_id": ID_SCHEMA,
            "recommendation_id": {"type": "string", "minLength": 1, "maxLength": 256, "description": "from the answer shown"},
            "items": {"type": "array", "minItems": 1, "maxItems": 500, "items": ID_SCHEMA},
            "row": {"type": "string", "minLength": 1, "maxLength": 256, "description": "the page row's id, if a row of /page"},
            "timestamp": {
                "description": "when it was shown: unix seconds or ISO-8601, up to one day from now",
                "oneOf": [{"type": "number", "minimum": 0}, {"type": "string", "minLength": 1, "maxLength": 64}],
            },
        },
    },
    "ScoredTitle": {
        "type": "object",
        "required": ["item_id", "title", "score"],
        "properties": {
            "item_id": {"type": "string"},
            "title": {"type": "string"},
            "score": {"type": "number"},
            "because": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["item_id", "title"],
                    "properties": {"item_id": {"type": "string"}, "title": {"type": "string"}},
                },
                "description": "titles in the history that led here",
            },
        },
    },
    "Recommendations": {
        "type": "object",
        "required": ["recommendation_id", "model_version", "arm", "user", "strategy", "items"],
        "properties": {
            **ANSWER_ORIGIN,
            "user": {"type": "string"},
            "strategy": {"type": "string", "enum": ["personalized", "popular"]},
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/ScoredTitle"}},
        },
    },
}

PATHS = {
    "/recommend": {
        "get": {
            "summary": "Top titles for a user (personalized, or popular for users the model does not know), under filters",
            "description": (
                "Never a watched title, never one outside its availability window; k titles whenever k eligible "
                "unseen titles exist."
            ),
            "parameters": [_id_param("user", "user id"), K_PARAM, *FILTER_PARAMS, DIVERSITY_PARAM],
            "responses": {"200": _json("recommendations", {"$ref": "#/components/schemas/Recommendations"}), "400": BAD_PARAMS, "503": NO_MODEL},
        },
        "post": {
            "summary": "The same as GET, with the parameters in a JSON object (for long exclude lists)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": FILTER_BODY}}},
            "responses": {
                "200": _json("recommendations", {"$ref": "#/components/schemas/Recommendations"}),
                "400": BAD_PARAMS,
                "413": _error("the body is larger than MAX_BODY_BYTES"),
                "415": _error("the body is not JSON"),
                "503": NO_MODEL,
            },
        },
    },
    "/page": {
        "get": {
            "summary": "A whole home page of rows for a user (PAGE_CONFIG), under the same filters; no title twice",
            "parameters": [_id_param("user", "user id"), *FILTER_PARAMS],
            "responses": {
                "200": _json(
                    "rows in order",
                    {
                        "type": "object",
                        "required": ["recommendation_id", "model_version", "arm", "user", "rows"],
                        "properties": {
                            **ANSWER_ORIGIN,
                            "user": {"type": "string"},
                            "rows": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["id", "kind", "title", "items"],
                                    "properties": {
                                        "id": {"type": "string"},
                                        "kind": {"type": "string", "enum": ["top_picks", "because_you_watched", "trending", "new_for_you", "genre", "popular"]},
                                        "title": {"type": "string"},
                                        "items": {"type": "array", "items": {"$ref": "#/components/schemas/ScoredTitle"}},
                                    },
                                },
                            },
                        },
                    },
                ),
                "400": BAD_PARAMS,
                "503": NO_MODEL,
            },
        }
    },
    "/similar": {
        "get": {
            "summary": "Titles similar to a title",
            "parameters": [_id_param("item", "title id"), K_PARAM, *FILTER_PARAMS],
            "responses": {
                "200": _json(
                    "similar titles",
                    {
                        "type": "object",
                        "required": ["recommendation_id", "model_version", "arm", "item", "title", "items"],
                        "properties": {
                            **ANSWER_ORIGIN,
                            "item": {"type": "string"},
                            "title": {"type": "string"},
                            "items": {"type": "array", "items": {"$ref": "#/components/schemas/ScoredTitle"}},
                        },
                    },
                ),
                "400": BAD_PARAMS,
                "404": _error("the title is not in the served model"),
                "503": NO_MODEL,
            },
        }
    },
    "/search": {
        "get": {
            "summary": "Titles by meaning: the query embedded (all-MiniLM-L6-v2) and matched against synopses",
            "description": (
                "Exact title or id matches first (match: exact), then by meaning (match: meaning). With user, "
                "re-ranked towards the user's taste (0.7 x cosine + 0.3 x taste) with unseen titles first. "
                "The filters of /recommend apply. 503 while the worker's encoder loads, or when the version has "
                "no text index."
            ),
            "parameters": [
                {"name": "q", "in": "query", "required": True, "description": "what to search for (1-200 characters)",
                 "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
                K_PARAM,
                {"name": "user", "in": "query", "required": False, "description": "re-rank for this user",
                 "schema": ID_SCHEMA},
                *FILTER_PARAMS,
            ],
            "responses": {
                "200": _json(
                    "matching titles",
                    {
                        "type": "object",
                        "required": ["recommendation_id", "model_version", "arm", "query", "user", "items"],
                        "properties": {
                            **ANSWER_ORIGIN,
                            "query": {"type": "string"},
                            "user": {"type": ["string", "null"]},
                            "items": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["item_id", "title", "score", "match"],
                                    "properties": {
                                        "item_id": {"type": "string"},
                                        "title": {"type": "string"},
                                        "score": {"type": "number"},
                                        "match": {"type": "string", "enum": ["exact", "meaning"]},
                                    },
                                },
                            },
                        },
                    },
                ),
                "400": BAD_PARAMS,
                "503": _error("no model, no text index in this version, or the encoder is still loading (Retry-After)"),
            },
        }
    },
    "/history": {
        "get": {
            "summary": "What the service knows a user watched, newest first (fresh = from POST /events)",
            "parameters": [_id_param("user", "user id")],
            "responses": {
                "200": _json(
                    "history",
                    {
                        "type": "object",
                        "required": ["user", "model_version", "known", "items"],
                        "properties": {
                            "user": {"type": "string"},
                            "model_version": {"type": "string"},
                            "known": {"type": "boolean"},
                            "items": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["item_id", "title", "weight", "fresh"],
                                    "properties": {
                                        "item_id": {"type": "string"},
                                        "title": {"type": "string"},
                                        "weight": {"type": "number"},
                                        "fresh": {"type": "boolean"},
                                    },
                                },
                            },
                        },
                    },
                ),
                "400": BAD_PARAMS,
                "503": NO_MODEL,
            },
        }
    },
    "/events": {
        "post": {
            "summary": "Record viewings that just happened (one event or a batch of up to 1000)",
            "description": (
                "All or nothing: a batch with any bad event is refused (400, per-row errors) and nothing is stored. "
                "Accepted events are in Redis (stream, AOF) when the answer is sent, change the user's next "
                "/recommend at once, and go into the next nightly model exactly once. 503 means nothing was "
                "accepted; retry. With EVENTS_TOKEN set, send 'Authorization: Bearer <token>'."
            ),
            "security": [{}, {"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/Event"},
                                {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 1000,
                                    "items": {"$ref": "#/components/schemas/Event"},
                                },
                            ]
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    "stored and applied",
                    {
                        "type": "object",
                        "required": ["accepted", "ids", "not_in_model"],
                        "properties": {
                            "accepted": {"type": "integer", "minimum": 1},
                            "ids": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "stream ids, in order",
                            },
                            "not_in_model": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "titles the served model does not know yet: kept for the nightly job",
                            },
                        },
                    },
                ),
                "400": _json(
                    "bad JSON or events that break the data contract; nothing stored",
                    {"$ref": "#/components/schemas/EventErrors"},
                ),
                "401": _error("EVENTS_TOKEN is set and the request has no bearer token, or a wrong one"),
                "413": _error("the body is larger than MAX_BODY_BYTES (chunked bodies too); nothing stored"),
                "415": _error("the body is not JSON"),
                "503": _error("Redis cannot take the events now (down, or full); nothing was accepted; see Retry-After"),
            },
        }
    },
    "/impressions": {
        "post": {
            "summary": "Report what was shown (one impression or a batch of up to 1000): the basis of CTR and experiments",
            "description": (
                "All or nothing, validated like events (400 with per-row errors); a recommendation_id this service "
                "did not issue is refused. Stored in Redis (a stream, compacted with the events); a viewing of a "
                "shown title by the same user within ATTRIBUTION_WINDOW is credited to the latest impression that "
                "showed it. Same authorization as POST /events."
            ),
            "security": [{}, {"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/Impression"},
                                {"type": "array", "minItems": 1, "maxItems": 1000, "items": {"$ref": "#/components/schemas/Impression"}},
                            ]
                        }
                    }
                },
            },
            "responses": {
                "200": _json("stored and counted", {"type": "object", "required": ["accepted"], "properties": {"accepted": {"type": "integer", "minimum": 1}}}),
                "400": _json("bad JSON or invalid impressions; nothing stored", {"$ref": "#/components/schemas/EventErrors"}),
                "401": _error("EVENTS_TOKEN is set and the request has no bearer token, or a wrong one"),
                "413": _error("the body is larger than MAX_BODY_BYTES; nothing stored"),
                "415": _error("the body is not JSON"),
                "503": _error("Redis cannot take the impressions now; nothing was stored; see Retry-After"),
            },
        }
    },
    "/healthz": {
        "get": {
            "summary": "The process answers (liveness)",
            "responses": {
                "200": _json(
                    "alive", {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
                )
            },
        }
    },
    "/readyz": {
        "get": {
            "summary": "A model is loaded (readiness); degraded while Redis is unreachable; fallback while the live version does not load",
            "responses": {
                "200": _json(
                    "serving; degraded = answering from the loaded model without Redis",
                    {
                        "type": "object",
                        "required": ["status", "model_version", "redis"],
                        "properties": {
                            "status": {"type": "string", "enum": ["ready", "degraded", "fallback"]},
                            "model_version": {"type": "string"},
                            "live_version": {
                                "type": "string",
                                "description": "fallback: the live version this worker cannot load (it retries)",
                            },
                            "error": {"type": ["string", "null"]},
                            "redis": {"type": "string", "enum": ["ok", "unreachable"]},
                        },
                    },
                ),
                "503": _json(
                    "no model loaded",
                    {
                        "type": "object",
                        "required": ["status", "error"],
                        "properties": {
                            "status": {"const": "not ready"},
                            "error": {"type": "string"},
                            "model_version": {"type": ["string", "null"]},
                            "redis": {"type": "string", "enum": ["ok", "unreachable"]},
                        },
                    },
                ),
            },
        }
    },
    "/version": {
        "get": {
            "summary": "Metadata of the served model version (counts, params, metrics, timings)",
            "responses": {
                "200": _json(
                    "version metadata",
                    {
                        "type": "object",
                        "required": ["model_version", "checksum"],
                        "properties": {"model_version": {"type": "string"}, "checksum": {"type": "string"}},
                    },
                ),
                "503": NO_MODEL,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _json("OpenAPI 3.1 document", {"type": "object", "required": ["openapi", "paths"]})},
        }
    },
}

DOCUMENT = {
    "openapi": "3.1.0",
    "info": {
        "title": "Recommendation service",
        "version": "1",
        "description": 'Every error is JSON {"error": "..."}. Ids are opaque strings (1-128 characters, no control characters).',
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "a token from EVENTS_TOKEN"}},
    },
}


@openapi_api.get("/openapi.json")
def openapi_document():
    return json_response(DOCUMENT)
