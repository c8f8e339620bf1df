"""Hostile input never gets a 5xx, never acknowledges what cannot be stored,
and never costs a valid event sent around it."""
import sqlite3

import pytest

VALID = b'{"site_id":"hostile","event_type":"page_view","path":"/ok"}'
DEEP = b"[" * 50_000 + b"]" * 50_000            # 100 KB: fits the batch limit
DEEP_SINGLE = b"[" * 50_000 + b"]" * 10_000     # 60 KB: fits the single-event limit
DEEP_OBJECT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000

# (name, path, body, content type, expected status)
HOSTILE = [
    ("empty body", "/event", b"", None, 400),
    ("whitespace body", "/event", b"   \n", None, 400),
    ("not json", "/event", b"hello", None, 400),
    ("truncated json", "/event", b'{"site_id": "s"', None, 400),
    ("json null", "/event", b"null", None, 400),
    ("json number", "/event", b"42", None, 400),
    ("json string", "/event", b'"site_id"', None, 400),
    ("json array", "/event", b"[1,2]", None, 400),
    ("empty object", "/event", b"{}", None, 400),
    ("site_id number", "/event", b'{"site_id":1,"event_type":"v"}', None, 400),
    ("site_id object", "/event", b'{"site_id":{},"event_type":"v"}', None, 400),
    ("site_id list", "/event", b'{"site_id":["s"],"event_type":"v"}', None, 400),
    ("site_id bool", "/event", b'{"site_id":true,"event_type":"v"}', None, 400),
    ("site_id null", "/event", b'{"site_id":null,"event_type":"v"}', None, 400),
    ("site_id empty", "/event", b'{"site_id":"","event_type":"v"}', None, 400),
    ("site_id blank", "/event", b'{"site_id":"   ","event_type":"v"}', None, 400),
    ("event_type number", "/event", b'{"site_id":"s","event_type":7}', None, 400),
    ("event_type empty", "/event", b'{"site_id":"s","event_type":""}', None, 400),
    ("path object", "/event", b'{"site_id":"s","event_type":"v","path":{"a":1}}', None, 400),
    ("path number", "/event", b'{"site_id":"s","event_type":"v","path":3}', None, 400),
    ("user_id list", "/event", b'{"site_id":"s","event_type":"v","user_id":[]}', None, 400),
    ("site_id too long", "/event", b'{"site_id":"' + b"s" * 257 + b'","event_type":"v"}', None, 400),
    ("site_id at limit", "/event", b'{"site_id":"' + b"s" * 256 + b'","event_type":"v"}', None, 200),
    ("user_id too long", "/event", b'{"site_id":"s","event_type":"v","user_id":"' + b"u" * 257 + b'"}', None, 400),
    ("path too long", "/event", b'{"site_id":"s","event_type":"v","path":"/' + b"p" * 2048 + b'"}', None, 400),
    ("lone surrogate", "/event", b'{"site_id":"\\ud800","event_type":"v"}', None, 400),
    ("lone low surrogate", "/event", b'{"site_id":"s","event_type":"v","path":"\\udc00"}', None, 400),
    ("invalid utf-8", "/event", b'{"site_id":"\xff\xfe","event_type":"v"}', None, 400),
    ("nul escape in site_id", "/event", b'{"site_id":"a\\u0000b","event_type":"v"}', None, 400),
    ("nul escape in path", "/event", b'{"site_id":"s","event_type":"v","path":"/\\u0000"}', None, 400),
    ("raw nul byte", "/event", b'{"site_id":"s\x00","event_type":"v"}', None, 400),
    ("nul escape in timestamp", "/event",
     b'{"site_id":"s","event_type":"v","timestamp":"2025-01-15T10:00:00Z\\u0000 trailing"}', None, 400),
    ("deeply nested array", "/event", DEEP_SINGLE, None, 400),
    ("deeply nested object", "/events", DEEP_OBJECT, None, 400),
    ("nested value in unknown field", "/event", b'{"site_id":"s","event_type":"v","x":' + b"[" * 2000 + b"]" * 2000 + b"}", None, 400),
    ("NaN", "/event", b'{"site_id":"s","event_type":"v","x":NaN}', None, 400),
    ("huge number", "/event", b'{"site_id":"s","event_type":"v","x":1e999}', None, 400),
    ("timestamp garbage", "/event", b'{"site_id":"s","event_type":"v","timestamp":"yesterday"}', None, 400),
    ("timestamp number", "/event", b'{"site_id":"s","event_type":"v","timestamp":1700000000}', None, 400),
    ("timestamp year 1", "/event", b'{"site_id":"s","event_type":"v","timestamp":"0001-01-01T00:00:00+14:00"}', None, 400),
    ("timestamp 1999", "/event", b'{"site_id":"s","event_type":"v","timestamp":"1999-12-31T23:59:59Z"}', None, 400),
    ("timestamp year 9999", "/event", b'{"site_id":"s","event_type":"v","timestamp":"9999-12-31T23:59:59-23:59"}', None, 400),
    ("timestamp impossible date", "/event", b'{"site_id":"s","event_type":"v","timestamp":"2025-02-30T00:00:00Z"}', None, 400),
    ("unicode site and path", "/event", '{"site_id":"sité","event_type":"v","path":"/ünï/😀"}'.encode(), None, 200),
    ("unknown fields", "/event", b'{"site_id":"s","event_type":"v","extra":{"a":[1,2]}}', None, 200),
    ("duplicate keys", "/event", b'{"site_id":"s","site_id":"t","event_type":"v"}', None, 200),
    ("utf-8 byte order mark", "/event", b'\xef\xbb\xbf{"site_id":"s","event_type":"v"}', None, 200),
    ("ndjson after a byte order mark", "/events", b'\xef\xbb\xbf{"site_id":"s","event_type":"v"}\n',
     "application/x-ndjson", 200),
    ("two byte order marks", "/event", b'\xef\xbb\xbf\xef\xbb\xbf{"site_id":"s","event_type":"v"}', None, 400),
    ("utf-16", "/event", '{"site_id":"s","event_type":"v"}'.encode("utf-16"), "application/json; charset=utf-16", 400),
    ("latin-1", "/event", '{"site_id":"s","event_type":"v","path":"/café"}'.encode("latin-1"),
     "application/json; charset=iso-8859-1", 400),
    ("form encoded", "/event", b"site_id=s&event_type=v", "application/x-www-form-urlencoded", 400),
    ("body over limit", "/event", b'{"site_id":"s","event_type":"v","x":"' + b"x" * 70_000 + b'"}', None, 413),
    ("batch not array", "/events", b'{"site_id":"s","event_type":"v"}', None, 400),
    ("batch empty", "/events", b"[]", None, 400),
    ("batch of numbers", "/events", b"[1,2,3]", None, 400),
    ("batch deeply nested", "/events", DEEP, None, 400),
    ("batch with a bad event", "/events", b'[{"site_id":"s","event_type":"v"},{"site_id":5}]', None, 400),
    ("ndjson garbage line", "/events", b'{"site_id":"s","event_type":"v"}\n}{\n', "application/x-ndjson", 400),
    ("ndjson invalid utf-8", "/events", b'{"site_id":"\xc3\x28","event_type":"v"}\n', "application/x-ndjson", 400),
    ("batch too many", "/events", b"[" + b",".join([b'{"site_id":"s","event_type":"v"}'] * 1001) + b"]", None, 400),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Send every hostile input with a valid event before and after each one."""
    from config import load_config
    from ingestion_api import create_app
    from processor import Processor
    from shared_queue import open_queue
    from store import open_store

    config = load_config(environ={}, data_dir=str(tmp_path_factory.mktemp("hostile")))
    client = create_app(config).test_client()
    answers, valid_sent = {}, 0
    for name, path, body, content_type, _ in HOSTILE:
        assert client.post("/event", data=VALID).status_code == 200
        answers[name] = client.post(path, data=body, content_type=content_type or "application/json")
        valid_sent += 1
    assert client.post("/event", data=VALID).status_code == 200
    valid_sent += 1
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)
    return {"answers": answers, "valid_sent": valid_sent, "config": config,
            "client": client, "dead": processor.dead}


@pytest.mark.parametrize("name,path,body,content_type,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_the_right_status_and_a_json_body(results, name, path, body, content_type, status):
    response = results["answers"][name]
    assert response.status_code == status
    body = response.get_json()
    assert isinstance(body, dict)
    if status >= 400:
        assert body["error"]


def test_there_are_at_least_forty_hostile_inputs():
    assert len(HOSTILE) >= 40


def test_valid_events_around_hostile_input_are_all_counted(results):
    stats = results["client"].get("/stats?site_id=hostile").get_json()
    assert stats["total_views"] == results["valid_sent"]


def test_everything_acknowledged_was_stored_and_nothing_went_to_dead_letters(results):
    accepted = sum(1 for name, *_rest, status in HOSTILE if status == 200)
    connection = sqlite3.connect(results["config"].database_path)
    stored = connection.execute("SELECT count(*) FROM events").fetchone()[0]
    assert stored == results["valid_sent"] + accepted
    assert results["dead"] == 0
