"""openapi.yaml describes the app exactly: every route, and every answer's status and body.

Answers are checked with openapi-core, which validates a response against the
operation, status and content type the document gives for it.
"""
import gzip
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from jsonschema import Draft202012Validator
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIResponse
from openapi_core.testing import MockRequest

from ingestion_api import create_app

EVENT = {"site_id": "site1", "event_type": "page_view", "path": "/home", "user_id": "u1"}
PAGEVIEW = '{"n":"pageview","u":"https://example.com/pricing","d":"example.com","r":null}'
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
KEY = "test-key"
# methods every route answers by itself
AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}


@pytest.fixture(scope="module")
def document():
    with open(Path(__file__).parent.parent / "openapi.yaml", encoding="utf-8") as file:
        return yaml.safe_load(file)


@pytest.fixture(scope="module")
def openapi(document):
    return OpenAPI.from_dict(document)        # refuses a document that is not valid OpenAPI 3.1


@pytest.fixture
def keyed_client(config):
    return create_app(config.with_overrides(api_keys=(KEY,))).test_client()


def described(openapi, response):
    """Assert that the document describes this answer to this request; return the response."""
    request = response.request      # its body is read already; the answer is what is checked
    openapi.validate_response(MockRequest(request.host_url, request.method, request.path),
                              WerkzeugOpenAPIResponse(response))
    return response


def openapi_path(rule):
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_the_document_is_openapi_3_1(document, openapi):
    assert document["openapi"].startswith("3.1.")


def test_openapi_json_serves_the_document(client, document, openapi):
    response = described(openapi, client.get("/openapi.json"))
    assert response.get_json() == document


def schemas_with_examples(node, pointer=""):
    """(JSON pointer, examples) of each schema in the document that has examples, however deep:
    a schema's examples are a list, where a parameter's or a media type's are a mapping."""
    if isinstance(node, dict):
        if isinstance(node.get("examples"), list):
            yield pointer, node["examples"]
        children = node.items()
    else:
        children = enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from schemas_with_examples(child, f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}")


def test_examples_in_the_document_fit_their_schemas(document):
    schemas = list(schemas_with_examples(document))
    assert schemas, "no examples to check"
    for pointer, examples in schemas:
        # the whole document as root, so that its $refs resolve
        validator = Draft202012Validator({**document, "$ref": "#" + quote(pointer)})
        for example in examples:
            validator.validate(example)


def test_every_route_is_described(app, document):
    routes = {(openapi_path(rule.rule), method.lower())
              for rule in app.url_map.iter_rules() for method in rule.methods - AUTOMATIC_METHODS}
    operations = {(path, method) for path, item in document["paths"].items() for method in item
                  if method.upper() not in AUTOMATIC_METHODS}
    assert routes - operations == set(), "routes missing from openapi.yaml"
    assert operations - routes == set(), "operations in openapi.yaml that the app does not have"


# (method, url, request options, expected status): valid and invalid requests to every endpoint
EXCHANGES = [
    ("post", "/event", {"json": EVENT}, 200),
    ("post", "/event", {"data": '{"site_id": "s", "event_type": "x"}', "content_type": "text/plain"}, 200),
    ("post", "/event", {"json": {"event_type": "page_view"}}, 400),
    ("post", "/event", {"json": {**EVENT, "timestamp": "yesterday"}}, 400),
    ("post", "/event", {"data": "not json", "content_type": "application/json"}, 400),
    ("post", "/event", {"json": {**EVENT, "path": "x" * 70_000}}, 413),
    ("post", "/events", {"json": [EVENT, EVENT]}, 200),
    ("post", "/events", {"data": '{"site_id":"s","event_type":"x"}\n' * 3,
                         "content_type": "application/x-ndjson"}, 200),
    ("post", "/events", {"json": [EVENT, {"site_id": "s"}]}, 400),
    ("post", "/events", {"json": []}, 400),
    ("post", "/events", {"json": EVENT}, 400),
    ("post", "/events", {"data": "{}\nnot json\n", "content_type": "application/x-ndjson"}, 400),
    ("post", "/events", {"json": [EVENT] * 1001}, 400),
    ("post", "/api/event", {"data": PAGEVIEW, "content_type": "text/plain",
                            "headers": {"User-Agent": BROWSER}}, 202),
    ("post", "/api/event", {"data": PAGEVIEW, "content_type": "text/plain",
                            "headers": {"User-Agent": "Googlebot/2.1 (+http://www.google.com/bot.html)"}}, 202),
    ("post", "/api/event", {"data": '{"n":"pageview","d":"example.com"}', "content_type": "text/plain",
                            "headers": {"User-Agent": BROWSER}}, 400),
    ("post", "/api/event", {"data": "{", "headers": {"User-Agent": BROWSER}}, 400),
    ("post", "/api/event", {"data": "x" * 70_000, "headers": {"User-Agent": BROWSER}}, 413),
    ("post", "/event", {"data": gzip.compress(b"{}"), "headers": {"Content-Encoding": "gzip"}}, 415),
    ("post", "/events", {"data": gzip.compress(b"[]"), "headers": {"Content-Encoding": "gzip"}}, 415),
    ("post", "/api/event", {"data": gzip.compress(PAGEVIEW.encode()),
                            "headers": {"Content-Encoding": "gzip", "User-Agent": BROWSER}}, 415),
    ("options", "/api/event", {}, 204),
    ("options", "/event", {}, 204),
    ("options", "/events", {}, 204),
    ("get", "/stats?site_id=site1", {}, 200),
    ("get", "/stats?site_id=site1&date=2025-01-15&limit=5", {}, 200),
    ("get", "/stats?site_id=site1&from=2025-01-01&to=2025-01-31", {}, 200),
    ("get", "/stats", {}, 400),
    ("get", "/stats?site_id=site1&date=2025-02-30", {}, 400),
    ("get", "/stats?site_id=site1&limit=0", {}, 400),
    ("get", "/stats/timeseries?site_id=site1", {}, 200),
    ("get", "/stats/timeseries?site_id=site1&interval=hour&date=2025-01-15", {}, 200),
    ("get", "/stats/timeseries?site_id=site1&interval=week", {}, 400),
    ("get", "/stats/timeseries?site_id=site1&from=2025-02-01&to=2025-01-01", {}, 400),
    ("get", "/stats/breakdown?site_id=site1&property=path", {}, 200),
    ("get", "/stats/breakdown?site_id=site1&property=props.plan&from=2025-01-01&to=2025-01-02", {}, 200),
    ("get", "/stats/breakdown?site_id=site1", {}, 400),
    ("get", "/stats/breakdown?site_id=site1&property=colour", {}, 400),
    ("get", "/stats/props?site_id=site1&date=2025-01-15", {}, 200),
    ("get", "/stats/props?site_id=site1&limit=x", {}, 400),
    ("get", "/stats/sites", {}, 200),
    ("get", "/", {}, 200),
    ("get", "/health", {}, 200),
    ("get", "/metrics", {}, 200),
    ("get", "/js/script.js", {}, 200),
    ("get", "/js/script.js", {"headers": {"Accept-Encoding": "gzip"}}, 200),
    ("get", "/static/script.js", {}, 200),
    ("get", "/static/nothing-here.css", {}, 404),
    ("get", "/openapi.json", {}, 200),
]


@pytest.mark.parametrize("method, url, options, status", EXCHANGES,
                         ids=[f"{m.upper()} {u[:40]} {s}" for m, u, _, s in EXCHANGES])
def test_answer_is_described(client, openapi, method, url, options, status):
    response = getattr(client, method)(url, **options)
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    described(openapi, response)


@pytest.mark.parametrize("url, body", [("/event", '{"site_id": "s", "event_type": "x"}'),
                                       ("/events", '{"site_id": "s", "event_type": "x"}\n'),
                                       ("/api/event", PAGEVIEW)])
def test_a_body_shorter_than_its_content_length_is_a_described_400(client, openapi, url, body):
    response = client.post(url, data=body, content_type="text/plain", headers={"User-Agent": BROWSER},
                           environ_overrides={"CONTENT_LENGTH": str(len(body) + 10)})
    assert response.status_code == 400
    assert described(openapi, response).get_json()["error"].startswith("Incomplete request body")


def test_unchanged_script_is_a_described_304(client, openapi):
    etag = client.get("/js/script.js").headers["ETag"]
    response = client.get("/js/script.js", headers={"If-None-Match": etag})
    assert response.status_code == 304
    described(openapi, response)


@pytest.mark.parametrize("path", ["/stats?site_id=s", "/stats/timeseries?site_id=s",
                                  "/stats/breakdown?site_id=s&property=path", "/stats/props?site_id=s",
                                  "/stats/sites"])
def test_reports_without_a_key_are_a_described_401(keyed_client, openapi, path):
    response = keyed_client.get(path)
    assert response.status_code == 401
    described(openapi, response)
    response = keyed_client.get(path, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    described(openapi, response)


@pytest.mark.parametrize("method, url, options", [
    ("get", "/health", {}),
    ("post", "/event", {"json": EVENT}),
    ("post", "/events", {"json": [EVENT]}),
    ("post", "/api/event", {"data": PAGEVIEW, "headers": {"User-Agent": BROWSER}}),
])
def test_unwritable_queue_answers_are_described_503s(client, config, openapi, method, url, options):
    shutil.rmtree(config.data_dir)
    response = getattr(client, method)(url, **options)
    assert response.status_code == 503
    described(openapi, response)


@pytest.mark.parametrize("method, url, options, status", [
    ("post", "/event", {"json": {**EVENT, "site_id": "junk"}}, 400),
    ("post", "/events", {"json": [EVENT, {**EVENT, "site_id": "junk"}]}, 400),
    ("post", "/api/event", {"data": PAGEVIEW.replace("example.com", "junk.test"),
                            "headers": {"User-Agent": BROWSER}}, 202),
])
def test_answers_to_a_site_not_in_sites_are_described(config, openapi, method, url, options, status):
    client = create_app(config.with_overrides(sites=frozenset({"site1", "example.com"}))).test_client()
    response = getattr(client, method)(url, **options)
    assert response.status_code == status
    described(openapi, response)


@pytest.mark.parametrize("url", ["/stats?site_id=s", "/stats/timeseries?site_id=s",
                                 "/stats/breakdown?site_id=s&property=path", "/stats/props?site_id=s",
                                 "/stats/sites"])
def test_unreadable_database_answers_are_described_503s(client, config, openapi, url):
    shutil.rmtree(config.data_dir)
    response = client.get(url)
    assert response.status_code == 503
    described(openapi, response)


@pytest.mark.parametrize("url, options", [
    ("/event", {"json": EVENT}),
    ("/events", {"json": [EVENT]}),
    ("/api/event", {"data": PAGEVIEW, "headers": {"User-Agent": BROWSER}}),
])
def test_rate_limited_answers_are_described_429s(config, openapi, url, options):
    client = create_app(config.with_overrides(rate_limit="1/minute")).test_client()
    assert client.post(url, **options).status_code in (200, 202)
    response = client.post(url, **options)
    assert response.status_code == 429
    described(openapi, response)
