"""Hostile input against the OpenAPI document: schemathesis drives the Flask app (real Redis).

Every operation gets schema-valid and schema-breaking requests; no answer may be
a 5xx and every answer must match the documented status codes, content type
and body schema. Plus the cases a generator does not reach: huge and repeated
parameters, through the app and through real gunicorn.
"""

from __future__ import annotations

from http.client import HTTPConnection

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.openapi import DOCUMENT
from tests.helpers import get, http, start_gunicorn, stop
from tests.test_events import make_app


@pytest.fixture
def service(redis_server, store, trained_demo, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    app = make_app(redis_server, store, tmp_path)
    assert app.extensions["search_encoder"].wait(120)  # /search answers, not "loading" (loaded once per process)
    return app


OPERATIONS = [(method, path) for path, item in DOCUMENT["paths"].items() for method in item]
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # Without parameters or a body there is nothing to break.
    if mode is GenerationMode.POSITIVE or {"parameters", "requestBody"} & DOCUMENT["paths"][path][method].keys()
]
@schemathesis.check
def negative_data_rejection_or_413(ctx, response, case):
    """schemathesis' check that invalid data is refused, counting 413 as a refusal too (a generated body
    over MAX_BODY_BYTES is refused by its size before it is read; the default list lacks 413)."""
    if response.status_code == 413:
        return None
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection_or_413,
]


# schemathesis' own pytest integration does not run under pytest 9 (it reads a removed
# attribute), so each operation's strategy is driven by hypothesis directly.
@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m.upper()} {p} {mode.value}" for m, p, mode in CASES])
def test_every_operation_conforms_and_never_5xx(service, method, path, mode):
    api = schemathesis.openapi.from_wsgi("/openapi.json", service)
    operation = api[path][method]
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def check(data):
        case = data.draw(strategy)
        case.call_and_validate(checks=CHECKS)

    check()


@pytest.mark.parametrize(
    "value",
    [
        "t1", "t1,t2", " t1 , t2 ", "", ",,", "\U0004a0dav,\u00dc7\u00e5\u00b6",  # the comma-separated forms
        "\tt1", "t1\tt2", "t1\x01", "a" * 128, "a" * 129, "a" * 128 + "," + "b" * 128, "a" * 128 + ",b" * 2,
    ],
)
def test_list_parameters_schema_accepts_exactly_what_the_service_accepts(service, value):
    """``exclude`` and ``genre`` take comma-separated ids in one value: the schema's item pattern must say
    so, or the negative run flags a comma-separated list (schemathesis found one: a 200 for a "violation")."""
    import re
    from urllib.parse import quote

    from app.openapi import LIST_ITEM_PATTERN

    response = service.test_client().get(f"/recommend?user=u1&exclude={quote(value)}")
    assert response.status_code in (200, 400)
    assert (response.status_code == 200) == bool(re.match(LIST_ITEM_PATTERN, value)), response.get_json()


def test_document_describes_every_public_route(service):
    client = service.test_client()
    served = client.get("/openapi.json").get_json()
    assert served == DOCUMENT and served["openapi"].startswith("3.")
    rules = {
        rule.rule
        for rule in service.url_map.iter_rules()
        if rule.endpoint.split(".")[0] in ("api", "events", "openapi", "pages", "online", "search")
    }
    assert rules == set(served["paths"])
    assert "503" in served["paths"]["/events"]["post"]["responses"]


@pytest.mark.parametrize(
    "query, status",
    [
        ("user=" + "u" * 100_000, 400),  # huge: refused by the length rule, not a crash
        ("user=a&" + "&".join(f"user=b{n}" for n in range(2000)), 400),  # repeated
        ("user=a&" + "&".join(f"x{n}=1" for n in range(5000)), 200),  # many unknown params are ignored
        ("user=%F0%9F%8E%AC%20%E2%80%AE&k=5", 200),  # emoji and a right-to-left override
        ("user=%ff%fe", 200),  # bytes that are not UTF-8 decode to U+FFFD: just an unknown user
        ("user=a&k=" + "9" * 5000, 400),
    ],
)
def test_huge_and_repeated_parameters_through_the_app(service, query, status):
    response = service.test_client().get(f"/recommend?{query}")
    assert response.status_code == status
    assert response.is_json and (status == 200 or "error" in response.get_json())


def declared_body_status(base: str, path: str, length: int) -> int:
    """The status gunicorn answers to a POST that declares a ``length``-byte body, sending only the headers.

    The service refuses on Content-Length alone, before reading the body. Had
    the client sent the body too, the server's close with the unread bytes in
    its buffer would send a TCP reset that can discard the 413 before the
    client reads it (a race, not a refusal).
    """
    host, port = base.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", path)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(length))
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status


@pytest.mark.slow
def test_huge_requests_through_gunicorn_are_refused_not_failed(redis_server, store, trained_demo, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    process, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache", workers=1)
    try:
        statuses = {
            "long url": http("GET", f"{base}/recommend?user={'u' * 20_000}")[0],
            "many params": http("GET", f"{base}/recommend?" + "&".join(f"user={n}" for n in range(600)))[0],
            "big body": declared_body_status(base, "/events", 2 << 20),
            "many headers": http("GET", f"{base}/healthz", headers={f"X-H{n}": "1" for n in range(150)})[0],
        }
        still_fine = get(f"{base}/recommend?user=someone")[0]
    finally:
        log = stop(process)
    print(f"\ngunicorn hostile requests: {statuses}")
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    assert statuses["big body"] == 413
    assert still_fine == 200 and "Traceback" not in log


def test_the_id_pattern_says_exactly_what_the_service_accepts():
    """The negative run relies on it: what the pattern refuses, the service must refuse, and back."""
    import random
    import re

    from app.openapi import ID_PATTERN

    def service_accepts(value: str) -> bool:  # app.api.Query.id and models.data.validate_event_records
        value = value.strip()
        return 0 < len(value) <= 128 and not re.search(r"[\x00-\x1f\x7f]", value)

    pattern = re.compile(ID_PATTERN)
    alphabet = [
        chr(c) for c in [*range(0x30), 0x7F, 0x85, 0xA0, 0x1680, 0x2000, 0x200A, 0x200B, 0x2028, 0x3000, 0xFEFF, 0xF5]
    ]
    rng = random.Random(7)
    for _ in range(50_000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        if rng.random() < 0.05:
            value = rng.choice(["", " "]) + "x" * rng.randint(120, 130) + rng.choice(["", " ", "\x00"])
        assert bool(pattern.search(value)) == service_accepts(value), repr(value)
