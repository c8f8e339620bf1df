"""The WSGI fast path answers the ingest POSTs exactly as the Flask routes behind it do."""
import gzip
import io
import shutil

import pytest
from werkzeug.test import Client

from ingest import FastPath
from ingestion_api import create_app

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/156.0.0.0 Safari/537.36")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
PAGEVIEW = b'{"n":"pageview","u":"http://example.test/a","d":"example.test","r":null}'

# (name, path, body, content type, User-Agent)
REQUESTS = [
    ("event", "/event", b'{"site_id":"s","event_type":"page_view","path":"/a"}', "application/json", None),
    ("event as text/plain", "/event", b'{"site_id":"s","event_type":"v"}', "text/plain;charset=UTF-8", None),
    ("event not json", "/event", b"nope", "application/json", None),
    ("event missing field", "/event", b'{"site_id":"s"}', "application/json", None),
    ("event bad timestamp", "/event", b'{"site_id":"s","event_type":"v","timestamp":"x"}', None, None),
    ("event over the limit", "/event", b'{"x":"' + b"x" * 70_000 + b'"}', "application/json", None),
    ("event empty body", "/event", b"", None, None),
    ("batch", "/events", b'[{"site_id":"s","event_type":"v"},{"site_id":"t","event_type":"v"}]', None, None),
    ("batch ndjson", "/events", b'{"site_id":"s","event_type":"v"}\n\n{"site_id":"s","event_type":"w"}\n',
     "application/x-ndjson; charset=utf-8", None),
    ("batch bad event", "/events", b'[{"site_id":"s","event_type":"v"},{"site_id":5}]', None, None),
    ("batch bad ndjson line", "/events", b'{"site_id":"s","event_type":"v"}\n{x\n', "application/x-ndjson", None),
    ("batch not an array", "/events", b"{}", None, None),
    ("batch empty", "/events", b"[]", None, None),
    ("batch too many", "/events", b"[" + b",".join([b'{"site_id":"s","event_type":"v"}'] * 1001) + b"]",
     None, None),
    ("batch over the limit", "/events", b"[" + b" " * (1024 * 1024) + b"]", None, None),
    ("plausible pageview", "/api/event", PAGEVIEW, "text/plain", CHROME),
    ("plausible bot", "/api/event", PAGEVIEW, "text/plain", GOOGLEBOT),
    ("plausible no user agent", "/api/event", PAGEVIEW, "text/plain", None),
    ("plausible not json", "/api/event", b"{", "text/plain", CHROME),
    ("plausible no url", "/api/event", b'{"n":"pageview","d":"example.test"}', "text/plain", CHROME),
    ("plausible over the limit", "/api/event", b'{"x":"' + b"x" * 70_000 + b'"}', "text/plain", CHROME),
    # the sites not in SITES of the fixture below
    ("event unknown site", "/event", b'{"site_id":"junk","event_type":"v"}', None, None),
    ("batch unknown site", "/events", b'[{"site_id":"s","event_type":"v"},{"site_id":"junk","event_type":"v"}]',
     None, None),
    ("batch ndjson unknown site", "/events", b'{"site_id":"s","event_type":"v"}\n{"site_id":"junk","event_type":"v"}',
     "application/x-ndjson", None),
    ("plausible unknown site", "/api/event", PAGEVIEW.replace(b"example.test", b"junk.test"), "text/plain", CHROME),
    ("plausible some unknown sites", "/api/event", PAGEVIEW.replace(b'"example.test"', b'"junk.test,www.example.test"'),
     "text/plain", CHROME),
]


def answer(wsgi, path, body, content_type, user_agent):
    headers = {"User-Agent": user_agent} if user_agent else {}
    response = Client(wsgi).post(path, data=body, content_type=content_type, headers=headers,
                                 environ_base={"REMOTE_ADDR": "203.0.113.5"})
    return response.status, response.headers.to_wsgi_list(), response.data


@pytest.fixture
def fast_path(app):
    assert isinstance(app.wsgi_app, FastPath)
    return app.wsgi_app


@pytest.fixture(params=[frozenset(), frozenset({"s", "t", "example.test"})], ids=["any site", "SITES"])
def either_fast_path(request, config):
    """The fast path of an app without SITES, and of one with SITES set."""
    app = create_app(config.with_overrides(sites=request.param))
    yield app.wsgi_app
    app.extensions["analytics"]["store"].close()
    app.extensions["analytics"]["queue"].close()


@pytest.mark.parametrize("name,path,body,content_type,user_agent", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_fast_path_answers_byte_for_byte_like_flask(either_fast_path, name, path, body, content_type, user_agent):
    flask_answer = answer(either_fast_path.flask_wsgi, path, body, content_type, user_agent)
    assert answer(either_fast_path, path, body, content_type, user_agent) == flask_answer


@pytest.mark.parametrize("path,body,status,dropped", [
    ("/event", b'{"site_id":"junk","event_type":"v"}', "400 BAD REQUEST", None),
    ("/events", b'[{"site_id":"s","event_type":"v"},{"site_id":"junk","event_type":"v"}]', "400 BAD REQUEST", None),
    ("/api/event", PAGEVIEW.replace(b"example.test", b"junk.test"), "202 ACCEPTED", "unknown-site"),
], ids=["event", "events", "api/event"])
def test_both_paths_turn_down_a_site_not_in_sites_alike(config, path, body, status, dropped):
    app = create_app(config.with_overrides(sites=frozenset({"s"})))
    fast_path = app.wsgi_app
    answers = [answer(wsgi, path, body, "text/plain", CHROME) for wsgi in (fast_path, fast_path.flask_wsgi)]
    assert answers[0] == answers[1]
    assert answers[0][0] == status
    assert dict(answers[0][1]).get("X-Analytics-Dropped") == dropped
    assert app.extensions["analytics"]["queue"].size() == 0


def test_fast_path_and_flask_both_answer_503_when_the_queue_cannot_be_written(fast_path, config):
    answer(fast_path, "/api/event", PAGEVIEW, "text/plain", CHROME)    # today's visitor salt, kept
    shutil.rmtree(config.data_dir)
    for path, body in (("/event", b'{"site_id":"s","event_type":"v"}'),
                       ("/events", b'[{"site_id":"s","event_type":"v"}]'),
                       ("/api/event", PAGEVIEW)):
        flask_answer = answer(fast_path.flask_wsgi, path, body, "text/plain", CHROME)
        assert flask_answer[0] == "503 SERVICE UNAVAILABLE"
        assert answer(fast_path, path, body, "text/plain", CHROME) == flask_answer


def test_a_queue_that_cannot_be_written_is_logged_once_per_outage_not_per_request(client, config, caplog):
    shutil.rmtree(config.data_dir)
    answers = [client.post("/event", data=b'{"site_id":"s","event_type":"v"}').status_code
               for _ in range(20)]
    assert answers == [503] * 20
    assert [record.getMessage()[:20] for record in caplog.records
            if "queue append failed" in record.getMessage()] == ["queue append failed:"]


def test_both_paths_queue_the_same_events(app, fast_path):
    body = b'{"site_id":"s","event_type":"v"}'
    answer(fast_path, "/event", body, None, None)
    answer(fast_path.flask_wsgi, "/event", body, None, None)
    assert app.extensions["analytics"]["queue"].size() == 2


def post_chunked(app, path, body, content_type="application/json", **headers):
    """A body without a Content-Length, as a chunked upload arrives."""
    return app.test_client().post(path, input_stream=io.BytesIO(body), content_type=content_type,
                                  headers=headers, environ_overrides={"wsgi.input_terminated": True,
                                                                      "CONTENT_LENGTH": ""})


def test_a_body_without_content_length_goes_to_flask_and_is_accepted(app):
    response = post_chunked(app, "/event", b'{"site_id":"s","event_type":"v"}')
    assert response.status_code == 200
    assert app.extensions["analytics"]["queue"].size() == 1


@pytest.mark.parametrize("method,path,status", [("GET", "/event", 405), ("PUT", "/events", 405),
                                                ("POST", "/event/", 404), ("GET", "/health", 200)])
def test_other_methods_and_paths_fall_through_to_flask(client, method, path, status):
    response = client.open(path, method=method)
    assert response.status_code == status
    assert response.is_json


@pytest.mark.parametrize("length", ["\u00b2", "\u0663", "+3", " 3"])
def test_a_content_length_of_other_than_ascii_digits_is_a_400_not_a_500(client, length):
    response = client.post("/event", data=b'{"site_id":"s","event_type":"v"}',
                           environ_overrides={"CONTENT_LENGTH": length})
    assert response.status_code == 400
    assert response.is_json


def test_a_content_length_too_long_for_int_is_a_413(client):
    response = client.post("/event", data=b'{"site_id":"s","event_type":"v"}',
                           environ_overrides={"CONTENT_LENGTH": "1" * 5000})
    assert response.status_code == 413
    assert response.is_json


NDJSON_LINE = b'{"site_id":"s","event_type":"v","path":"/' + b"p" * 1100 + b'"}\n'    # 975 are over 1 MiB


@pytest.mark.parametrize("path,body,content_type", [
    ("/event", b'{"site_id":"s","event_type":"v","x":"' + b"x" * 70_000 + b'"}', "application/json"),
    ("/events", NDJSON_LINE * 975, "application/x-ndjson"),
    ("/api/event", PAGEVIEW[:-1] + b',"p":"' + b"x" * 70_000 + b'"}', "text/plain"),
], ids=["event", "events", "api/event"])
def test_a_chunked_body_over_the_limit_is_a_413_and_nothing_is_queued(app, path, body, content_type):
    response = post_chunked(app, path, body, content_type, **{"User-Agent": CHROME})
    assert response.status_code == 413
    assert response.is_json
    assert app.extensions["analytics"]["queue"].size() == 0


def test_a_chunked_batch_of_exactly_the_limit_is_accepted_whole(app, config):
    lines = config.max_batch_bytes // len(NDJSON_LINE)
    body = NDJSON_LINE * lines
    body += b" " * (config.max_batch_bytes - len(body))      # blank NDJSON space up to the limit
    response = post_chunked(app, "/events", body, "application/x-ndjson")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["count"] == lines == app.extensions["analytics"]["queue"].size()


@pytest.mark.parametrize("path,body,limit", [
    ("/event", b'{"site_id":"s","event_type":"v"}', "max_body_bytes"),
    ("/events", b'[{"site_id":"s","event_type":"v"}]', "max_batch_bytes"),
    ("/api/event", PAGEVIEW, "max_body_bytes"),
], ids=["event", "events", "api/event"])
def test_a_body_of_exactly_the_limit_is_taken_and_one_byte_more_is_a_413(app, config, path, body, limit):
    size = getattr(config, limit)
    for extra, status in ((0, 202 if path == "/api/event" else 200), (1, 413)):
        padded = body + b" " * (size + extra - len(body))        # JSON may end in blank space
        sent = app.test_client().post(path, data=padded, content_type="text/plain",
                                      headers={"User-Agent": CHROME})
        chunked = post_chunked(app, path, padded, "text/plain", **{"User-Agent": CHROME})
        assert (sent.status_code, chunked.status_code) == (status, status), (extra, sent.data)


COMPRESSIBLE = [("/event", b'{"site_id":"s","event_type":"v"}', "application/json"),
                ("/events", b'{"site_id":"s","event_type":"v"}\n', "application/x-ndjson"),
                ("/api/event", PAGEVIEW, "text/plain")]


@pytest.mark.parametrize("path,body,content_type", COMPRESSIBLE, ids=["event", "events", "api/event"])
@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "br", "zstd", "GZIP"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_compressed_body_is_a_415_naming_its_encoding_and_nothing_is_queued(
        app, path, body, content_type, encoding, chunked):
    headers = {"Content-Encoding": encoding, "User-Agent": CHROME}
    compressed = gzip.compress(body)
    if chunked:
        response = post_chunked(app, path, compressed, content_type, **headers)
    else:
        response = app.test_client().post(path, data=compressed, content_type=content_type, headers=headers)
    assert response.status_code == 415
    assert response.get_json() == {
        "error": f"Unsupported Content-Encoding: {encoding}; send the body uncompressed"}
    assert response.headers["Accept-Encoding"] == "identity"
    assert app.extensions["analytics"]["queue"].size() == 0


@pytest.mark.parametrize("path,body,content_type", COMPRESSIBLE, ids=["event", "events", "api/event"])
@pytest.mark.parametrize("encoding", ["identity", "utf-8"])     # the second one: a client's mistake, harmless
def test_a_body_sent_as_it_is_is_taken_whatever_else_content_encoding_says(app, path, body, content_type, encoding):
    response = app.test_client().post(path, data=body, content_type=content_type,
                                      headers={"Content-Encoding": encoding, "User-Agent": CHROME})
    assert response.status_code in (200, 202)
    assert app.extensions["analytics"]["queue"].size() == 1


@pytest.mark.parametrize("path,limit", [("/event", "max_body_bytes"), ("/events", "max_batch_bytes"),
                                        ("/api/event", "max_body_bytes")], ids=["event", "events", "api/event"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_413_says_how_large_a_body_may_be(app, config, path, limit, chunked):
    size = getattr(config, limit)
    body, headers = b"[" + b" " * size + b"]", {"User-Agent": CHROME}
    if chunked:
        response = post_chunked(app, path, body, "text/plain", **headers)
    else:
        response = app.test_client().post(path, data=body, content_type="text/plain", headers=headers)
    assert response.status_code == 413
    assert response.get_json() == {"error": f"Request body too large: at most {size} bytes"}
