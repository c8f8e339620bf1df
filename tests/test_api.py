"""The HTTP contract of POST /event, POST /events, GET /stats and GET /health."""
import gc
import json
import os
import shutil
import threading

import pytest

from ingestion_api import create_app
from processes import wait_for

ALL_BACKENDS = True

EVENT = {"site_id": "site1", "event_type": "page_view", "path": "/home", "user_id": "u1"}


def stats(client, **params):
    response = client.get("/stats", query_string=params)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_valid_event_is_acknowledged_with_the_original_body(client):
    response = client.post("/event", json=EVENT)
    assert response.status_code == 200
    assert response.get_json() == {"message": "Event received"}
    assert response.mimetype == "application/json"


@pytest.mark.embedded
def test_acknowledged_event_is_in_the_queue_before_the_answer(client, config):
    client.post("/event", json=EVENT)
    with open(config.queue_path, "rb") as queue_file:
        assert queue_file.read().count(b"\n") == 1


@pytest.mark.parametrize("field", ["site_id", "event_type"])
def test_missing_required_field_is_rejected_with_400(client, field):
    event = {k: v for k, v in EVENT.items() if k != field}
    response = client.post("/event", json=event)
    assert response.status_code == 400
    assert response.get_json() == {"error": f"Missing required field: {field}"}


def test_body_that_is_not_json_is_rejected(client):
    response = client.post("/event", data="not json", content_type="application/json")
    assert response.status_code == 400
    assert response.get_json() == {"error": "Invalid JSON"}


def test_text_plain_body_is_parsed_as_json_like_send_beacon(client):
    response = client.post("/event", data='{"site_id":"s","event_type":"page_view"}',
                           content_type="text/plain;charset=UTF-8")
    assert response.status_code == 200


@pytest.mark.embedded
def test_unknown_fields_are_ignored(client, config, drain):
    assert client.post("/event", json={**EVENT, "colour": "blue"}).status_code == 200
    with open(config.queue_path, "rb") as queue_file:
        assert b"colour" not in queue_file.read()


def test_body_over_the_limit_gets_413_json(client, config):
    big = {**EVENT, "padding": "x" * config.max_body_bytes}
    response = client.post("/event", json=big)
    assert response.status_code == 413
    assert "error" in response.get_json()


@pytest.mark.embedded
def test_timestamp_with_offset_is_stored_in_utc_with_z(client, drain, config):
    client.post("/event", json={**EVENT, "timestamp": "2025-03-01T01:30:00+02:00"})
    drain()
    assert stats(client, site_id="site1", date="2025-02-28")["total_views"] == 1
    with open(config.queue_path, "rb") as queue_file:
        assert b'"timestamp":"2025-02-28T23:30:00.000Z"' in queue_file.read()


def test_missing_timestamp_means_time_of_receipt(client, drain):
    from datetime import datetime, timezone
    before = datetime.now(timezone.utc)
    client.post("/event", json=EVENT)
    after = datetime.now(timezone.utc)
    drain()
    points = client.get("/stats/timeseries", query_string={
        "site_id": "site1", "interval": "hour", "from": before.date().isoformat(),
        "to": after.date().isoformat()}).get_json()["points"]
    [viewed] = [point["date"] for point in points if point["views"]]
    hour = "%Y-%m-%dT%H:00:00Z"     # the hour of receipt, which midnight may have ended meanwhile
    assert before.strftime(hour) <= viewed <= after.strftime(hour)


# -- batches ---------------------------------------------------------------

def test_batch_as_json_array_is_accepted_whole(client, drain):
    events = [{**EVENT, "path": f"/p{i}"} for i in range(5)]
    response = client.post("/events", json=events)
    assert response.status_code == 200
    assert response.get_json() == {"message": "Events received", "count": 5}
    drain()
    assert stats(client, site_id="site1")["total_views"] == 5


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/x-ndjson; charset=utf-8",
                                          "Application/X-NDJSON", "application/ndjson"])
def test_batch_as_ndjson_is_accepted(client, drain, content_type):
    body = "\n".join(['{"site_id":"s","event_type":"page_view","path":"/a"}'] * 3) + "\n"
    response = client.post("/events", data=body, content_type=content_type)
    assert response.get_json() == {"message": "Events received", "count": 3}


@pytest.mark.embedded
def test_one_invalid_event_rejects_the_whole_batch_and_names_it(client, config):
    events = [EVENT, EVENT, {"site_id": "site1"}, EVENT]
    response = client.post("/events", json=events)
    assert response.status_code == 400
    assert response.get_json() == {"error": "Missing required field: event_type", "index": 2}
    assert not os.path.exists(config.queue_path) or os.path.getsize(config.queue_path) == 0


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_ndjson_sent_without_its_content_type_is_refused_with_the_type_to_send(client, content_type):
    body = "\n".join(['{"site_id":"s","event_type":"page_view","path":"/a"}'] * 3) + "\n"
    response = client.post("/events", data=body, content_type=content_type)
    assert response.status_code == 400
    assert response.get_json() == {"error": "Invalid JSON: a batch of one event per line (NDJSON) "
                                            "is sent with Content-Type: application/x-ndjson"}


def test_a_batch_that_is_not_json_at_all_is_plain_invalid_json(client):
    response = client.post("/events", data="{oops\n[1]", content_type="application/json")
    assert response.get_json() == {"error": "Invalid JSON"}


def test_invalid_ndjson_line_is_named_by_index(client):
    body = '{"site_id":"s","event_type":"v"}\n{oops\n'
    response = client.post("/events", data=body, content_type="application/x-ndjson")
    assert response.status_code == 400
    assert response.get_json() == {"error": "Invalid JSON", "index": 1}


def test_batch_over_the_event_limit_is_rejected(client, config):
    response = client.post("/events", json=[EVENT] * (config.max_batch_events + 1))
    assert response.status_code == 400
    assert "at most 1000" in response.get_json()["error"]


def test_batch_of_exactly_the_event_limit_is_accepted(client, config):
    response = client.post("/events", json=[EVENT] * config.max_batch_events)
    assert response.get_json() == {"message": "Events received", "count": config.max_batch_events}


def test_batch_that_is_not_an_array_is_rejected(client):
    response = client.post("/events", json=EVENT)
    assert response.status_code == 400
    assert "array" in response.get_json()["error"]


def test_batch_is_one_locked_append(app, config, monkeypatch):
    queue, appends = app.extensions["analytics"]["queue"], []
    append = queue.append

    def counted_append(lines):
        appends.append(len(lines))
        return append(lines)
    monkeypatch.setattr(queue, "append", counted_append)
    assert app.test_client().post("/events", json=[EVENT] * 3).status_code == 200
    assert appends == [3]
    from shared_queue import open_queue
    assert open_queue(config).size() == 3


# -- SITES -----------------------------------------------------------------

@pytest.fixture
def listed_client(config):
    from ingestion_api import create_app
    return create_app(config.with_overrides(sites=frozenset({"site1", "site2"}))).test_client()


def queue_size(client):
    return client.get("/health").get_json()["queue_size"]


def test_an_event_of_a_site_not_in_sites_is_rejected_with_400(listed_client):
    response = listed_client.post("/event", json={**EVENT, "site_id": "junk"})
    assert response.status_code == 400
    assert response.get_json() == {"error": "Unknown site_id: junk"}
    assert queue_size(listed_client) == 0


@pytest.mark.parametrize("site_id", ["Site1", "site1 ", "www.site1"])
def test_a_site_id_is_compared_with_sites_exactly(listed_client, site_id):
    response = listed_client.post("/event", json={**EVENT, "site_id": site_id})
    assert response.get_json() == {"error": f"Unknown site_id: {site_id}"}


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
def test_a_batch_with_one_site_not_in_sites_is_rejected_whole_and_names_it(listed_client, content_type):
    events = [EVENT, {**EVENT, "site_id": "site2"}, {**EVENT, "site_id": "junk"}, EVENT]
    body = "\n".join(map(json.dumps, events)) if content_type.endswith("ndjson") else json.dumps(events)
    response = listed_client.post("/events", data=body, content_type=content_type)
    assert response.status_code == 400
    assert response.get_json() == {"error": "Unknown site_id: junk", "index": 2}
    assert queue_size(listed_client) == 0


def test_events_of_the_sites_in_sites_are_stored(listed_client, drain):
    assert listed_client.post("/event", json=EVENT).status_code == 200
    response = listed_client.post("/events", json=[EVENT, {**EVENT, "site_id": "site2"}])
    assert response.get_json() == {"message": "Events received", "count": 2}
    drain()
    assert {site["site_id"] for site in listed_client.get("/stats/sites").get_json()["sites"]} == \
        {"site1", "site2"}


def test_without_sites_events_of_any_site_are_taken(client):
    assert client.post("/event", json={**EVENT, "site_id": "anything"}).status_code == 200
    assert client.post("/events", json=[{**EVENT, "site_id": f"s{i}"} for i in range(3)]).status_code == 200
    assert queue_size(client) == 4


# -- stats -----------------------------------------------------------------

@pytest.mark.embedded
@pytest.mark.parametrize("path", ["/", "/static/dashboard.js", "/static/dashboard.css", "/js/script.js",
                                  "/openapi.json", "/stats/sites", "/health", "/metrics", "/no/such/page"])
def test_every_answer_forbids_browsers_to_guess_another_content_type(client, path):
    response = client.get(path)
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_stats_contract(client, drain):
    for path, user in [("/a", "u1"), ("/a", "u2"), ("/b", "u1"), ("/c", None)]:
        client.post("/event", json={"site_id": "s", "event_type": "page_view",
                                    "path": path, "user_id": user})
    client.post("/event", json={"site_id": "s", "event_type": "click", "path": "/a", "user_id": "u3"})
    client.post("/event", json={"site_id": "s", "event_type": "click", "path": "/never-viewed"})
    client.post("/event", json={"site_id": "other", "event_type": "page_view", "path": "/a"})
    drain()
    assert stats(client, site_id="s") == {
        "site_id": "s", "date": None, "total_views": 4, "unique_users": 3,
        "top_paths": [{"path": "/a", "views": 2}, {"path": "/b", "views": 1},
                      {"path": "/c", "views": 1}],
    }


def test_top_paths_ties_are_ordered_by_path_and_limited(client, drain):
    for path in ["/z", "/y", "/x", "/x"]:
        client.post("/event", json={"site_id": "s", "event_type": "page_view", "path": path})
    drain()
    assert stats(client, site_id="s", limit=2)["top_paths"] == [
        {"path": "/x", "views": 2}, {"path": "/y", "views": 1}]


def test_top_paths_are_ten_unless_a_limit_is_given(client, drain):
    client.post("/events", json=[{"site_id": "s", "event_type": "page_view", "path": f"/{n:02d}"}
                                 for n in range(12)])
    drain()
    assert [row["path"] for row in stats(client, site_id="s")["top_paths"]] == [f"/{n:02d}" for n in range(10)]
    assert len(stats(client, site_id="s", limit=12)["top_paths"]) == 12


def test_date_restricts_every_figure_to_that_utc_day(client, drain):
    client.post("/event", json={**EVENT, "timestamp": "2025-01-01T23:59:59Z"})
    client.post("/event", json={**EVENT, "user_id": "u2", "timestamp": "2025-01-02T00:00:00Z"})
    drain()
    body = stats(client, site_id="site1", date="2025-01-02")
    assert (body["date"], body["total_views"], body["unique_users"]) == ("2025-01-02", 1, 1)


def test_unknown_site_gives_zeros(client):
    assert stats(client, site_id="nobody") == {
        "site_id": "nobody", "date": None, "total_views": 0, "unique_users": 0, "top_paths": []}


def test_stats_without_site_id_is_rejected(client):
    response = client.get("/stats")
    assert response.status_code == 400
    assert response.get_json() == {"error": "Missing required parameter: site_id"}


@pytest.mark.parametrize("day", ["2025-02-30", "2025-1-01", "yesterday", "20250101", "2025-01-01T00:00",
                                 "2025-W01-1", "20250101xx", "２０２５-01-01"])
def test_invalid_date_is_rejected(client, day):
    response = client.get("/stats", query_string={"site_id": "s", "date": day})
    assert response.status_code == 400
    assert response.get_json() == {"error": "Invalid date format. Expected YYYY-MM-DD"}


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "ten", "1.5", "\u0663", "\uff11",
                                   "1" * 4301, "0" * 4300 + "5"])
def test_invalid_limit_is_rejected(client, limit):
    response = client.get("/stats", query_string={"site_id": "s", "limit": limit})
    assert response.status_code == 400
    assert "limit" in response.get_json()["error"]


# -- health ----------------------------------------------------------------

def test_health_reports_exact_queue_size(client, drain):
    client.post("/events", json=[EVENT] * 7)
    assert client.get("/health").get_json() == {
        "status": "healthy", "service": "ingestion_api", "queue_size": 7}
    drain()
    assert client.get("/health").get_json()["queue_size"] == 0


@pytest.mark.embedded
def test_health_is_503_when_the_queue_cannot_be_written(client, config):
    shutil.rmtree(config.data_dir)
    response = client.get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unhealthy" and body["reason"]


@pytest.mark.embedded
def test_event_is_503_not_acknowledged_when_the_queue_cannot_be_written(client, config):
    shutil.rmtree(config.data_dir)
    response = client.post("/event", json=EVENT)
    assert response.status_code == 503
    assert "error" in response.get_json()


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/nope").status_code == 404
    assert "error" in client.get("/nope").get_json()
    response = client.get("/event")
    assert response.status_code == 405 and "error" in response.get_json()


@pytest.mark.parametrize("method, url, allowed", [("get", "/event", {"POST"}),
                                                  ("delete", "/stats", {"GET", "HEAD"})])
def test_wrong_method_answer_lists_the_allowed_ones(client, method, url, allowed):
    response = getattr(client, method)(url)
    assert response.status_code == 405
    assert allowed <= {name.strip() for name in response.headers["Allow"].split(",")}


def test_fifty_thousand_levels_of_nesting_is_a_400_not_a_recursion_error(config):
    from ingestion_api import create_app
    client = create_app(config.with_overrides(max_body_bytes=1024 * 1024)).test_client()
    response = client.post("/event", data=b"[" * 50_000 + b"]" * 50_000)
    assert response.status_code == 400
    assert response.get_json() == {"error": "Invalid JSON"}


KEYS_FILE = """# dashboard
  # old key, removed: secret0
secret1
secret2  # ops team
\tsecret3\t# staging
key#4
"""

# token -> status of GET /stats with it
STATUS_BY_TOKEN = {"secret1": 200, "secret2": 200, "secret3": 200, "key#4": 200,
                   "# old key, removed: secret0": 401, "secret0": 401, "secret2  # ops team": 401}


def test_api_keys_file_comments_are_whole_lines_or_after_whitespace(tmp_path):
    from config import load_config
    from ingestion_api import create_app
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEYS_FILE)
    config = load_config(environ={"DATA_DIR": str(tmp_path), "API_KEYS_FILE": str(keys_file)})
    client = create_app(config).test_client()
    statuses = {token: client.get("/stats?site_id=s", headers={"Authorization": f"Bearer {token}"})
                .status_code for token in STATUS_BY_TOKEN}
    assert statuses == STATUS_BY_TOKEN


@pytest.mark.embedded
def test_an_api_worker_started_while_postgresql_is_down_takes_events_and_answers_503_for_reports(
        config, monkeypatch):
    """gunicorn restarts a worker that dies; it must boot without the database, as ingestion needs none."""
    from ingestion_api import create_app
    from rate_limit import SECRET_NAME
    nobody_listens = "postgresql://postgres@127.0.0.1:9/test?connect_timeout=1"
    app = create_app(config.with_overrides(database_url=nobody_listens, rate_limit="100/second"))
    store, reads = app.extensions["analytics"]["store"], []
    read_salt = store.daily_salt

    def counted_read(day, *args, **kwargs):
        reads.append(day)
        return read_salt(day, *args, **kwargs)
    monkeypatch.setattr(store, "daily_salt", counted_read)
    client = app.test_client()
    for _ in range(6):
        assert client.post("/event", json={"site_id": "s", "event_type": "page_view"}).status_code == 200
    # reading the rate limit's key waits for the database (5 s): retried now and then, not per event
    assert reads == [SECRET_NAME]
    response = client.get("/stats?site_id=s")
    assert response.status_code == 503 and response.is_json


def count_waits_for_a_connection(monkeypatch):
    """A list that gets an item each time a request asks the PostgreSQL pool for a connection."""
    from psycopg_pool import ConnectionPool
    waits = []
    for name in ("getconn", "connection"):
        def counted(pool, *args, real=getattr(ConnectionPool, name), **kwargs):
            waits.append(name)
            return real(pool, *args, **kwargs)
        monkeypatch.setattr(ConnectionPool, name, counted)
    return waits


@pytest.mark.embedded
def test_while_postgresql_is_unreachable_reports_and_browser_events_fail_at_once(config, monkeypatch):
    """A sync worker waiting 5 s for the database per request is a worker not taking POST /event."""
    import postgres_store
    from ingestion_api import create_app
    # the requests below all come within the pause, however slow a busy machine runs them
    monkeypatch.setattr(postgres_store, "UNREACHABLE_PAUSE", 3600.0)
    nobody_listens = "postgresql://postgres@127.0.0.1:9/test?connect_timeout=1"
    client = create_app(config.with_overrides(database_url=nobody_listens, rate_limit="")).test_client()
    assert client.get("/stats?site_id=s").status_code == 503         # the pool has waited in vain
    waits = count_waits_for_a_connection(monkeypatch)
    browser = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"}
    pageview = {"n": "pageview", "d": "example.test", "u": "http://example.test/"}
    for _ in range(5):
        assert client.get("/stats?site_id=s").status_code == 503
        assert client.post("/api/event", json=pageview, headers=browser).status_code == 503
    assert waits == []
    assert client.post("/event", json={"site_id": "s", "event_type": "page_view"}).status_code == 200


@pytest.mark.embedded
def test_a_queue_that_does_not_answer_in_time_says_the_event_may_be_stored(config):
    """A Redis that took the command and went silent may have queued it: a 503 must not say it did not."""
    import socket
    from ingestion_api import create_app
    with socket.socket() as silent:                  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0?stream=silent"
        client = create_app(config.with_overrides(queue_url=url, rate_limit="")).test_client()
        response = client.post("/event", json={"site_id": "s", "event_type": "page_view"})
    assert response.status_code == 503
    assert response.get_json() == {"error": "Queue did not answer in time; the event may have been stored"}


def test_an_app_let_go_of_keeps_no_file_open_and_no_thread_running(config):
    # One app per process in production; the tests and anything that embeds the app make many.
    def open_files():
        return len(os.listdir("/proc/self/fd"))
    gc.collect()
    files, threads = open_files(), threading.active_count()
    for _ in range(20):
        client = create_app(config).test_client()     # queue, rate-limit counters, metrics thread
        assert client.post("/event", json=EVENT).status_code == 200
        assert client.get("/stats?site_id=site1").status_code == 200
        del client
    gc.collect()
    wait_for(lambda: threading.active_count() <= threads, 10, "the metrics threads to end")
    assert open_files() <= files
